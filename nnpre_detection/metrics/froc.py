"""FROC exactly as nnDetection's ``FROCMetric`` (``nndet/evaluator/detection/froc.py``).

Definition (per IoU threshold):
    all detections of all classes are pooled (each case's top-100 per class from matching), and
    ``fpr, tpr, thr = sklearn.metrics.roc_curve(matched, scores)`` gives one point per distinct score;
    ``FP/scan = fpr * num_fp / num_images`` and ``sensitivity = tpr * num_tp / num_gt``, where
    ``num_images`` counts every evaluated case (also cases without ground truth or predictions, so negative
    cases lower FROC: nnDetection issue #272). The seven sensitivities are ``np.interp`` at FP/scan
    (1/8, 1/4, 1/2, 1, 2, 4, 8) (linear in FP/scan, clamped at the ends) and the score is their mean.

Quirks reproduced on purpose (each changes numbers):
    * FP/scan is ``(fp / num_fp) * num_fp / num_images`` in float64 (sklearn normalises, nnDetection scales
      back), not ``fp / num_images``; the rounding moves some FP/scan values off the exact sample points
      (e.g. 1/8 may become 0.12499999999999999), which changes the interpolated sensitivity there.
    * No true positive at all -> sklearn's ``tpr`` is NaN -> the curve and score are NaN.
    * No false positive -> FP/scan is set to 0 everywhere -> every sample point gets the final sensitivity.
    * No detections -> the curve is all zeros; no ground truth at all (or nothing in any case) -> score 0
      (nnDetection then reports the key ``froc_score``; we keep the usual key with value 0).
    * Per-class FROC (option) uses the same ``num_images`` for every class; ``mc_FROC_score_IoU_t`` is the
      sum of the per-class scores divided by the number of classes (classes without ground truth add 0).

Ignored ground truth (``match_cases(..., gt_ignore=...)``): as nnDetection's ``FROCMetric`` (and the LUNA16
script ``noduleCADEvaluationLUNA16.py`` with ``bOtherNodulesAsIrrelevant``), detections on ignored objects are
removed from the curve (neither TP nor FP) and ignored objects do not count in ``num_gt``. Difference to LUNA16:
an ignored box absorbs one detection per IoU threshold (COCO one-to-one matching, as nnDetection/MONAI), while
LUNA16 drops every candidate whose centre lies within the excluded finding's radius.
"""
from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
from sklearn.metrics import roc_curve

from nnpre_detection.metrics.matching import MatchResult

#: False positives per scan at which sensitivity is sampled (nnDetection, LUNA16).
FPI_THRESHOLDS = (1 / 8, 1 / 4, 1 / 2, 1, 2, 4, 8)
#: IoUs of nnDetection's fast evaluator; the final evaluation uses ``np.arange(0.1, 1.0, 0.1)``.
FROC_IOUS_FAST = (0.1, 0.5)


def froc_curve(dt_matches: np.ndarray, dt_scores: np.ndarray, num_images: int, num_gt: int):
    """Full FROC curve of one IoU threshold.

    Args:
        dt_matches: (R,) 1 = true positive, 0 = false positive.
        dt_scores: (R,) detection scores.
        num_images: number of evaluated cases.
        num_gt: number of ground-truth boxes (> 0).

    Returns:
        (fp_per_scan, sensitivity, thresholds), each (P,) float64; P = distinct scores + 1 after sklearn's
        collinear-point dropping. Thresholds start with +inf. Empty input gives two zero points.
    """
    dt_matches = np.asarray(dt_matches, dtype=np.float64)
    if dt_matches.size == 0:
        return np.zeros(2), np.zeros(2), np.zeros(2)
    num_matched = np.sum(dt_matches)
    num_unmatched = len(dt_matches) - num_matched
    with warnings.catch_warnings():  # only-TP / only-FP inputs: sklearn warns and returns NaN rates
        warnings.simplefilter("ignore")
        fpr, tpr, thresholds = roc_curve(dt_matches, dt_scores)
    fps = np.zeros(len(fpr)) if num_unmatched == 0 else (fpr * num_unmatched) / num_images
    sens = (tpr * num_matched) / num_gt
    return fps, sens, thresholds


