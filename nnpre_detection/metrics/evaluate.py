"""Folder-level evaluation: detection metrics (nnDetection-identical) and segmentation Dice (nnU-Net's own).

Detection (:func:`evaluate_detection`): prediction JSON files (``<case>.json``, see
:mod:`nnpre_detection.metrics.io`) against ground truth from nnDetection raw labels, nnDetection
``_boxes_gt.npz`` files, or nnU-Net semantic labels (see :func:`nnpre_detection.instances.load_ground_truth`).
Cases are evaluated in sorted case-id order (the order decides score ties in AP; nnDetection uses the
directory listing order). Headline keys: ``AP_IoU_0.10_MaxDet_100`` (paper metric),
``mAP_IoU_0.10_0.50_0.05_MaxDet_100`` (model selection), ``FROC_score_IoU_0.10``.

Rules for inconsistent folders: a prediction without ground truth is an error; a ground-truth case without
a prediction file is an error unless ``missing_predictions="empty"`` (then it counts as a case with no
detections: its objects are missed and it still counts as a scan in FROC).

Segmentation (:func:`evaluate_segmentation`): nnU-Net's ``compute_metrics_on_folder`` (Dice, IoU, TP/FP/FN
per label, mean and foreground mean), after checking that both folders hold the same cases.
"""
from __future__ import annotations

import math
import os
from typing import Mapping, Sequence

import numpy as np

from nnpre.atomic import write_json, write_with
from nnpre.errors import fail
from nnpre.image_io import allowed_label_values
from nnpre_detection.instances import load_ground_truth
from nnpre_detection.metrics.classes import DetectionClasses, resolve_classes
from nnpre_detection.metrics.coco import IOU_LIST_FAST, IOU_RANGE, coco_iou_thresholds, compute_coco, iou_list_full
from nnpre_detection.metrics.froc import FPI_THRESHOLDS, compute_froc
from nnpre_detection.metrics.io import load_predictions
from nnpre_detection.metrics.matching import MAX_DETECTIONS, match_cases
from nnpre_detection.metrics.validate import (
    as_boxes,
    check_ground_truth,
    check_prediction,
    check_prediction_geometry,
    check_segmentation_pairs,
    check_semantic_labels_declared,
)

HEADLINE_KEYS = ("AP_IoU_0.10_MaxDet_100", "mAP_IoU_0.10_0.50_0.05_MaxDet_100", "FROC_score_IoU_0.10")


