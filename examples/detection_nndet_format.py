"""Train and evaluate a Retina U-Net detector on a dataset in nnDetection format (e.g. LUNA16).

Usage::

    python examples/detection_nndet_format.py --task-dir /data/nndet/Task016_Luna --root /data/nnunet
    python examples/detection_nndet_format.py --task-dir Task016_Luna -d 516 --pretrained mae_encoder.pth -f 0
    python examples/detection_nndet_format.py --task-dir Task900_Tiny --preset cpu-tiny --epochs 1 --iterations 2 \\
        --no-mirror                                                                          # smoke test

``--task-dir`` is an nnDetection raw task: ``TaskXXX_Name/dataset.json`` (or ``dataset.yaml``) with
``labels`` / ``modalities`` and ``raw_splitted/{imagesTr,labelsTr,imagesTs,labelsTs}`` holding instance maps
``case.nii.gz`` with ``case.json`` = ``{"instances": {"1": 0, ...}}``. Steps, each a public nnpre function:

1. ``nnpre_detection.nndet_import.import_nndet_task``: nnU-Net raw dataset ``DatasetXXX_Name`` with semantic
   labels (class + 1; images symlinked). Touching instances of one class merge there, because the trainer
   re-derives objects as connected components; the evaluation in step 5 uses the original instances;
2. ``plan_dataset``: plan and preprocess (``nnPre_plan -d XXX``);
3. the detection trainer (``nnPre_train detect -d XXX [--pretrained CKPT]``), run folder
   ``nnUNet_results/DatasetXXX_Name/nnPreDetectionTrainer__<plans>_<scratch|pt_CKPTNAME>__3d_fullres/fold_F``;
4. ``nnpre_detection.inference.predict_folder``: one ``<case>.json`` per test image (``nnPre_predict``);
5. ``evaluate_detection`` against the nnDetection ``labelsTs``: FROC, AP@IoU 0.1, mAP (``nnPre_evaluate``).

Predictions and ``detection_metrics.json`` go to ``--out`` (default ``<run folder>/test_predictions``).
"""
from __future__ import annotations

import argparse
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
    p.add_argument("--task-dir", required=True, help="nnDetection task folder TaskXXX_Name")
    p.add_argument("-d", "--dataset-id", type=int, default=None, help="nnU-Net dataset id (default: the task number)")
    p.add_argument("--name", default=None, help="dataset name (default: the task name)")
    p.add_argument("--copy", action="store_true", help="copy the images instead of symlinking them")
    p.add_argument("-pl", "--planner", default="resenc-l", choices=["resenc-l", "plain"])
    p.add_argument("--preset", default=None, help="gpu (default) or cpu-tiny")
    p.add_argument("-f", "--fold", default="0", choices=["0", "1", "2", "3", "4", "all"], help="fold (default 0)")
    p.add_argument("--pretrained", metavar="CKPT", default=None, help="pretrained encoder (nnpre, nnssl, nnU-Net)")
    p.add_argument("--num-train-cases", type=int, default=None, help="use only N labelled training cases")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--iterations", type=int, default=None, help="iterations per epoch")
    p.add_argument("--no-mirror", action="store_true", help="no test-time mirroring (8x faster prediction)")
    p.add_argument("--out", default=None, help="folder for test predictions and metrics")
    add_device_argument(p)
    p.add_argument("-np", "--num-processes", type=int, default=None, help="planning worker processes")
    p.add_argument("--seed", type=int, default=12345)
    add_root_argument(p)
    return p


def run(args: argparse.Namespace) -> int:
    apply_root(args)
    import torch

    from nnpre.nnunet_env import require_env
    from nnpre_detection.inference import predict_folder
    from nnpre_detection.metrics.evaluate import HEADLINE_KEYS, evaluate_detection
    from nnpre_detection.nndet_import import import_nndet_task, load_nndet_dataset_file
    from nnpre_detection.trainer import nnPreDetectionTrainer
    from nnpre_trainers.run import make_trainer, resolve_plans_name
    from planners.pipeline import plan_dataset

    env = require_env("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
    folder = import_nndet_task(args.task_dir, env["nnUNet_raw"], args.dataset_id, name=args.name,
                               link=not args.copy)
    print(f"raw dataset: {folder}")
    dataset = os.path.basename(folder)

    result = plan_dataset(dataset, planner=args.planner, preset=args.preset,
                          num_processes=args.num_processes or default_num_processes())
    print(result.summary())

    torch.manual_seed(args.seed)
    tag = "scratch" if not args.pretrained else "pt_" + re.sub(r"[^A-Za-z0-9_.-]", "_", os.path.basename(
        args.pretrained)).removesuffix(".pth")
    if args.num_train_cases:
        tag += f"_n{args.num_train_cases}"
    trainer = make_trainer(nnPreDetectionTrainer, dataset, resolve_plans_name(args.planner), fold=args.fold,
                           device=args.device, preset=args.preset, epochs=args.epochs, iterations=args.iterations,
                           variant=tag)
    trainer.configure_detection(pretrained=args.pretrained, num_train_cases=args.num_train_cases, tag=tag)
    trainer.run_training()
    print(f"model: {trainer.output_folder}")

    images_ts = os.path.join(folder, "imagesTs")
    labels_ts = os.path.join(os.path.abspath(args.task_dir), "raw_splitted", "labelsTs")
    if not os.path.isdir(images_ts):
        print("no imagesTs in the task: skipping test prediction and evaluation")
        return 0
    out = args.out or os.path.join(trainer.output_folder, "test_predictions")
    pred_dir = os.path.join(out, "boxes")
    written = predict_folder(trainer.output_folder, images_ts, pred_dir, mirror=not args.no_mirror,
                             device=trainer.device)
    print(f"predictions: {len(written)} file(s) in {pred_dir}")
    if not os.path.isdir(labels_ts):
        print("no labelsTs in the task: skipping evaluation")
        return 0
    num_classes = len(load_nndet_dataset_file(os.path.abspath(args.task_dir))["labels"])
    metrics_file = os.path.join(out, "detection_metrics.json")
    report = evaluate_detection(pred_dir, labels_ts, metrics_file, num_classes=num_classes, plots=False)
    for k in HEADLINE_KEYS:
        v = report["metrics"].get(k)
        print(f"  {k}: {'n/a' if v is None else f'{v:.3f}'}")
    print(f"metrics: {metrics_file}")
    return 0


main = cli_entry(run, build_parser)

if __name__ == "__main__":
    main()
