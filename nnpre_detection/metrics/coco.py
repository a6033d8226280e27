"""COCO-style AP / mAP exactly as nnDetection's ``COCOMetric`` (``nndet/evaluator/detection/coco.py``).

Definition (per class c and IoU threshold t):
    pool the top-``max_detections`` detections of class c of every case, sort by descending score with a
    *stable* sort (score ties keep case order, then rank order), cumulative TP/FP counts,
    ``recall = TP / num_gt``, ``precision = TP / (TP + FP + eps)``, precision made non-increasing from the
    right, sampled at the 101 recall points 0, 0.01, ..., 1 with ``searchsorted(recall, r, 'left')``
    (recall never reached -> precision 0); ``AP_c(t)`` is the mean of the 101 samples.

Quirks reproduced on purpose (each changes numbers):
    * Released nnDetection ran on numpy 1.x, where ``float32_array / int`` and ``float32_array + float64
      scalar`` stay float32. Its cumulative counts are float32, so recall and precision are float32:
      e.g. 3 TPs out of 25 ground-truth boxes give recall ``float32(0.12) = 0.1199999973 < 0.12`` and the
      0.12 recall point is *not* reached at that detection. numpy 2 silently changes this (nnDetection's
      recall and MONAI's precision become float64). ``float_mode="nndet"`` (default) reproduces numpy-1.x
      nnDetection; ``"monai-numpy2"`` reproduces MONAI's port running on numpy >= 2 (recall float32, since
      MONAI casts ``num_gt`` to a Python int, precision float64) - used to cross-check against MONAI.
    * Classes without ground truth keep precision -1 and enter the mean as -1 (nnDetection and MONAI do
      not filter them, unlike pycocotools), both in the overall AP/mAP and in their own per-class keys.
    * Overall AP is one ``np.mean`` over the (IoU, recall point, class) precision array, built in the same
      shape as nnDetection so even the floating-point summation order is the same.

Ignored ground truth (``match_cases(..., gt_ignore=...)``): as nnDetection's/MONAI's ``COCOMetric`` (from
pycocotools), ignored boxes do not count in ``num_gt`` and detections matched to them add neither a TP nor an
FP (they keep their place in the score ranking, where they repeat the previous precision/recall point).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from nnpre_detection.metrics.matching import MAX_DETECTIONS, MatchResult

#: (start, stop, step) of the mAP IoU range (nnDetection ``BoxEvaluator.create``).
IOU_RANGE = (0.1, 0.5, 0.05)
#: IoUs with their own AP key in nnDetection's fast evaluator (training validation, sweeps).
IOU_LIST_FAST = (0.1, 0.5)
#: 101 recall points 0.00, 0.01, ..., 1.00, computed like nnDetection (``np.linspace``).
RECALL_THRESHOLDS = np.linspace(0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1, endpoint=True)
FLOAT_MODES = ("nndet", "monai-numpy2")


def iou_list_full() -> np.ndarray:
    """nnDetection's final-evaluation IoU list ``np.arange(0.1, 1.0, 0.1)`` (note 0.30000000000000004)."""
    return np.arange(0.1, 1.0, 0.1)


