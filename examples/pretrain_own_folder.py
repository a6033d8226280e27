"""Pretrain an encoder on your own folder of unlabelled images.

Usage::

    python examples/pretrain_own_folder.py -i /data/my_ct_scans -d 800 --root /data/nnunet  # MAE, GPU
    python examples/pretrain_own_folder.py -i /data/my_ct_scans -d 800 -t mg --export mg_encoder.pth
    python examples/pretrain_own_folder.py -i /data/mri -d 801 --channel-suffixes _t1,_t2 --channel-names T1,T2
    python examples/pretrain_own_folder.py -i scans -d 800 --preset cpu-tiny --epochs 1 --iterations 2   # smoke test
    python examples/pretrain_own_folder.py -i $nnssl_raw/Dataset745_X/pretrain_data.json -d 802 --modalities T1w

The input folder holds one image per case (``*.nii.gz``, ``*.nii``, ``*.mha``, ``*.mhd``, ``*.nrrd``; one format
per folder), or one image per case and channel with ``--channel-suffixes`` (``case_t1.nii.gz``,
``case_t2.nii.gz``), or ``-i`` names an nnssl ``pretrain_data.json`` (one case per listed image,
``nnpre.import_nnssl.import_nnssl_collection``). The steps, each a public nnpre function:

1. ``nnpre.import_folder.import_image_folder``: the image-only raw dataset ``nnUNet_raw/DatasetXXX_Name``
   (symlinks to your files unless ``--copy``);
2. ``planners.pipeline.plan_dataset``: fingerprint, plan and preprocess with the nnPre planner
   (same as ``nnPre_plan -d XXX``);
3. the pretraining trainer (same as ``nnPre_train pretrain -d XXX -t mae``), checkpoint in
   ``nnUNet_results/DatasetXXX_Name/nnPreTrainer_<TASK>__<plans>__3d_fullres/fold_all/checkpoint_final.pth``;
4. with ``--export FILE``: the encoder in nnssl/OpenMind format (same as ``nnPre_export --encoder-only``),
   ready for ``examples/finetune_from_nnssl.py --pretrained FILE``; an existing FILE is refused before step 1
   unless ``--overwrite``.
"""
from __future__ import annotations

import argparse
import os

from nnpre.cli._common import (
    ArgumentParser,
    add_device_argument,
    add_root_argument,
    apply_root,
    cli_entry,
    default_num_processes,
)


def _list(s: str):
    return [x.strip() for x in s.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-i", "--input", required=True,
                   help="folder with one image per case, or an nnssl pretrain_data.json")
    p.add_argument("--modalities", type=_list, default=None,
                   help="pretrain_data.json only: keep these modalities (e.g. T1w,FLAIR; default all)")
    p.add_argument("-d", "--dataset-id", type=int, required=True, help="nnU-Net dataset id to create (1-999)")
    p.add_argument("--name", default=None, help="dataset name (default: the input folder's name)")
    p.add_argument("--channel-names", type=_list, default=["CT"],
                   help="channel name(s), comma-separated (default CT)")
    p.add_argument("--channel-suffixes", type=_list, default=None,
                   help="file-name suffixes of the channels, comma-separated, e.g. _t1,_t2 (default: one channel)")
    p.add_argument("--copy", action="store_true", help="copy the images instead of symlinking them")
    p.add_argument("-t", "--task", default="mae", choices=["mae", "mg", "diffusion"], help="pretext task")
    p.add_argument("-pl", "--planner", default="resenc-l", choices=["resenc-l", "plain"])
    p.add_argument("--preset", default=None, help="gpu (default: 1 mm, 128³, 1000 epochs) or cpu-tiny")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--iterations", type=int, default=None, help="iterations per epoch")
    add_device_argument(p)
    p.add_argument("-np", "--num-processes", type=int, default=None, help="planning worker processes")
    p.add_argument("--seed", type=int, default=12345)
    p.add_argument("--export", metavar="FILE", default=None,
                   help="also write the encoder in nnssl format (nnPre_export --encoder-only); an existing FILE is "
                        "refused before any work unless --overwrite")
    p.add_argument("--overwrite", action="store_true", help="replace the --export FILE if it exists")
    add_root_argument(p)
    return p


def run(args: argparse.Namespace) -> int:
    if args.export:  # as nnPre_export: refuse an existing file (or the input) before hours of pretraining
        from nnpre.atomic import check_output_file

        check_output_file(args.export, inputs=[args.input], overwrite=args.overwrite, option="--export")
    apply_root(args)
    import torch

    from nnpre.import_folder import import_image_folder
    from nnpre.nnunet_env import require_env
    from nnpre_trainers.aliases import PRETRAIN_TRAINERS
    from nnpre_trainers.run import make_trainer, resolve_plans_name
    from planners.pipeline import plan_dataset

    env = require_env("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
    if args.input.endswith(".json"):  # an nnssl pretrain_data.json collection
        from nnpre.import_nnssl import import_nnssl_collection

        folder = import_nnssl_collection(args.input, env["nnUNet_raw"], args.dataset_id, name=args.name,
                                         modalities=args.modalities, link=not args.copy)
    else:
        folder = import_image_folder(args.input, env["nnUNet_raw"], args.dataset_id, name=args.name,
                                     channel_name=args.channel_names, channel_suffixes=args.channel_suffixes,
                                     link=not args.copy)
    print(f"raw dataset: {folder}")

    result = plan_dataset(args.dataset_id, planner=args.planner, preset=args.preset,
                          num_processes=args.num_processes or default_num_processes())
    print(result.summary())

    torch.manual_seed(args.seed)
    trainer = make_trainer(PRETRAIN_TRAINERS[args.task], args.dataset_id, resolve_plans_name(args.planner),
                           fold="all", device=args.device, preset=args.preset, epochs=args.epochs,
                           iterations=args.iterations)
    trainer.seed = args.seed
    trainer.run_training()
    checkpoint = os.path.join(trainer.output_folder, "checkpoint_final.pth")
    print(f"pretrained checkpoint: {checkpoint}")

    if args.export:
        from nnpre.checkpoints import read_pretrained
        from nnpre.cli.export import encoder_checkpoint, write_verified

        write_verified(encoder_checkpoint(read_pretrained(checkpoint)), args.export)
        print(f"encoder (nnssl format): {args.export}")
    return 0


main = cli_entry(run, build_parser)

if __name__ == "__main__":
    main()