def to_json_ready(obj):
    """Recursively convert numpy values to Python; NaN and +-inf become None (strict JSON)."""
    if isinstance(obj, Mapping):
        return {str(k): to_json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_json_ready(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_json_ready(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _per_case_counts(match, case_ids: Sequence[str], n_pred: Mapping[str, int], iou: float,
                     with_ignore: bool = False) -> dict:
    t = match.threshold_index(iou)
    n = len(case_ids)
    tp = np.bincount(match.det_case[match.det_true_positive[t]], minlength=n)
    fp = np.bincount(match.det_case[match.det_false_positive[t]], minlength=n)
    regular = ~match.gt_ignored  # ignored ground truth (gt_ignore) is neither found nor missed
    n_gt = np.bincount(match.gt_case[regular], minlength=n)
    found = np.bincount(match.gt_case[match.gt_matched[t] & regular], minlength=n)
    out = {c: {"num_gt": int(n_gt[i]), "num_pred": int(n_pred[c]), f"tp_IoU_{iou:.2f}": int(tp[i]),
               f"fp_IoU_{iou:.2f}": int(fp[i]), f"fn_IoU_{iou:.2f}": int(n_gt[i] - found[i])}
           for i, c in enumerate(case_ids)}
    if with_ignore:
        n_ign = np.bincount(match.gt_case[~regular], minlength=n)
        d_ign = np.bincount(match.det_case[match.det_ignored[t]], minlength=n)
        for i, c in enumerate(case_ids):
            out[c].update({"num_gt_ignored": int(n_ign[i]), f"ignored_pred_IoU_{iou:.2f}": int(d_ign[i])})
    return out


def evaluate_boxes(
    predictions: Mapping[str, Mapping[str, np.ndarray]],
    ground_truth: Mapping[str, Mapping[str, np.ndarray]],
    classes: DetectionClasses | int | None = None,
    iou_list: Sequence[float] = IOU_LIST_FAST,
    per_class_froc: bool = False,
    max_detections: int = MAX_DETECTIONS,
    float_mode: str = "nndet",
    missing_predictions: str = "error",
    pred_source: str = "predictions",
    gt_source: str = "ground truth",
    ignore: Mapping[str, Mapping[str, np.ndarray]] | None = None,
) -> dict:
    """All detection metrics for in-memory predictions and ground truth.

    Args:
        predictions: ``{case: {"boxes" (N, 6), "scores" (N,), "labels" (N,)}}`` in nnDetection box layout.
        ground_truth: ``{case: {"boxes" (G, 6), "classes" (G,)}}``.
        classes: class set or number of classes K; None = ``max ground-truth class + 1``.
        iou_list: IoUs with their own AP and FROC keys (default (0.1, 0.5) = nnDetection fast evaluator;
            :func:`~nnpre_detection.metrics.coco.iou_list_full` = its final evaluation).
        per_class_froc: also compute FROC per class (and its class mean ``mc_FROC_score_IoU_t``).
        max_detections: detections per case and class (nnDetection: 100).
        float_mode: see :mod:`nnpre_detection.metrics.coco`.
        missing_predictions: ``"error"`` or ``"empty"`` for ground-truth cases without predictions.
        pred_source, gt_source: folder names for error messages.
        ignore: optional ignore regions ``{case: {"boxes" (K, 6), "classes" (K,)}}`` (e.g. LUNA16's excluded
            findings, :mod:`nnpre_detection.metrics.ignore`): ignored ground truth with COCO/MONAI ``gt_ignore``
            semantics (a detection on one is neither TP nor FP; it is no positive). None (default) = nnDetection's
            numbers; then the report has no ignore keys.

    Returns:
        ``{"metrics": {key: float}, "froc": {...}, "pr_curves": {...}, "per_case": {...}, "info": {...}}``
        (numpy arrays inside; see :func:`to_json_ready`).
    """
    if missing_predictions not in ("error", "empty"):
        raise ValueError(f"missing_predictions must be 'error' or 'empty', got {missing_predictions!r}")
    extra = sorted(set(predictions) - set(ground_truth))
    if extra:
        fail(f"{pred_source}: predictions for {len(extra)} case(s) without ground truth in {gt_source}: "
             f"{extra[:5]}{' ...' if len(extra) > 5 else ''}; remove them or add their labels")
    missing = sorted(set(ground_truth) - set(predictions))
    if missing and missing_predictions == "error":
        fail(f"{pred_source}: no prediction for {len(missing)} ground-truth case(s): {missing[:5]}"
             f"{' ...' if len(missing) > 5 else ''}; predict them or pass --missing-as-empty to count them as "
             f"cases without detections")
    case_ids = sorted(ground_truth)
    if not case_ids:
        fail(f"{gt_source}: no cases to evaluate")

    if isinstance(classes, (int, np.integer)):
        classes = DetectionClasses(int(classes), tuple(str(i) for i in range(int(classes))), "explicit")
    known = None if classes is None else classes.num_classes
    empty_pred = {"boxes": np.zeros((0, 6), np.float32), "scores": np.zeros(0, np.float32),
                  "labels": np.zeros(0, np.int64)}
    if ignore is not None:
        stray = sorted(set(ignore) - set(ground_truth))
        if stray:
            fail(f"ignore regions for {len(stray)} case(s) without ground truth in {gt_source}: {stray[:5]}; "
                 f"remove them or add their labels")
    pb, ps, pl, gb, gl, n_pred, g_ign = [], [], [], [], [], {}, []
    for c in case_ids:
        p = predictions.get(c, empty_pred)
        b, s, l_ = check_prediction(p["boxes"], p["scores"], p["labels"], known, f"{pred_source}/{c}.json")
        g = ground_truth[c]
        gbx, gcl = check_ground_truth(g["boxes"], g["classes"], known, f"{gt_source} case {c}")
        pb.append(b), ps.append(s), pl.append(l_), gb.append(np.asarray(gbx, dtype=np.float64)), gl.append(gcl)
        n_pred[c] = len(b)
        if ignore is not None and c in ignore:
            ib = as_boxes(ignore[c]["boxes"], f"ignore regions of case {c}")
            ib, ic = check_ground_truth(ib, ignore[c].get("classes", np.zeros(len(ib), np.int64)), known,
                                        f"ignore regions of case {c}")
            g_ign.append((np.asarray(ib, dtype=np.float64), ic))
        elif ignore is not None:
            g_ign.append((np.zeros((0, 6)), np.zeros(0, np.int64)))
    if classes is None:
        k = max([int(g.max()) for g in gl if g.size] + [0]) + 1
        classes = DetectionClasses(k, tuple(str(i) for i in range(k)), "inferred from ground truth (max class + 1)")
        too_big = [(c, int(l_.max())) for c, l_ in zip(case_ids, pl) if l_.size and l_.max() >= k]
        if too_big:
            fail(f"{pred_source}/{too_big[0][0]}.json: unknown class id {too_big[0][1]}: the ground truth only has "
                 f"classes 0..{k - 1}; pass the number of classes (or a dataset.json) to evaluate it")
    k = classes.num_classes
    gt_ignore = None
    if ignore is not None:  # ignore boxes go after each case's regular ground truth, flagged
        bad = [(c, int(ic.max())) for c, (_, ic) in zip(case_ids, g_ign) if ic.size and ic.max() >= k]
        if bad:
            fail(f"ignore regions of case {bad[0][0]}: class id {bad[0][1]} but the evaluation has classes "
                 f"0..{k - 1}; give the ignore boxes a class of the dataset")
        gt_ignore = [np.r_[np.zeros(len(g), bool), np.ones(len(ic), bool)] for g, (_, ic) in zip(gl, g_ign)]
        gb = [np.concatenate([g, ib]) for g, (ib, _) in zip(gb, g_ign)]
        gl = [np.concatenate([g, ic]).astype(np.int64) for g, (_, ic) in zip(gl, g_ign)]

    iou_list = tuple(float(t) for t in iou_list)
    coco_thr, _, _ = coco_iou_thresholds(iou_list, IOU_RANGE)
    thresholds = np.union1d(coco_thr, np.asarray(iou_list, dtype=np.float64))
    match = match_cases(pb, ps, pl, gb, gl, thresholds, max_detections=max_detections, num_classes=k,
                        validate=False, gt_ignore=gt_ignore)
    index_names = [str(i) for i in range(k)]
    ap, pr_curves = compute_coco(match, k, iou_list=iou_list, iou_range=IOU_RANGE, max_detections=max_detections,
                                 class_names=index_names, float_mode=float_mode, return_curves=True)
    froc_scores, froc_curves = compute_froc(match, iou_thresholds=iou_list, fpi_thresholds=FPI_THRESHOLDS,
                                            num_classes=k, class_names=index_names, per_class=per_class_froc)
    everything = {**ap, **froc_scores}
    metrics = {key: everything[key] for key in HEADLINE_KEYS if key in everything}
    metrics.update({key: v for key, v in everything.items() if key not in metrics})
    return {
        "metrics": metrics,
        "froc": froc_curves,
        "pr_curves": pr_curves,
        "per_case": _per_case_counts(match, case_ids, n_pred, iou_list[0], with_ignore=ignore is not None),
        "info": {
            "num_cases": len(case_ids),
            "cases_without_prediction_file": missing,
            "num_gt": int(np.count_nonzero(~match.gt_ignored)),
            "num_predictions": int(sum(n_pred.values())),
            "num_predictions_evaluated": int(match.det_case.size),
            "num_classes": k,
            "class_names": dict(zip(index_names, classes.names or index_names)),
            "classes_source": classes.source,
            "iou_list": list(iou_list),
            "iou_range": list(IOU_RANGE),
            "max_detections": max_detections,
            "fpi_thresholds": list(FPI_THRESHOLDS),
            "float_mode": float_mode,
            "box_layout": "(a0_1, a1_1, a0_2, a1_2, a2_1, a2_2) voxel indices of the GetArrayFromImage array",
            **({} if ignore is None else {"ignore": {
                "num_gt_ignored": int(np.count_nonzero(match.gt_ignored)),
                "num_cases_with_ignored_gt": int(np.unique(match.gt_case[match.gt_ignored]).size),
                "num_predictions_ignored": {f"IoU_{t:.2f}": int(match.det_ignored[match.threshold_index(t)].sum())
                                            for t in iou_list},
                "semantics": "COCO/MONAI gt_ignore: a detection may take an ignored box only when no regular box "
                             "is available; it then counts neither as TP nor FP; ignored boxes are no positives"}}),
        },
    }


def _case_geometry(preds: Mapping, gt_folder: str, case: str) -> dict | None:
    """Image geometry of a case (SimpleITK order): its prediction JSON's, else its ground-truth image header."""
    geo = (preds.get(case) or {}).get("geometry") or {}
    if all(geo.get(k) is not None for k in ("spacing", "origin", "direction")):
        return geo
    from nnpre.image_io import read_header
    from nnpre_detection.metrics.validate import _gt_label_file

    label = _gt_label_file(gt_folder, case)
    if label is None:
        return None
    _, spacing, origin, direction = read_header(label)
    return {"spacing": spacing, "origin": origin, "direction": direction}


def evaluate_detection(
    pred_folder: str,
    gt_folder: str,
    output_file: str | None = None,
    num_classes: int | None = None,
    dataset_json: str | None = None,
    min_size: int = 0,
    missing_predictions: str = "error",
    per_class_froc: bool = False,
    all_ious: bool = False,
    plots: bool = True,
    float_mode: str = "nndet",
    ignore: str | Mapping | None = None,
    ignore_margin: float | None = None,
) -> dict:
    """Evaluate a folder of prediction JSON files against a ground-truth folder.

    Args:
        pred_folder: folder with ``<case>.json`` predictions.
        gt_folder: nnDetection labels (``case.nii.gz`` + ``case.json``), ``case_boxes_gt.npz`` files, or nnU-Net
            semantic labels.
        output_file: JSON report path (written atomically); plots go next to it as ``<stem>_froc.png`` and
            ``<stem>_pr.png``. None = only return the report.
        num_classes: number of classes; default from ``dataset_json`` (given, or found in ``gt_folder`` or its
            parent), else ``max ground-truth class + 1``.
        dataset_json: nnDetection or nnU-Net dataset.json with the labels.
        min_size: semantic labels only: drop connected components with fewer voxels (default 0).
        missing_predictions: ``"error"`` (default) or ``"empty"``.
        per_class_froc: add per-class FROC.
        all_ious: AP/FROC keys at nnDetection's final-evaluation IoUs ``np.arange(0.1, 1.0, 0.1)`` instead of
            (0.1, 0.5).
        plots: write the PNG plots (needs ``output_file``).
        float_mode: see :mod:`nnpre_detection.metrics.coco`.
        ignore: ignore regions (default None = off, nnDetection's numbers): LUNA16's ``annotations_excluded.csv``
            (world mm; placed with the geometry of each case's prediction JSON, else of its ground-truth image), a
            folder of ``<case>_ignore.json`` index-space boxes, or ``{case: {"boxes", "classes"}}``; see
            :mod:`nnpre_detection.metrics.ignore`.
        ignore_margin: voxels added around each CSV sphere (default
            :data:`~nnpre_detection.metrics.ignore.DEFAULT_MARGIN` = 1, nnDetection's box convention).

    Returns:
        The report (JSON-ready: NaN/inf as None).
    """
    check_semantic_labels_declared(gt_folder, dataset_json)  # label values dataset.json does not declare
    classes = resolve_classes(num_classes, dataset_json, gt_folder)
    semantic = None if classes is None else classes.semantic_labels
    gt = load_ground_truth(gt_folder, min_size=min_size, semantic_classes=semantic)
    preds = load_predictions(pred_folder)
    check_prediction_geometry(preds, gt_folder, pred_folder)  # same image grid as the ground truth
    ignore_info = None
    if isinstance(ignore, (str, os.PathLike)):
        from nnpre_detection.metrics.ignore import DEFAULT_MARGIN, load_ignore

        ignore, ignore_info = load_ignore(
            os.fspath(ignore), sorted(gt), lambda case: _case_geometry(preds, gt_folder, case),
            DEFAULT_MARGIN if ignore_margin is None else float(ignore_margin))
    report = evaluate_boxes(preds, gt, classes, iou_list=iou_list_full() if all_ious else IOU_LIST_FAST,
                            per_class_froc=per_class_froc, missing_predictions=missing_predictions,
                            float_mode=float_mode, pred_source=pred_folder, gt_source=gt_folder, ignore=ignore)
    if ignore_info is not None:
        report["info"]["ignore"].update(ignore_info)
    report = {"task": "detection", "prediction_folder": os.path.abspath(pred_folder),
              "ground_truth_folder": os.path.abspath(gt_folder), **report}
    if output_file is not None:
        stem = output_file[:-5] if output_file.endswith(".json") else output_file
        if plots:
            from nnpre_detection.metrics.plots import plot_froc, plot_precision_recall

            ious = report["info"]["iou_list"]
            plot_froc(report["froc"], ious[:2], FPI_THRESHOLDS, stem + "_froc.png",
                      title=f"FROC ({report['info']['num_cases']} scans, {report['info']['num_gt']} objects)")
            plot_precision_recall({key: v for key, v in report["pr_curves"].items()
                                   if key.endswith(tuple(f"{t:.2f}" for t in ious[:2]))},
                                  report["metrics"], stem + "_pr.png")
            report["plots"] = [stem + "_froc.png", stem + "_pr.png"]
        report = to_json_ready(report)
        write_json(report, output_file)
        return report
    return to_json_ready(report)


# ---------------------------------------------------------------------------------------------- segmentation
SEG_ENDINGS = (".nii.gz", ".nii", ".mha", ".nrrd", ".png", ".tif", ".tiff", ".bmp")


def _cases(folder: str, ending: str) -> dict[str, str]:
    return {n[: -len(ending)]: n for n in sorted(os.listdir(folder)) if n.endswith(ending) and not n.startswith(".")}


def evaluate_segmentation(
    pred_folder: str,
    gt_folder: str,
    output_file: str | None = None,
    dataset_json: str | None = None,
    labels: Sequence[int] | None = None,
    file_ending: str | None = None,
    num_processes: int = 1,
) -> dict:
    """Dice/IoU per label with nnU-Net's ``compute_metrics_on_folder`` (reused, not reimplemented).

    Args:
        pred_folder: predicted label maps.
        gt_folder: reference label maps (nnU-Net ``labelsTr`` style).
        output_file: JSON report (written atomically, nnU-Net's ``summary.json`` format).
        dataset_json: nnU-Net dataset.json (labels, regions, ignore label, file ending); default found in
            ``gt_folder`` or its parent.
        labels: foreground labels to evaluate when there is no dataset.json (default: every nonzero value
            in the reference files).
        file_ending: file ending when there is no dataset.json (default: detected from ``gt_folder``).
        num_processes: worker processes of nnU-Net's pool.

    Returns:
        nnU-Net's result ``{"metric_per_case", "mean", "foreground_mean"}`` plus ``"task"``.
    """
    import json

    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder, save_summary_json
    from nnunetv2.imageio.reader_writer_registry import (
        determine_reader_writer_from_dataset_json,
        determine_reader_writer_from_file_ending,
    )
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    from nnpre_detection.metrics.classes import find_dataset_json

    for folder, what in ((pred_folder, "prediction"), (gt_folder, "reference")):
        if not os.path.isdir(folder):
            fail(f"{what} folder {folder} does not exist")
    if dataset_json is None and labels is None:
        dataset_json = find_dataset_json(gt_folder)
    ds = None
    if dataset_json is not None:
        try:
            with open(dataset_json, encoding="utf-8") as f:
                ds = json.load(f)
            file_ending = file_ending or ds["file_ending"]
            lm = LabelManager(ds["labels"], ds.get("regions_class_order"))
        except (OSError, ValueError, KeyError, TypeError, AssertionError) as e:
            fail(f"{dataset_json}: not a usable nnU-Net dataset.json ({type(e).__name__}: {e})")
        regions_or_labels = lm.foreground_regions if lm.has_regions else [int(v) for v in lm.foreground_labels]
        ignore_label = lm.ignore_label
    if file_ending is None:
        names = [n for n in os.listdir(gt_folder) if not n.startswith(".")]
        file_ending = next((e for e in SEG_ENDINGS if any(n.endswith(e) for n in names)), None)
        if file_ending is None:
            fail(f"{gt_folder}: no label files with a known ending {SEG_ENDINGS}")
    ref, pred = _cases(gt_folder, file_ending), _cases(pred_folder, file_ending)
    if not ref:
        fail(f"{gt_folder}: no reference files ending in {file_ending}")
    if set(pred) - set(ref):
        extra = sorted(set(pred) - set(ref))
        fail(f"{pred_folder}: predictions without reference in {gt_folder}: {extra[:5]}")
    if set(ref) - set(pred):
        miss = sorted(set(ref) - set(pred))
        fail(f"{pred_folder}: no prediction for {len(miss)} reference case(s): {miss[:5]}"
             f"{' ...' if len(miss) > 5 else ''}")
    if int(num_processes) < 1:
        fail(f"-np / num_processes must be >= 1, got {num_processes}")
    check_segmentation_pairs({c: (os.path.join(gt_folder, ref[c]), os.path.join(pred_folder, pred[c])) for c in ref},
                             allowed_labels=allowed_label_values(ds["labels"]) if ds is not None else None,
                             label_source=str(dataset_json))
    example = os.path.join(gt_folder, next(iter(ref.values())))
    if ds is not None:
        rw = determine_reader_writer_from_dataset_json(ds, example, verbose=False)()
    else:
        rw = determine_reader_writer_from_file_ending(file_ending, example, allow_nonmatching_filename=True,
                                                      verbose=False)()
        ignore_label = None
        if labels is None:
            found = set()
            for name in ref.values():
                seg, _ = rw.read_seg(os.path.join(gt_folder, name))
                found.update(int(v) for v in np.unique(seg))
            labels = sorted(v for v in found if v > 0)
            if not labels:
                fail(f"{gt_folder}: reference files contain only background; pass the labels to evaluate")
        regions_or_labels = [int(v) for v in labels]
    result = compute_metrics_on_folder(gt_folder, pred_folder, None, rw, file_ending, regions_or_labels,
                                       ignore_label=ignore_label, num_processes=max(1, int(num_processes)),
                                       chill=False)
    if output_file is not None:
        write_with(lambda tmp: save_summary_json(result, tmp), output_file)
    return {"task": "segmentation", **result}
