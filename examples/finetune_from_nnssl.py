"""Fine-tune your nnU-Net dataset from an nnssl / OpenMind pretrained checkpoint.

Usage::

    python examples/finetune_from_nnssl.py -d 501 --pretrained openmind_mae.pth --root /data/nnunet
    python examples/finetune_from_nnssl.py -d 501 --pretrained mae_encoder.pth --num-train-cases 10 -f 0
    python examples/finetune_from_nnssl.py -d 501 --pretrained enc.pth --preset cpu-tiny --epochs 1 --iterations 2

The dataset is an ordinary labelled nnU-Net raw dataset in ``nnUNet_raw`` (``imagesTr``, ``labelsTr``,
``dataset.json``). The checkpoint may be nnssl's / OpenMind's (``network_weights`` + ``nnssl_adaptation_plan``),
one written by ``nnPre_export`` or ``examples/pretrain_own_folder.py --export``, or an nnpre pretraining
checkpoint. Steps:

1. ``plan_dataset(..., like=CKPT)``: plan and preprocess at the checkpoint's spacing, patch size, architecture
   and widths (same as ``nnPre_plan -d 501 --like CKPT``);
2. the fine-tuning trainer with the pretrained encoder (same as ``nnPre_train finetune -d 501 --pretrained CKPT``):
   decoder-only warm-up, then everything; the stem is remapped when the channel count differs;
3. nnU-Net's validation of the fold (skip with ``--no-validation``).

The run folder is ``nnUNet_results/DatasetXXX/nnPreFineTuneTrainer__<plans>_pt_<checkpoint name>__3d_fullres/fold_F``;
what was loaded is written to ``pretrained_transfer.json`` there (printed at the end).
"""
from __future__ import annotations

import argparse
import json
import os
import re

from nnpre.cli._common import (
    ArgumentParser,
    add_device_argument,
    add_root_argument,
    apply_root,
    cli_entry,
    default_num_processes,
)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-d", "--dataset", required=True, help="dataset id or name in nnUNet_raw")
    p.add_argument("--pretrained", required=True, metavar="CKPT", help="nnssl / OpenMind / nnpre checkpoint")
    p.add_argument("-f", "--fold", default="0", choices=["0", "1", "2", "3", "4", "all"], help="fold (default 0)")
    p.add_argument("--num-train-cases", type=int, default=None, help="use only N labelled training cases")
    p.add_argument("--preset", default=None,
                   help="training length (and fallback geometry) preset: gpu (default) or cpu-tiny")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--iterations", type=int, default=None, help="iterations per epoch")
    p.add_argument("--no-validation", action="store_true", help="skip nnU-Net's final validation")
    p.add_argument("--tag", default=None,
                   help="run variant, part of the plans name (default pt_<checkpoint file name>[_n<N>])")
    add_device_argument(p)
    p.add_argument("-np", "--num-processes", type=int, default=None, help="planning worker processes")
    p.add_argument("--seed", type=int, default=12345)
    add_root_argument(p)
    return p


def run_tag(checkpoint: str, num_train_cases=None) -> str:
    """``pt_<checkpoint file name without .pth>[_n<N>]``: the run folder says which checkpoint it started from."""
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", os.path.basename(checkpoint))
    stem = stem[:-4] if stem.endswith(".pth") else stem
    return f"pt_{stem}" + (f"_n{num_train_cases}" if num_train_cases else "")


def run(args: argparse.Namespace) -> int:
    apply_root(args)
    import torch

    from nnpre.errors import fail
    from nnpre_trainers.finetune_trainer import nnPreFineTuneTrainer
    from nnpre_trainers.run import make_trainer
    from planners.pipeline import plan_dataset

    if not os.path.isfile(args.pretrained):
        fail(f"pretrained checkpoint {args.pretrained} does not exist; pass the .pth file with --pretrained")
    result = plan_dataset(args.dataset, preset=args.preset, like=args.pretrained,
                          num_processes=args.num_processes or default_num_processes())
    print(result.summary())
    if not result.labelled:
        fail(f"dataset {result.dataset_name} has no labelsTr; fine-tuning needs labels (pretrain on it instead)")

    torch.manual_seed(args.seed)
    tag = args.tag or run_tag(args.pretrained, args.num_train_cases)
    trainer = make_trainer(nnPreFineTuneTrainer, args.dataset, result.plans_identifier, fold=args.fold,
                           device=args.device, preset=args.preset, epochs=args.epochs, iterations=args.iterations,
                           variant=tag)
    trainer.configure_finetuning(pretrained=args.pretrained, num_train_cases=args.num_train_cases, tag=tag)
    trainer.run_training()
    if not args.no_validation:
        trainer.perform_actual_validation(False)

    report = os.path.join(trainer.output_folder, "pretrained_transfer.json")
    with open(report, encoding="utf-8") as f:
        rep = json.load(f)
    print(f"run folder: {trainer.output_folder}")
    print(f"transfer report: {report} ({len(rep['loaded'])} keys loaded, {len(rep['remapped'])} remapped, "
          f"{len(rep['missing'])} left at init)")
    return 0


main = cli_entry(run, build_parser)

if __name__ == "__main__":
    main()
