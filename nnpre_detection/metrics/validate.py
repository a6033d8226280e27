"""Input checks for detection evaluation: a bad input gives a one-line :class:`~nnpre.errors.NnPreError`.

Rules (never a silently wrong number):
    * boxes must be finite, shaped (N, 6) in nnDetection layout, with ``upper >= lower`` on every axis
      (negative extent is an error; zero extent is allowed for predictions, which then match nothing);
    * ground-truth boxes must have positive volume (a zero-volume box could never be matched);
    * scores must be finite and in [0, 1];
    * class ids must be integers in ``[0, num_classes)`` (nnDetection classes start at 0);
    * boxes, scores and labels of one case must have the same length.
"""
from __future__ import annotations

from typing import Callable, Union

import numpy as np

from nnpre.errors import fail

#: Names the source of an error: a fixed text (a file) or a function row index -> text (flattened cases).
Where = Union[str, Callable[[int], str]]


def _at(where: Where, row: int) -> str:
    return where(row) if callable(where) else where


def _as_boxes(boxes, where: Where) -> np.ndarray:
    arr = np.asarray(boxes)
    if arr.size == 0:
        return arr.reshape(0, 6)
    if arr.ndim != 2 or arr.shape[1] != 6:
        fail(f"{_at(where, 0)}: boxes must have shape (N, 6) in layout (a0_1, a1_1, a0_2, a1_2, a2_1, a2_2), "
             f"got {arr.shape}")
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        fail(f"{_at(where, 0)}: boxes must be real numbers, got dtype {arr.dtype}")
    return arr


def _check_extent(boxes: np.ndarray, where: Where, strict: bool) -> None:
    if boxes.size == 0:
        return
    if not np.all(np.isfinite(boxes)):
        row = int(np.flatnonzero(~np.all(np.isfinite(boxes), axis=1))[0])
        fail(f"{_at(where, row)}: box {row} has a non-finite coordinate {boxes[row].tolist()}")
    ext = np.stack([boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1], boxes[:, 5] - boxes[:, 4]], axis=1)
    bad = np.any(ext < 0, axis=1)
    if np.any(bad):
        row = int(np.flatnonzero(bad)[0])
        fail(f"{_at(where, row)}: box {row} {boxes[row].tolist()} has negative extent; expected layout "
             f"(a0_1, a1_1, a0_2, a1_2, a2_1, a2_2) with upper >= lower (MONAI xyzxyz boxes need columns "
             f"[0, 1, 3, 4, 2, 5])")
    if strict:
        flat = np.any(ext <= 0, axis=1)
        if np.any(flat):
            row = int(np.flatnonzero(flat)[0])
            fail(f"{_at(where, row)}: ground-truth box {row} {boxes[row].tolist()} has zero volume and can never be matched")


def _check_classes(classes, n: int, num_classes: int | None, where: Where, what: str) -> np.ndarray:
    arr = np.asarray(classes).reshape(-1) if np.size(classes) else np.zeros(0, dtype=np.int64)
    if len(arr) != n:
        fail(f"{_at(where, 0)}: {n} boxes but {len(arr)} {what}")
    if arr.size == 0:
        return arr.astype(np.int64)
    if not np.issubdtype(arr.dtype, np.integer):
        if not (np.issubdtype(arr.dtype, np.number) and np.all(np.isfinite(arr)) and np.all(np.mod(arr, 1) == 0)):
            bad = ~(np.isfinite(arr) & (np.mod(arr, 1) == 0)) if np.issubdtype(arr.dtype, np.number) else None
            row = int(np.flatnonzero(bad)[0]) if bad is not None and bad.any() else 0
            fail(f"{_at(where, row)}: {what} must be integer class ids, got {arr[row]!r}")
    arr = arr.astype(np.int64)
    if arr.min() < 0:
        row = int(np.argmin(arr))
        fail(f"{_at(where, row)}: negative class id {int(arr[row])} in {what} (nnDetection classes start at 0)")
    if num_classes is not None and arr.max() >= num_classes:
        row = int(np.argmax(arr))
        fail(f"{_at(where, row)}: unknown class id {int(arr[row])} in {what}; the dataset has {num_classes} "
             f"classes (0..{num_classes - 1}); pass the right number of classes")
    return arr


def check_prediction(boxes, scores, labels, num_classes: int | None, where: Where) -> tuple:
    """Validate one case's predictions.

    Args:
        boxes: (N, 6) nnDetection layout.
        scores: (N,) in [0, 1].
        labels: (N,) class ids in [0, num_classes).
        num_classes: number of foreground classes, or None to skip the upper-bound check.
        where: text naming the source (file or case) for error messages, or a function of the offending
            row returning that text (for rows of several cases concatenated).

    Returns:
        (boxes (N, 6), scores (N,), labels (N,) int64) as numpy arrays (input dtypes kept for boxes/scores).
    """
    boxes = _as_boxes(boxes, where)
    _check_extent(boxes, where, strict=False)
    sc = np.asarray(scores).reshape(-1) if np.size(scores) else np.zeros(0, dtype=np.float32)
    if len(sc) != len(boxes):
        fail(f"{_at(where, 0)}: {len(boxes)} boxes but {len(sc)} scores")
    if sc.size:
        if not np.issubdtype(sc.dtype, np.number) or np.issubdtype(sc.dtype, np.complexfloating):
            fail(f"{_at(where, 0)}: scores must be real numbers, got dtype {sc.dtype}")
        bad = ~(np.isfinite(sc) & (sc >= 0) & (sc <= 1))
        if np.any(bad):
            i = int(np.flatnonzero(bad)[0])
            fail(f"{_at(where, i)}: score {i} is {float(sc[i])!r}; scores must be finite probabilities in [0, 1]")
    labels = _check_classes(labels, len(boxes), num_classes, where, "labels")
    return boxes, sc, labels


def check_ground_truth(boxes, classes, num_classes: int | None, where: Where) -> tuple:
    """Validate one case's ground truth (boxes with positive volume, class ids in range).

    Args:
        boxes: (G, 6) nnDetection layout.
        classes: (G,) class ids in [0, num_classes).
        num_classes: number of foreground classes, or None to skip the upper-bound check.
        where: text naming the source, or a function of the offending row returning it.

    Returns:
        (boxes (G, 6), classes (G,) int64).
    """
    boxes = _as_boxes(boxes, where)
    _check_extent(boxes, where, strict=True)
    classes = _check_classes(classes, len(boxes), num_classes, where, "ground-truth classes")
    return boxes, classes
