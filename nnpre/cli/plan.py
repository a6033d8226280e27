"""``nnPre_plan``: fingerprint, plan and preprocess a dataset at a fixed spacing and patch.

Examples::

    nnPre_plan -d 501 --preset cpu-tiny            # tiny CPU geometry (2 mm, 32³)
    nnPre_plan -d 501 -pl resenc-l                 # ResEnc-L, 1 mm, 128³ (defaults)
    nnPre_plan -d 501 --like pretrained.pth        # rebuild a pretrained checkpoint's network exactly
    nnPre_plan -d 501 --like encoder.pth --strides 1 2 2 2   # encoder-only state dict without plan
"""
from __future__ import annotations

import argparse

from nnpre.cli._common import ArgumentParser, add_root_argument, apply_root, cli_entry, default_num_processes, triple


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="nnPre_plan", description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-d", "--dataset", required=True, help="dataset id (e.g. 501) or name (Dataset501_X)")
    p.add_argument("-pl", "--planner", choices=["plain", "resenc-l"], default=None,
                   help="network family: plain-conv U-Net or residual-encoder U-Net (ResEnc-L widths). "
                        "Default: resenc-l (or the checkpoint's with --like)")
    p.add_argument("--preset", default=None, help="geometry/training preset: gpu (default) or cpu-tiny")
    p.add_argument("--spacing", type=triple(float), default=None, help="target spacing in mm (default 1)")
    p.add_argument("--patch", type=triple(int), default=None, help="patch size in voxels (default 128)")
    p.add_argument("--batch-size", type=int, default=None, help="batch size (default 2)")
    p.add_argument("--normalization", choices=["zscore", "nnunet"], default=None,
                   help="zscore every channel (default, as nnssl) or nnU-Net's per-channel choice")
    p.add_argument("--plans-name", default=None, help="plans identifier (default nnPrePlans / nnPreResEncLPlans)")
    p.add_argument("--like", metavar="CHECKPOINT", default=None,
                   help="rebuild a pretrained checkpoint's network exactly (class and every architecture kwarg) at its "
                        "spacing, patch and normalisation; plans are named nnPrePlans__<checkpoint> and found by "
                        "nnPre_train --pretrained CHECKPOINT without -pl")
    p.add_argument("--strides", type=triple(int), nargs="+", default=None, metavar="S",
                   help="--like only, for checkpoints whose strides are not stored (encoder-only state dict without "
                        "adaptation plan): one stride per encoder stage, e.g. 1 2 2 2 or 1 1,2,2 2")
    p.add_argument("--no-preprocess", action="store_true", help="only fingerprint and plan")
    p.add_argument("-np", "--num-processes", type=int, default=None, help="worker processes (default: cores)")
    add_root_argument(p)
    return p


def run(args: argparse.Namespace) -> int:
    apply_root(args)
    from planners.pipeline import plan_dataset

    if args.strides is not None and not args.like:
        from nnpre.errors import fail

        fail("--strides only applies with --like CHECKPOINT (it fills in a checkpoint's unknown strides)")

    result = plan_dataset(args.dataset, planner=args.planner, preset=args.preset, spacing=args.spacing,
                          patch_size=args.patch, batch_size=args.batch_size, normalization=args.normalization,
                          plans_name=args.plans_name, like=args.like, strides=args.strides,
                          preprocess=not args.no_preprocess,
                          num_processes=args.num_processes or default_num_processes())
    print(result.summary())
    return 0


main = cli_entry(run, build_parser)

if __name__ == "__main__":
    main()