def _froc_one_group(matched: np.ndarray, scores: np.ndarray, thresholds: Sequence[float], num_images: int,
                    num_gt: int, any_result: bool, fpi: Sequence[float], ignored: np.ndarray | None = None):
    out_scores, out_curves, full = {}, {}, {}
    for i, t in enumerate(thresholds):
        if not any_result or num_gt == 0:
            sens_points = np.zeros(len(fpi))
            fps = sens = thr = np.zeros(0)
        elif ignored is not None and ignored[i].any():
            keep = ~ignored[i]  # detections on ignored ground truth leave the curve (nnDetection FROCMetric)
            fps, sens, thr = froc_curve(matched[i][keep], scores[keep], num_images, num_gt)
            sens_points = np.interp(fpi, fps, sens)
        else:
            fps, sens, thr = froc_curve(matched[i], scores, num_images, num_gt)
            sens_points = np.interp(fpi, fps, sens)
        out_scores[f"FROC_score_IoU_{t:.2f}"] = float(np.mean(sens_points))
        out_curves[f"FROC_curve_IoU_{t:.2f}"] = sens_points
        full[f"FROC_full_curve_IoU_{t:.2f}"] = {"fp_per_scan": fps, "sensitivity": sens, "thresholds": thr}
    return out_scores, out_curves, full


def compute_froc(
    match: MatchResult,
    iou_thresholds: Sequence[float] = FROC_IOUS_FAST,
    fpi_thresholds: Sequence[float] = FPI_THRESHOLDS,
    num_classes: int | None = None,
    class_names: Sequence[str] | None = None,
    per_class: bool = False,
):
    """FROC score and curves, pooled over classes (and optionally per class).

    Args:
        match: output of :func:`~nnpre_detection.metrics.matching.match_cases` containing the thresholds.
        iou_thresholds: IoUs to evaluate (exact values present in ``match``).
        fpi_thresholds: FP/scan sample points (default nnDetection's seven).
        num_classes: needed for ``per_class``.
        class_names: prefix of per-class keys (default ``str(class index)``).
        per_class: add ``{class}_FROC_score_IoU_t`` / curves and ``mc_FROC_score_IoU_t``.

    Returns:
        scores ``{"FROC_score_IoU_0.10": float, ...}`` and curves ``{"FROC_curve_IoU_0.10": (7,) sensitivities,
        "FROC_full_curve_IoU_0.10": {"fp_per_scan", "sensitivity", "thresholds"}, "FROC_fpi_thresholds",
        "FROC_num_images", "FROC_num_gt", ...}``.
    """
    t_src = [match.threshold_index(t) for t in iou_thresholds]
    num_images = match.num_cases
    matched = match.det_matched[t_src]
    ignored = match.det_ignored[t_src]
    regular = ~match.gt_ignored
    num_gt = int(np.count_nonzero(regular))
    any_result = match.det_case.size > 0 or match.gt_case.size > 0
    scores, curves, full = _froc_one_group(matched, match.det_score, iou_thresholds, num_images,
                                           num_gt, any_result, fpi_thresholds, ignored)
    curves.update(full)
    curves["FROC_fpi_thresholds"] = list(fpi_thresholds)
    curves["FROC_num_images"] = num_images
    curves["FROC_num_gt"] = num_gt
    if per_class:
        if num_classes is None:
            raise ValueError("per_class FROC needs num_classes")
        names = [str(c) for c in range(num_classes)] if class_names is None else [str(c) for c in class_names]
        totals = {k: 0.0 for k in scores}
        for c, name in enumerate(names):
            d = match.det_class == c
            g = match.gt_class == c
            n_gt = int(np.count_nonzero(g & regular))
            c_scores, c_curves, c_full = _froc_one_group(matched[:, d], match.det_score[d], iou_thresholds,
                                                         num_images, n_gt, bool(d.any() or g.any()), fpi_thresholds,
                                                         ignored[:, d])
            for k, v in c_scores.items():
                scores[f"{name}_{k}"] = v
                totals[k] += v
            curves.update({f"{name}_{k}": v for k, v in c_curves.items()})
            curves.update({f"{name}_{k}": v for k, v in c_full.items()})
            curves[f"{name}_FROC_num_gt"] = n_gt
        for k, v in totals.items():
            scores[f"mc_{k}"] = float(v / len(names))
    return scores, curves
