"""``nnPre_challenge``: the entry point of a Grand Challenge algorithm container (reads /input, writes /output).

Examples::

    nnPre_challenge -m /opt/nnpre/model                                   # what the Dockerfile runs
    nnPre_challenge -m MODEL_FOLD --input job/ --output out/ --segmentation-slug lesion-instance-map
    nnPre_challenge -m MODEL_FOLD --channels ct,pet                        # two-channel model, two interfaces

``-m`` is the fold folder of a ``nnPre_train detect`` run. The boxes go to ``OUTPUT/<--output-name>`` as
Grand Challenge's "Multiple 3D bounding boxes" JSON (corners in mm); see :mod:`nnpre.challenge`.
"""
from __future__ import annotations

import argparse

from nnpre.cli._common import ArgumentParser, add_device_argument, cli_entry


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="nnPre_challenge", description=__doc__.split("\n\n")[0], allow_abbrev=False,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("-m", "--model", required=True, help="fold folder of a nnPre_train detect run")
    p.add_argument("--input", default="/input", help="job input folder (default /input)")
    p.add_argument("--output", default="/output", help="job output folder (default /output)")
    p.add_argument("--output-name", default="lesion-bounding-boxes.json",
                   help="file name of the boxes JSON, i.e. the output interface's relative path")
    p.add_argument("--channels", default=None,
                   help="comma-separated input interface slugs in the model's channel order "
                        "(default: every folder of INPUT/images, sorted)")
    p.add_argument("--segmentation-slug", default=None,
                   help="also write an instance map of the kept boxes to OUTPUT/images/<slug>/output.mha")
    p.add_argument("--min-score", type=float, default=0.0, help="drop boxes scoring below this (default 0)")
    p.add_argument("--instance-min-score", type=float, default=0.5,
                   help="score threshold of the instance map (default 0.5)")
    p.add_argument("--checkpoint", default="checkpoint_final.pth")
    p.add_argument("--no-mirror", action="store_true", help="no test-time mirroring (8x faster)")
    add_device_argument(p)
    return p


def run(args: argparse.Namespace) -> int:
    from nnpre.challenge import run_job
    from nnpre_trainers.run import pick_device

    channels = [s.strip() for s in args.channels.split(",") if s.strip()] if args.channels else None
    out = run_job(args.model, args.input, args.output, output_name=args.output_name, channels=channels,
                  segmentation_slug=args.segmentation_slug, min_score=args.min_score,
                  instance_min_score=args.instance_min_score, checkpoint=args.checkpoint,
                  mirror=not args.no_mirror, device=pick_device(args.device))
    print(f"wrote {out}")
    return 0


main = cli_entry(run, build_parser)

if __name__ == "__main__":
    main()