def coco_iou_thresholds(iou_list: Sequence[float] = IOU_LIST_FAST,
                        iou_range: Sequence[float] = IOU_RANGE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """IoU thresholds the COCO metric needs, built exactly as nnDetection does.

    Returns:
        thresholds: ``np.union1d(iou_list, linspace(range))``.
        list_idx: indices of ``iou_list`` in ``thresholds``.
        range_idx: indices of the range values in ``thresholds``.
    """
    iou_list = np.array(iou_list, dtype=np.float64)
    rng = np.linspace(iou_range[0], iou_range[1],
                      int(np.round((iou_range[1] - iou_range[0]) / iou_range[2])) + 1, endpoint=True)
    thresholds = np.union1d(iou_list, rng)
    list_idx = np.nonzero(iou_list[:, None] == thresholds[None])[1]
    range_idx = np.nonzero(rng[:, None] == thresholds[None])[1]
    return thresholds, list_idx, range_idx


def _precision_at_recall_points(tp: np.ndarray, fp: np.ndarray, num_gt: int, float_mode: str):
    """tp, fp: (T, R) float32 cumulative counts. Returns (precision (T, 101), recall (T, R), envelope (T, R))."""
    rc = tp / np.float32(num_gt)  # float32 division, like numpy-1.x float32_array / int
    if float_mode == "nndet":
        pr = tp / (fp + tp + np.float32(np.spacing(1)))  # numpy 1.x: the float64 eps is demoted to float32
    else:
        pr = tp.astype(np.float64) / ((fp + tp).astype(np.float64) + np.spacing(1))
    env = np.maximum.accumulate(pr[:, ::-1], axis=1)[:, ::-1] if pr.shape[1] else pr
    n = pr.shape[1]
    out = np.zeros((tp.shape[0], len(RECALL_THRESHOLDS)), dtype=np.float64)
    for t in range(tp.shape[0]):
        idx = np.searchsorted(rc[t].astype(np.float64), RECALL_THRESHOLDS, side="left")
        ok = idx < n
        out[t, ok] = env[t, idx[ok]]
    return out, rc, env


def compute_coco(
    match: MatchResult,
    num_classes: int,
    iou_list: Sequence[float] = IOU_LIST_FAST,
    iou_range: Sequence[float] = IOU_RANGE,
    max_detections: int = MAX_DETECTIONS,
    class_names: Sequence[str] | None = None,
    float_mode: str = "nndet",
    return_curves: bool = False,
):
    """AP per IoU, mAP over the IoU range, and their per-class versions.

    Args:
        match: output of :func:`~nnpre_detection.metrics.matching.match_cases`; must contain every threshold
            of :func:`coco_iou_thresholds` (exact values).
        num_classes: number of classes K (class ids 0..K-1); classes without ground truth count as -1.
        iou_list: IoUs with an ``AP_IoU_{t:.2f}_MaxDet_{m}`` key (default (0.1, 0.5)).
        iou_range: (start, stop, step) of ``mAP_IoU_{start}_{stop}_{step}_MaxDet_{m}``.
        max_detections: detections per case and class (<= the value used for matching).
        class_names: prefix of the per-class keys (default ``str(class index)``).
        float_mode: ``"nndet"`` (released nnDetection, numpy 1.x) or ``"monai-numpy2"`` (see module doc).
        return_curves: also return the per-class precision-recall curves.

    Returns:
        ``{key: float}``; with ``return_curves`` also ``{"pr_curve_IoU_{t:.2f}": {class: {"recall",
        "precision"}}}`` for each IoU of ``iou_list`` (envelope precision at every detection).
    """
    if float_mode not in FLOAT_MODES:
        raise ValueError(f"float_mode must be one of {FLOAT_MODES}, got {float_mode!r}")
    names = [str(c) for c in range(num_classes)] if class_names is None else [str(c) for c in class_names]
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names for {num_classes} classes")
    thresholds, list_idx, range_idx = coco_iou_thresholds(iou_list, iou_range)
    t_src = np.array([match.threshold_index(t) for t in thresholds], dtype=np.int64)

    # -1 marks absent categories, exactly as nnDetection (shape: IoU, recall point, class, max-det setting)
    precision = -np.ones((len(thresholds), len(RECALL_THRESHOLDS), num_classes, 1))
    curves: dict = {f"pr_curve_IoU_{thresholds[i]:.2f}": {} for i in list_idx}

    keep = match.det_rank < max_detections
    order = np.flatnonzero(keep)
    order = order[np.argsort(-match.det_score[order], kind="stable")]  # pooled, stable: case order on ties
    order = order[np.argsort(match.det_class[order], kind="stable")]
    cls_sorted = match.det_class[order]
    regular_gt = match.gt_class[~match.gt_ignored]  # ignored ground truth is no positive
    num_gt_per_class = np.bincount(regular_gt, minlength=num_classes) if regular_gt.size else \
        np.zeros(num_classes, dtype=np.int64)
    for c in range(num_classes):
        num_gt = int(num_gt_per_class[c])
        if num_gt == 0:
            continue  # stays -1
        lo, hi = np.searchsorted(cls_sorted, [c, c + 1])
        sel = order[lo:hi]
        matched = match.det_matched[np.ix_(t_src, sel)]
        ignored = match.det_ignored[np.ix_(t_src, sel)]  # stay in the ranking but count neither way (COCO)
        tp = np.cumsum(matched & ~ignored, axis=1).astype(np.float32)
        fp = np.cumsum(~matched & ~ignored, axis=1).astype(np.float32)
        prec, rc, env = _precision_at_recall_points(tp, fp, num_gt, float_mode)
        precision[:, :, c, 0] = prec
        if return_curves:
            for i in list_idx:
                curves[f"pr_curve_IoU_{thresholds[i]:.2f}"][names[c]] = {
                    "recall": rc[i].astype(np.float64), "precision": env[i].astype(np.float64)}

    results: dict[str, float] = {}
    rng_key = f"mAP_IoU_{iou_range[0]:.2f}_{iou_range[1]:.2f}_{iou_range[2]:.2f}_MaxDet_{max_detections}"
    results[rng_key] = float(np.mean(precision[range_idx][..., -1]))
    for c, name in enumerate(names):
        results[f"{name}_{rng_key}"] = float(np.mean(precision[range_idx][..., c, :][..., -1]))
    for i in list_idx:
        key = f"AP_IoU_{thresholds[i]:.2f}_MaxDet_{max_detections}"
        results[key] = float(np.mean(precision[[i]][..., -1]))
        for c, name in enumerate(names):
            results[f"{name}_{key}"] = float(np.mean(precision[[i]][..., c, :][..., -1]))
    if return_curves:
        return results, curves
    return results
