"""``nnPre_synth``: write the built-in synthetic CT lesion datasets (labelled, nnDetection copy, pool).

Examples::

    nnPre_synth                                   # into $nnUNet_raw: Dataset501_SynthLesions + Dataset502_SynthPool
    nnPre_synth --out /data/raw -d 510 --n-train 20 --n-pool 64 --pool-channels 2 --seed 3
    nnPre_synth --nndet-out /data/det --lung-label --fov 128
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import List, Optional

from nnpre.cli._common import ArgumentParser
from nnpre.errors import NnPreError, fail
from nnpre.synthetic import (
    SYNTH_PRESETS,
    SynthConfig,
    get_synth_config,
    write_nndet_dataset,
    write_nnunet_dataset,
    write_unlabeled_pool,
)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="nnPre_synth",
        description="Write deterministic synthetic CT-like lesion data: a labelled nnU-Net raw dataset, "
                    "optionally its nnDetection copy, and an unlabelled pretraining pool.")
    p.add_argument("--out", default=None,
                   help="nnU-Net raw folder to write into (default: $nnUNet_raw)")
    p.add_argument("-d", "--dataset-id", type=int, default=501, help="labelled dataset id (default 501)")
    p.add_argument("--name", default="SynthLesions", help="labelled dataset name (default SynthLesions)")
    p.add_argument("--n-train", type=int, default=10, help="labelled training cases (default 10)")
    p.add_argument("--n-test", type=int, default=6, help="labelled test cases, imagesTs/labelsTs (default 6)")
    p.add_argument("--n-pool", type=int, default=16, help="unlabelled pool cases; 0 = no pool (default 16)")
    p.add_argument("--pool-id", type=int, default=None, help="pool dataset id (default: dataset id + 1)")
    p.add_argument("--pool-name", default="SynthPool", help="pool dataset name (default SynthPool)")
    p.add_argument("--pool-channels", type=int, choices=(1, 2), default=1,
                   help="pool channels: 1 = CT, 2 = CT + a second contrast (default 1)")
    p.add_argument("--seed", type=int, default=0, help="dataset seed (default 0)")
    p.add_argument("--fov", type=float, default=None,
                   help=f"field of view in mm, a cube (default {SynthConfig().fov_mm})")
    p.add_argument("--difficulty", choices=sorted(SYNTH_PRESETS), default="default",
                   help="generator calibration (default: the hard calibrated task; 'cpu' = the CPU demo's task, "
                        "lesions scaled to the 2 mm cpu-tiny grid; 'easy' = sanity task)")
    p.add_argument("--lung-label", action="store_true", help="also label the lungs (label 2)")
    p.add_argument("--nndet-out", default=None,
                   help="also write the labelled cases in nnDetection layout under this folder")
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing dataset folders that were generated with other settings")
    return p


def run(args: argparse.Namespace) -> List[str]:
    """Write the requested datasets; returns the folders written (or reused)."""
    out = args.out if args.out is not None else os.environ.get("nnUNet_raw")
    if not out:
        fail("no output location: pass --out DIR or set the nnUNet_raw environment variable")
    cfg = get_synth_config(args.difficulty)
    if args.fov is not None:
        cfg = dataclasses.replace(cfg, fov_mm=float(args.fov))
    if args.lung_label:
        cfg = dataclasses.replace(cfg, lung_label=True)
    pool_id = args.pool_id if args.pool_id is not None else args.dataset_id + 1
    if args.n_pool > 0 and pool_id == args.dataset_id:
        fail(f"--pool-id must differ from the labelled dataset id {args.dataset_id}")
    folders = [write_nnunet_dataset(out, args.dataset_id, args.name, args.n_train, args.n_test, args.seed, cfg,
                                    overwrite=args.overwrite, progress=True)]
    if args.nndet_out:
        folders.append(write_nndet_dataset(args.nndet_out, args.dataset_id, args.name, args.n_train, args.n_test,
                                           args.seed, cfg, overwrite=args.overwrite, progress=True))
    if args.n_pool > 0:
        folders.append(write_unlabeled_pool(out, pool_id, args.pool_name, args.n_pool, args.seed, cfg,
                                            args.pool_channels, overwrite=args.overwrite, progress=True))
    return folders


def main(argv: Optional[List[str]] = None) -> None:
    """Console entry point ``nnPre_synth``; user errors print ``error: ...`` and exit with status 2."""
    args = build_parser().parse_args(argv)
    try:
        folders = run(args)
    except NnPreError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    for f in folders:
        print(f)


if __name__ == "__main__":
    main()
