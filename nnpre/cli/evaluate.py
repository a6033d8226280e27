"""``nnPre_evaluate``: detection metrics identical to nnDetection's, or nnU-Net's Dice, for prediction folders.

Examples::

    nnPre_evaluate det -p preds/ -g nnDet/Task501/raw_splitted/labelsTs -o eval/det.json
    nnPre_evaluate det -p preds/ -g nnUNet_raw/Dataset501_X/labelsTs -o det.json --per-class-froc
    nnPre_evaluate seg -p seg_preds/ -g nnUNet_raw/Dataset501_X/labelsTs -o seg.json
    nnPre_evaluate seg-det -p seg_preds/ -g nnUNet_raw/Dataset501_X/labelsTs -o seg_det.json -l 1
"""
from __future__ import annotations

import argparse
import json

from nnpre.cli._common import ArgumentParser, cli_entry, default_num_processes


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="nnPre_evaluate",
        description="Evaluate predictions: 'det' = FROC and mAP exactly as nnDetection computes them (boxes from "
                    "<case>.json files), 'seg' = Dice/IoU with nnU-Net's own evaluation, 'seg-det' = the same "
                    "detection metrics for a segmentation's connected components.")
    sub = p.add_subparsers(dest="task", required=True)

    det = sub.add_parser("det", help="detection metrics (AP/mAP at IoU 0.1-0.5, FROC)")
    det.add_argument("-p", "--pred", required=True, help="folder with <case>.json predictions")
    det.add_argument("-g", "--gt", required=True,
                     help="ground truth: nnDetection labels (case.nii.gz + case.json), case_boxes_gt.npz files, "
                          "or nnU-Net semantic labels (split into 26-connected instances per class)")
    det.add_argument("-o", "--out", required=True, help="output JSON (plots are written next to it)")
    det.add_argument("-k", "--num-classes", type=int, default=None,
                     help="number of detection classes (default: from dataset.json, else max GT class + 1)")
    det.add_argument("-d", "--dataset-json", default=None,
                     help="dataset.json with the labels (default: looked up in the GT folder and its parent)")
    det.add_argument("--min-size", type=int, default=0,
                     help="semantic GT only: drop components with fewer voxels (default 0)")
    det.add_argument("--missing-as-empty", action="store_true",
                     help="count GT cases without a prediction file as cases with no detections "
                          "(default: error)")
    det.add_argument("--per-class-froc", action="store_true", help="also report FROC per class")
    det.add_argument("--all-ious", action="store_true",
                     help="AP/FROC at IoU 0.1, 0.2, ..., 0.9 (nnDetection final evaluation) instead of 0.1, 0.5")
    det.add_argument("--no-plots", action="store_true", help="do not write the PNG plots")
    ign = det.add_mutually_exclusive_group()
    ign.add_argument("--ignore-csv", default=None,
                     help="LUNA16 annotations_excluded.csv (seriesuid = case id, world mm) as ignore regions: a "
                          "detection matched to such a finding counts neither as TP nor FP (MONAI gt_ignore "
                          "semantics; default: off, nnDetection's numbers)")
    ign.add_argument("--ignore-dir", default=None,
                     help="folder of <case>_ignore.json files ({\"boxes\": [[6 values], ...]}, index space, "
                          "nnDetection layout) used as ignore regions like --ignore-csv")

    seg = sub.add_parser("seg", help="segmentation Dice/IoU via nnU-Net's compute_metrics_on_folder")
    seg.add_argument("-p", "--pred", required=True, help="folder with predicted label maps")
    seg.add_argument("-g", "--gt", required=True, help="folder with reference label maps")
    seg.add_argument("-o", "--out", required=True, help="output JSON (nnU-Net summary.json format)")
    seg.add_argument("-d", "--dataset-json", default=None,
                     help="nnU-Net dataset.json (default: looked up in the GT folder and its parent)")
    seg.add_argument("-l", "--labels", type=int, nargs="+", default=None,
                     help="labels to evaluate without a dataset.json (default: all nonzero labels in the GT)")
    seg.add_argument("--file-ending", default=None, help="file ending without a dataset.json (default: detected)")
    seg.add_argument("-np", "--num-processes", type=int, default=None,
                     help="worker processes (default: nnUNet_def_n_proc or the CPU count)")
    sd = sub.add_parser("seg-det", help="a segmentation scored as detection: connected components as boxes, "
                                         "score = max class probability (nnDetection's nnU-Net import)")
    sd.add_argument("-p", "--pred", required=True, help="folder with predicted label maps")
    sd.add_argument("-g", "--gt", required=True, help="ground truth, as for 'det'")
    sd.add_argument("-o", "--out", required=True, help="output JSON (plots are written next to it)")
    sd.add_argument("--probabilities", default=None,
                    help="folder with nnU-Net's <case>.npz (nnUNetv2_predict --save_probabilities); default: the "
                         "prediction folder if it holds .npz files, else every component scores 1")
    sd.add_argument("-l", "--labels", type=int, nargs="+", default=None,
                    help="label values scored as objects (default: from dataset.json, else all nonzero labels)")
    sd.add_argument("-d", "--dataset-json", default=None, help="dataset.json naming the labels (default: looked up)")
    sd.add_argument("--min-size", type=int, default=0, help="drop predicted components with fewer voxels")
    sd.add_argument("--missing-as-empty", action="store_true",
                    help="count GT cases without a label map as cases with no detections (default: error)")
    sd.add_argument("--boxes-out", default=None, help="also write the boxes as <case>.json files (input of 'det')")
    sd.add_argument("--no-plots", action="store_true", help="do not write the PNG plot")
    return p


