"""``nnPre_predict``: detect lesions with a trained Retina U-Net; one ``<case>.json`` per case.

Examples::

    nnPre_predict -i imagesTs -o preds -m nnUNet_results/Dataset501_X/nnPreDetectionTrainer__nnPreResEncLPlans__3d_fullres__scratch/fold_0
    nnPre_predict -i imagesTs -o preds -m MODEL_DIR --checkpoint checkpoint_best.pth --no-mirror --device cpu
    nnPre_predict -i imagesTs -o preds -m TRAINER_FOLDER -f 0 1 2 3 4    # fold ensemble (TRAINER_FOLDER/fold_*)

Inputs are named as nnU-Net's (``case_0000.nii.gz``, ``case_0001.nii.gz`` for a second channel, ...).
Each JSON holds ``boxes`` (array index space of the input image, nnDetection layout), ``scores``, ``labels``,
``boxes_world`` (mm) and the image geometry; ``nnPre_evaluate`` reads the folder.
"""
from __future__ import annotations

import argparse

from nnpre.cli._common import cli_entry


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nnPre_predict", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-i", "--input", required=True, help="folder with CASE_0000.nii.gz (CASE_0001, ...) images")
    p.add_argument("-o", "--output", required=True, help="folder for CASE.json predictions (created)")
    p.add_argument("-m", "--model", required=True,
                   help="fold folder of a nnPre_train detect run (or its trainer folder with one fold_*; with -f the "
                        "trainer folder)")
    p.add_argument("-f", "--folds", nargs="+", default=None,
                   help="ensemble these folds of the trainer folder -m (e.g. -f 0 1 2 3 4): one prediction set per "
                        "(fold, mirror variant), merged by weighted box clustering as nnDetection does")
    p.add_argument("--checkpoint", default="checkpoint_final.pth", help="checkpoint file name in the fold folder")
    p.add_argument("--no-mirror", action="store_true", help="disable test-time mirroring (8x faster)")
    p.add_argument("--overlap", type=float, default=0.5, help="sliding-window tile overlap (default 0.5)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--save-instances", action="store_true",
                   help="also write CASE_instances.nii.gz: kept boxes as numbered cuboids, for viewers")
    p.add_argument("--instance-min-score", type=float, default=0.5,
                   help="score threshold for --save-instances (default 0.5)")
    return p


def run(args: argparse.Namespace) -> int:
    from nnpre_detection.inference import predict_folder
    from nnpre_trainers.run import pick_device

    written = predict_folder(args.model, args.input, args.output, checkpoint=args.checkpoint,
                             mirror=not args.no_mirror, overlap=args.overlap, device=pick_device(args.device),
                             save_instances=args.save_instances, instance_min_score=args.instance_min_score,
                             folds=args.folds)
    print(f"wrote {len(written)} prediction file(s) to {args.output}")
    return 0


main = cli_entry(run, build_parser)

if __name__ == "__main__":
    main()
