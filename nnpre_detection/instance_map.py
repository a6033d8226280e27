"""Instance-map image of predicted boxes, for viewers (``nnPre_predict --save-instances``).

Boxes follow :mod:`nnpre_detection.instances` (nnDetection's ``min - 1`` / ``max + 1`` convention, voxel
centres at integer coordinates), so the voxels of a box are those with ``lo < i < hi`` on every axis — the
inverse of :func:`~nnpre_detection.instances.boxes_from_instances` for box-shaped objects. Higher-scoring
boxes are painted last, so they win where boxes overlap.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from nnpre_detection.boxes import HI_3D, LO_3D


def boxes_to_instance_map(boxes: np.ndarray, scores: np.ndarray, shape: Sequence[int],
                          min_score: float = 0.5) -> np.ndarray:
    """Paint boxes with ``scores >= min_score`` as filled cuboids.

    Args:
        boxes: (N, 6) array index space, nnDetection layout ``(a0_1, a1_1, a0_2, a1_2, a2_1, a2_2)``.
        scores: (N,) in [0, 1].
        shape: (X, Y, Z) of the image array.
        min_score: score threshold (default 0.5).

    Returns:
        (X, Y, Z) uint16 map: 0 background, k = the k-th best box (1 = highest score) that was kept.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 6)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    out = np.zeros(tuple(int(s) for s in shape), dtype=np.uint16)
    keep = np.flatnonzero(scores >= min_score)
    order = keep[np.argsort(-scores[keep], kind="stable")][: np.iinfo(np.uint16).max]
    for rank in range(len(order) - 1, -1, -1):  # lowest score first, best painted last
        b = boxes[order[rank]]
        sl = []
        for k in range(3):
            lo = max(0, math.floor(b[LO_3D[k]]) + 1)
            hi = min(out.shape[k], math.ceil(b[HI_3D[k]]))
            sl.append(slice(lo, max(lo, hi)))
        out[tuple(sl)] = rank + 1
    return out


def write_instance_map(boxes: np.ndarray, scores: np.ndarray, reference, path: str, min_score: float = 0.5) -> None:
    """Write :func:`boxes_to_instance_map` with the geometry of ``reference`` (a ``SimpleITK.Image``), atomically."""
    import SimpleITK as sitk

    from nnpre.atomic import write_with

    arr = boxes_to_instance_map(boxes, scores, sitk.GetArrayViewFromImage(reference).shape[:3], min_score)
    img = sitk.GetImageFromArray(arr)
    img.CopyInformation(reference)
    write_with(lambda p: sitk.WriteImage(img, p, True), path)