def check_output(out: str) -> None:
    """``-o`` must be a file path in a writable folder and must not be an input (a prediction, a ground-truth
    case JSON or a dataset.json); an earlier report at the same path is replaced (evaluations are re-run)."""
    import os

    from nnpre.atomic import check_output_file
    from nnpre.errors import fail

    check_output_file(out, overwrite=True)
    if os.path.isfile(out):
        try:
            with open(out, encoding="utf-8") as f:
                head = json.load(f)
        except (OSError, ValueError, UnicodeDecodeError):
            head = None
        if not (isinstance(head, dict) and ("metrics" in head or "metric_per_case" in head)):
            fail(f"-o {out} exists and is not an earlier evaluation report (it may be a prediction, a ground-truth "
                 f"file or a dataset.json); choose another output file")


def run(args: argparse.Namespace) -> dict:
    """Run the evaluation and print the headline numbers; returns the report."""
    from nnpre_detection.metrics.evaluate import HEADLINE_KEYS, evaluate_detection, evaluate_segmentation

    check_output(args.out)

    if args.task == "det":
        report = evaluate_detection(
            args.pred, args.gt, args.out, num_classes=args.num_classes, dataset_json=args.dataset_json,
            min_size=args.min_size, missing_predictions="empty" if args.missing_as_empty else "error",
            per_class_froc=args.per_class_froc, all_ious=args.all_ious, plots=not args.no_plots,
            ignore=args.ignore_csv or args.ignore_dir)
        info = report["info"]
        print(f"{info['num_cases']} cases, {info['num_gt']} objects, {info['num_predictions']} predictions, "
              f"{info['num_classes']} classes ({info['classes_source']})")
        if "ignore" in info:
            print(f"ignored: {info['ignore']['num_gt_ignored']} regions, predictions on them "
                  f"{info['ignore']['num_predictions_ignored']}")
        for key in HEADLINE_KEYS:
            print(f"{key}: {report['metrics'][key]}")
    elif args.task == "seg-det":
        from nnpre.study.components import evaluate_segmentation_components

        report = evaluate_segmentation_components(
            args.pred, args.gt, args.out, probabilities_folder=args.probabilities, labels=args.labels,
            min_size=args.min_size, missing_predictions="empty" if args.missing_as_empty else "error",
            plots=not args.no_plots, boxes_folder=args.boxes_out, dataset_json=args.dataset_json)
        info = report["info"]
        print(f"{info['num_cases']} cases, {info['num_gt']} objects, {info['num_predictions']} components "
              f"(scores: {'probabilities' if report['probabilities_folder'] else 'all 1'})")
        for key in HEADLINE_KEYS:
            print(f"{key}: {report['metrics'][key]}")
    else:
        report = evaluate_segmentation(
            args.pred, args.gt, args.out, dataset_json=args.dataset_json, labels=args.labels,
            file_ending=args.file_ending,
            num_processes=args.num_processes if args.num_processes is not None else default_num_processes())
        print(f"{len(report['metric_per_case'])} cases; foreground mean: "
              f"{json.dumps({k: float(v) for k, v in report['foreground_mean'].items()})}")
    print(f"wrote {args.out}")
    return report


def _command(args: argparse.Namespace) -> int:
    run(args)
    return 0


_main = cli_entry(_command, build_parser)


def main(argv=None) -> int:
    """Console entry point ``nnPre_evaluate`` (``argv`` for tests); exit status 2 on a user error."""
    return _main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
