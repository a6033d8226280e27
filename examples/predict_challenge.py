"""Predict a challenge test set with a trained detector and write a LUNA16-style submission CSV.

Usage::

    python examples/predict_challenge.py \\
        -m RESULTS/Dataset016_Luna/nnPreDetectionTrainer__nnPreResEncLPlans_scratch__3d_fullres/fold_0 \\
        -i /data/luna16/test_scans -o luna_predictions
    python examples/predict_challenge.py -m MODEL_FOLD -i scans -o preds --csv submission.csv --min-score 0.1 \\
        --no-mirror

``-m`` is the fold folder of a ``nnPre_train detect`` run (or of ``examples/detection_nndet_format.py``).
``-i`` holds the test images either named like nnU-Net (``case_0000.nii.gz``, ``case_0001.nii.gz`` for a second
channel) or one single-channel image per case with any name (``<seriesuid>.mhd``, ``scan.nii.gz``, ``.mha``,
``.nrrd``, ``.nii``); the latter are linked or converted into a temporary folder named like nnU-Net.

Output: ``-o`` gets one ``<case>.json`` per case (``nnpre_detection.inference.predict_folder``, the code of
``nnPre_predict``: boxes, scores, labels, ``boxes_world`` in mm) and ``submission.csv`` (or ``--csv``) with
``seriesuid,coordX,coordY,coordZ,probability``: one row per detected box (score >= ``--min-score``), the box
centre in world coordinates (mm, the images' physical space as SimpleITK reads it, i.e. LUNA16's). The CSV
is written atomically. Segmentation models are predicted with nnU-Net's own ``nnUNetv2_predict``.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import tempfile

from nnpre.cli._common import ArgumentParser, add_device_argument, add_root_argument, apply_root, cli_entry

CSV_HEADER = ("seriesuid", "coordX", "coordY", "coordZ", "probability")
#: nnU-Net naming, any ending SimpleITK reads.
NNUNET_NAME_RE = re.compile(r"^(?P<case>.+)_(?P<ch>\d{4})(?P<ending>\.nii\.gz|\.nii|\.mha|\.mhd|\.nrrd)$")


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--model", required=True, help="fold folder of a nnPre_train detect run")
    p.add_argument("-i", "--input", required=True, help="folder with the test images")
    p.add_argument("-o", "--output", required=True, help="folder for <case>.json predictions (created)")
    p.add_argument("--csv", default=None, help="submission CSV (default OUTPUT/submission.csv)")
    p.add_argument("--min-score", type=float, default=0.0, help="drop boxes scoring below this (default 0)")
    p.add_argument("--checkpoint", default="checkpoint_final.pth", help="checkpoint file in the fold folder")
    p.add_argument("--no-mirror", action="store_true", help="no test-time mirroring (8x faster)")
    p.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap (default 0.5)")
    add_device_argument(p)
    add_root_argument(p)
    return p


def stage_inputs(in_folder: str, num_channels: int, file_ending: str, staging: str) -> str:
    """The folder to predict: ``in_folder`` itself when its files are nnU-Net-named with the model's ending,
    else ``staging`` filled with ``<case>_<channel>`` links (same ending) or conversions (other endings)."""
    import SimpleITK as sitk

    from nnpre.errors import fail
    from nnpre.import_folder import image_ending, place_file

    if not os.path.isdir(in_folder):
        fail(f"input folder {in_folder} does not exist")
    files = sorted(f for f in os.listdir(in_folder) if not f.startswith(".") and image_ending(f)
                   and os.path.isfile(os.path.join(in_folder, f)))
    if not files:
        fail(f"{in_folder} holds no images (.nii.gz, .nii, .mha, .mhd, .nrrd)")
    named = [NNUNET_NAME_RE.match(f) for f in files]
    if all(named) and all(m.group("ending") == file_ending for m in named):
        return in_folder
    if all(named):
        targets = {f: f"{m.group('case')}_{m.group('ch')}{file_ending}" for f, m in zip(files, named)}
    else:
        if num_channels != 1:
            fail(f"the model expects {num_channels} channels: name the images in {in_folder} CASE_0000{file_ending}, "
                 f"CASE_0001{file_ending}, ...")
        targets = {f: f"{f[: -len(image_ending(f))]}_0000{file_ending}" for f in files}
    os.makedirs(staging, exist_ok=True)
    for f, t in targets.items():
        src, dst = os.path.join(in_folder, f), os.path.join(staging, t)
        if image_ending(f) == file_ending:
            place_file(src, dst, link=True)
        else:
            try:
                sitk.WriteImage(sitk.ReadImage(src), dst, True)
            except RuntimeError:
                fail(f"cannot read {src}: not a readable image (corrupt file or missing data file); fix or remove it")
    return staging


def write_submission(pred_files, csv_path: str, min_score: float = 0.0) -> int:
    """Write the LUNA16 CSV from prediction JSONs (atomically); returns the number of rows."""
    from nnpre.atomic import write_with

    rows = []
    for p in sorted(pred_files):
        with open(p, encoding="utf-8") as f:
            d = json.load(f)
        for box, score in sorted(zip(d["boxes_world"], d["scores"]), key=lambda bs: -bs[1]):
            if score < min_score:
                continue
            centre = [(box[k] + box[k + 3]) / 2.0 for k in range(3)]
            rows.append([d["case"], *(f"{c:.3f}" for c in centre), f"{score:.6f}"])

    def writer(tmp: str) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(CSV_HEADER)
            w.writerows(rows)

    write_with(writer, csv_path)
    return len(rows)


def run(args: argparse.Namespace) -> int:
    apply_root(args)
    from nnpre.checkpoints import safe_load
    from nnpre_detection.inference import find_checkpoint, predict_folder
    from nnpre_trainers.run import pick_device

    info = safe_load(find_checkpoint(args.model, args.checkpoint)).get("nnpre_detection") or {}
    num_channels = int(info.get("num_input_channels", 1))
    file_ending = (info.get("dataset_json") or {}).get("file_ending", ".nii.gz")
    os.makedirs(args.output, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".inputs_", dir=args.output)
    try:
        in_folder = stage_inputs(os.path.abspath(args.input), num_channels, file_ending, staging)
        written = predict_folder(args.model, in_folder, args.output, checkpoint=args.checkpoint,
                                 mirror=not args.no_mirror, overlap=args.overlap, device=pick_device(args.device))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    csv_path = args.csv or os.path.join(args.output, "submission.csv")
    n = write_submission(written, csv_path, args.min_score)
    print(f"{len(written)} case(s) predicted into {args.output}; {n} candidate(s) in {csv_path}")
    return 0


main = cli_entry(run, build_parser)

if __name__ == "__main__":
    main()
