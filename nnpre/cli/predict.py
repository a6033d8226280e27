"""``nnPre_predict``: detect lesions with a trained Retina U-Net; one ``<case>.json`` per case.

Examples::

    nnPre_predict -i imagesTs -o preds \\
        -m RESULTS/Dataset501_X/nnPreDetectionTrainer__nnPreResEncLPlans_scratch__3d_fullres/fold_0
    nnPre_predict -i imagesTs -o preds -m MODEL_DIR --checkpoint checkpoint_best.pth --no-mirror --device cpu
    nnPre_predict -i imagesTs -o preds -m TRAINER_FOLDER -f 0 1 2 3 4    # fold ensemble (TRAINER_FOLDER/fold_*)

Inputs are named as nnU-Net's (``case_0000.nii.gz``, ``case_0001.nii.gz`` for a second channel, ...).
Each JSON holds ``boxes`` (array index space of the input image, nnDetection layout), ``scores``, ``labels``,
``boxes_world`` (mm) and the image geometry; ``nnPre_evaluate`` reads the folder.
"""
from __future__ import annotations

import argparse

from nnpre.cli._common import ArgumentParser, StepSizeAction, add_device_argument, cli_entry


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="nnPre_predict", description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-i", "--input", required=True, help="folder with CASE_0000.nii.gz (CASE_0001, ...) images")
    p.add_argument("-o", "--output", required=True, help="folder for CASE.json predictions (created)")
    p.add_argument("-m", "--model", required=True,
                   help="fold folder of a nnPre_train detect run (or its trainer folder with one fold_*; with -f the "
                        "trainer folder)")
    p.add_argument("-f", "--folds", nargs="+", default=None,
                   help="ensemble these folds of the trainer folder -m (e.g. -f 0 1 2 3 4): one prediction set per "
                        "(fold, mirror variant), merged by weighted box clustering as nnDetection does")
    p.add_argument("-chk", "--checkpoint", default="checkpoint_final.pth",
                   help="checkpoint file name in the fold folder")
    p.add_argument("--no-mirror", "--disable_tta", action="store_true", help="disable test-time mirroring (8x faster)")
    p.add_argument("--overlap", type=float, default=0.5, help="sliding-window tile overlap (default 0.5)")
    p.add_argument("-step_size", dest="overlap", action=StepSizeAction, metavar="S",
                   help="nnU-Net's spelling: tile step as a fraction of the patch (overlap = 1 - S)")
    add_device_argument(p)
    p.add_argument("--save-instances", action="store_true",
                   help="also write CASE_instances.nii.gz: kept boxes as numbered cuboids, for viewers")
    p.add_argument("--instance-min-score", type=float, default=0.5,
                   help="score threshold for --save-instances (default 0.5)")
    return p


IMAGE_ENDINGS = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr")


def check_inputs(in_folder: str, out_folder: str) -> None:
    """Before any model is loaded: every image header in ``in_folder`` is readable, 3-D, with a plausible spacing
    (a 2-D file would otherwise be read by nnU-Net as one slice 999 mm thick and tiled for minutes); ``out_folder``
    is not the input folder and can be written. Voxel contents are checked per case when it is read."""
    import os

    from nnpre.atomic import writable_folder
    from nnpre.dataset_checks import SPACING_RANGE_MM
    from nnpre.errors import fail
    from nnpre.image_io import read_header

    if not os.path.isdir(in_folder):
        fail(f"input folder {in_folder} does not exist")
    if os.path.exists(out_folder):
        if not os.path.isdir(out_folder):
            fail(f"-o {out_folder} is a file; give a folder for the CASE.json predictions")
        if os.path.samefile(in_folder, out_folder):
            fail(f"-o {out_folder} is the input folder; choose another folder so predictions and images stay apart")
    writable_folder(out_folder, "-o")
    for name in sorted(os.listdir(in_folder)):
        if name.startswith(".") or not name.endswith(IMAGE_ENDINGS):
            continue
        path = os.path.join(in_folder, name)
        size, spacing, _, _ = read_header(path)
        if len(size) != 3:
            fail(f"{path} is a {len(size)}-D image (size {list(size)}); the detector works on 3-D volumes. Stack the "
                 f"slices into one 3-D file with its real slice spacing")
        if min(size) < 2:
            fail(f"{path} has a single slice (size {list(size)}); the detector works on 3-D volumes")
        if min(spacing) < SPACING_RANGE_MM[0] or max(spacing) > SPACING_RANGE_MM[1]:
            fail(f"{path} has implausible spacing {tuple(spacing)} mm (allowed {SPACING_RANGE_MM[0]}-"
                 f"{SPACING_RANGE_MM[1]} mm); fix the header (e.g. SimpleITK SetSpacing)")


def run(args: argparse.Namespace) -> int:
    from nnpre_detection.inference import predict_folder
    from nnpre_trainers.run import pick_device

    check_inputs(args.input, args.output)

    written = predict_folder(args.model, args.input, args.output, checkpoint=args.checkpoint,
                             mirror=not args.no_mirror, overlap=args.overlap, device=pick_device(args.device),
                             save_instances=args.save_instances, instance_min_score=args.instance_min_score,
                             folds=args.folds)
    print(f"wrote {len(written)} prediction file(s) to {args.output}")
    return 0


main = cli_entry(run, build_parser)

if __name__ == "__main__":
    main()
