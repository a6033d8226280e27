"""Detection metrics identical to nnDetection's (mAP/AP at IoU thresholds, FROC) plus folder evaluation.

numpy/scipy/sklearn/matplotlib only; no model code. Boxes use nnDetection's layout
``(a0_1, a1_1, a0_2, a1_2, a2_1, a2_2)`` in voxel index space (see :mod:`nnpre_detection.instances`).

Typical use::

    from nnpre_detection.metrics import match_cases, compute_coco, compute_froc, coco_iou_thresholds
    thr, _, _ = coco_iou_thresholds()                      # 0.10, 0.15, ..., 0.50
    match = match_cases(pred_boxes, pred_scores, pred_labels, gt_boxes, gt_classes, thr, num_classes=K)
    ap = compute_coco(match, K)                            # {"AP_IoU_0.10_MaxDet_100": ..., ...}
    froc, curves = compute_froc(match)                     # {"FROC_score_IoU_0.10": ..., ...}
"""
from nnpre_detection.metrics.classes import DetectionClasses, classes_from_dataset_json, resolve_classes
from nnpre_detection.metrics.coco import (
    IOU_LIST_FAST,
    IOU_RANGE,
    RECALL_THRESHOLDS,
    coco_iou_thresholds,
    compute_coco,
    iou_list_full,
)
from nnpre_detection.metrics.evaluate import (
    HEADLINE_KEYS,
    evaluate_boxes,
    evaluate_detection,
    evaluate_segmentation,
    to_json_ready,
)
from nnpre_detection.metrics.froc import FPI_THRESHOLDS, FROC_IOUS_FAST, compute_froc, froc_curve
from nnpre_detection.metrics.io import load_predictions, read_prediction
from nnpre_detection.metrics.iou import box_iou, box_iou_pairs, box_volume
from nnpre_detection.metrics.matching import MAX_DETECTIONS, MatchResult, match_cases, to_results_list
from nnpre_detection.metrics.validate import check_ground_truth, check_prediction

__all__ = [
    "DetectionClasses", "classes_from_dataset_json", "resolve_classes",
    "IOU_LIST_FAST", "IOU_RANGE", "RECALL_THRESHOLDS", "coco_iou_thresholds", "compute_coco", "iou_list_full",
    "HEADLINE_KEYS", "evaluate_boxes", "evaluate_detection", "evaluate_segmentation", "to_json_ready",
    "FPI_THRESHOLDS", "FROC_IOUS_FAST", "compute_froc", "froc_curve",
    "load_predictions", "read_prediction",
    "box_iou", "box_iou_pairs", "box_volume",
    "MAX_DETECTIONS", "MatchResult", "match_cases", "to_results_list",
    "check_ground_truth", "check_prediction",
]
