"""Axis-aligned 3D box IoU in nnDetection's box layout, computed exactly as nnDetection's ``box_iou_np``.

Boxes are ``(a0_1, a1_1, a0_2, a1_2, a2_1, a2_2)`` (see :mod:`nnpre_detection.instances`); the volume is
``prod(upper - lower)`` without +1. The arithmetic (operation order, dtype promotion) follows nnDetection so
that IoUs are bit-identical for the same input arrays: nnDetection's final evaluation compares float32
predictions with integer ground-truth boxes, i.e. predicted volumes are formed in float32 and everything
else in float64. :func:`nnpre_detection.metrics.evaluate.evaluate_detection` therefore passes predictions
as float32 and ground truth as float64 (its integer coordinates are exact in float64).
"""
from __future__ import annotations

import numpy as np


def box_volume(boxes: np.ndarray) -> np.ndarray:
    """Volume of each box, ``(a0_2 - a0_1) * (a1_2 - a1_1) * (a2_2 - a2_1)``.

    Args:
        boxes: (N, 6) nnDetection layout.

    Returns:
        (N,) volumes in the dtype of ``boxes``.
    """
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) * (boxes[:, 5] - boxes[:, 4])


def box_iou(boxes1: np.ndarray, boxes2: np.ndarray) -> np.ndarray:
    """Pairwise IoU matrix.

    Args:
        boxes1: (N, 6) nnDetection layout.
        boxes2: (M, 6) nnDetection layout.

    Returns:
        (N, M) IoU in [0, 1] (NaN only if two zero-volume boxes meet).
    """
    boxes1 = np.asarray(boxes1).reshape(-1, 6)
    boxes2 = np.asarray(boxes2).reshape(-1, 6)
    v1, v2 = box_volume(boxes1), box_volume(boxes2)
    lo0 = np.maximum(boxes1[:, None, 0], boxes2[:, 0])
    lo1 = np.maximum(boxes1[:, None, 1], boxes2[:, 1])
    hi0 = np.minimum(boxes1[:, None, 2], boxes2[:, 2])
    hi1 = np.minimum(boxes1[:, None, 3], boxes2[:, 3])
    lo2 = np.maximum(boxes1[:, None, 4], boxes2[:, 4])
    hi2 = np.minimum(boxes1[:, None, 5], boxes2[:, 5])
    inter = np.clip(hi0 - lo0, 0, None) * np.clip(hi1 - lo1, 0, None) * np.clip(hi2 - lo2, 0, None)
    return inter / (v1[:, None] + v2 - inter)


def box_iou_pairs(boxes1: np.ndarray, boxes2: np.ndarray) -> np.ndarray:
    """IoU of corresponding rows, ``iou[i] = IoU(boxes1[i], boxes2[i])``.

    Element for element the same floating-point operations as :func:`box_iou` (so the same values), but
    only for the pairs needed, which keeps matching linear in the number of candidate pairs.

    Args:
        boxes1: (P, 6) nnDetection layout.
        boxes2: (P, 6) nnDetection layout.

    Returns:
        (P,) IoU.
    """
    v1, v2 = box_volume(boxes1), box_volume(boxes2)
    lo0 = np.maximum(boxes1[:, 0], boxes2[:, 0])
    lo1 = np.maximum(boxes1[:, 1], boxes2[:, 1])
    hi0 = np.minimum(boxes1[:, 2], boxes2[:, 2])
    hi1 = np.minimum(boxes1[:, 3], boxes2[:, 3])
    lo2 = np.maximum(boxes1[:, 4], boxes2[:, 4])
    hi2 = np.minimum(boxes1[:, 5], boxes2[:, 5])
    inter = np.clip(hi0 - lo0, 0, None) * np.clip(hi1 - lo1, 0, None) * np.clip(hi2 - lo2, 0, None)
    return inter / (v1 + v2 - inter)
