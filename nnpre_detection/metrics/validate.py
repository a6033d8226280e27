"""Input checks for detection evaluation: a bad input gives a one-line :class:`~nnpre.errors.NnPreError`.

Rules (never a silently wrong number):
    * boxes must be finite, shaped (N, 6) in nnDetection layout, with ``upper >= lower`` on every axis
      (negative extent is an error; zero extent is allowed for predictions, which then match nothing);
    * ground-truth boxes must have positive volume (a zero-volume box could never be matched);
    * scores must be finite and in [0, 1];
    * class ids must be integers in ``[0, num_classes)`` (nnDetection classes start at 0);
    * boxes, scores and labels of one case must have the same length.

Checks are vectorised: they run once on the rows of all cases concatenated; ``where`` then is a function
that names the case (and row within it) of an offending flat row.

File-level checks (all through :mod:`nnpre.image_io`): :func:`check_prediction_geometry` (a prediction's
recorded image grid against the ground-truth header), :func:`check_semantic_labels_declared` (semantic ground
truth only holds labels its dataset.json declares) and :func:`check_segmentation_pairs` (``nnPre_evaluate seg``:
label values, truncation and the reference grid).
"""
from __future__ import annotations

from typing import Callable, Optional, Union

import numpy as np

from nnpre.errors import fail

#: Names the source of an error: a fixed text (a file or case), or a function ``flat_row -> text``.
Where = Union[str, Callable[[Optional[int]], str]]


def _at(where: Where, row: int | None = None) -> str:
    if callable(where):
        return where(row)
    return where if row is None else f"{where}, entry {row}"


def as_boxes(boxes, where: Where) -> np.ndarray:
    """Return ``boxes`` as an (N, 6) real array (empty input -> (0, 6)); error on any other shape."""
    arr = np.asarray(boxes)
    if arr.size == 0:
        return arr.reshape(0, 6) if np.issubdtype(arr.dtype, np.number) else np.zeros((0, 6), np.float32)
    if arr.ndim != 2 or arr.shape[1] != 6:
        fail(f"{_at(where)}: boxes must have shape (N, 6) in layout (a0_1, a1_1, a0_2, a1_2, a2_1, a2_2), "
             f"got {arr.shape}")
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        fail(f"{_at(where)}: boxes must be real numbers, got dtype {arr.dtype}")
    return arr


def _check_extent(boxes: np.ndarray, where: Where, strict: bool) -> None:
    if boxes.size == 0:
        return
    finite = np.isfinite(boxes).all(axis=1)
    if not finite.all():
        row = int(np.flatnonzero(~finite)[0])
        fail(f"{_at(where, row)}: box {boxes[row].tolist()} has a non-finite coordinate")
    ext = np.stack([boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1], boxes[:, 5] - boxes[:, 4]], axis=1)
    bad = (ext < 0).any(axis=1)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        fail(f"{_at(where, row)}: box {boxes[row].tolist()} has negative extent; expected layout "
             f"(a0_1, a1_1, a0_2, a1_2, a2_1, a2_2) with upper >= lower (MONAI xyzxyz boxes need columns "
             f"[0, 1, 3, 4, 2, 5])")
    if strict:
        flat = (ext <= 0).any(axis=1)
        if flat.any():
            row = int(np.flatnonzero(flat)[0])
            fail(f"{_at(where, row)}: ground-truth box {boxes[row].tolist()} has zero volume and can never be "
                 f"matched")


def _check_classes(classes, n: int, num_classes: int | None, where: Where, what: str) -> np.ndarray:
    arr = np.asarray(classes).reshape(-1)
    if len(arr) != n:
        fail(f"{_at(where)}: {n} boxes but {len(arr)} {what}")
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if not np.issubdtype(arr.dtype, np.integer):
        if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
            fail(f"{_at(where)}: {what} must be integer class ids, got dtype {arr.dtype}")
        bad = ~(np.isfinite(arr) & (np.mod(arr, 1) == 0))
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
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
    """Validate predictions (one case, or several concatenated).

    Args:
        boxes: (N, 6) nnDetection layout.
        scores: (N,) in [0, 1].
        labels: (N,) class ids in [0, num_classes).
        num_classes: number of foreground classes, or None to skip the upper-bound check.
        where: text naming the source (file or case) for error messages, or a function of the offending
            row returning that text.

    Returns:
        (boxes (N, 6), scores (N,), labels (N,) int64) as numpy arrays (box/score dtypes kept).
    """
    boxes = as_boxes(boxes, where)
    _check_extent(boxes, where, strict=False)
    sc = np.asarray(scores).reshape(-1)
    if len(sc) != len(boxes):
        fail(f"{_at(where)}: {len(boxes)} boxes but {len(sc)} scores")
    if sc.size:
        if not np.issubdtype(sc.dtype, np.number) or np.issubdtype(sc.dtype, np.complexfloating):
            fail(f"{_at(where)}: scores must be real numbers, got dtype {sc.dtype}")
        bad = ~(np.isfinite(sc) & (sc >= 0) & (sc <= 1))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            fail(f"{_at(where, i)}: score {float(sc[i])!r} is not a finite probability in [0, 1]")
    else:
        sc = sc.astype(np.float32) if not np.issubdtype(sc.dtype, np.floating) else sc
    labels = _check_classes(labels, len(boxes), num_classes, where, "labels")
    return boxes, sc, labels


def check_ground_truth(boxes, classes, num_classes: int | None, where: Where) -> tuple:
    """Validate ground truth (boxes with positive volume, class ids in range).

    Args:
        boxes: (G, 6) nnDetection layout.
        classes: (G,) class ids in [0, num_classes).
        num_classes: number of foreground classes, or None to skip the upper-bound check.
        where: text naming the source, or a function of the offending row returning it.

    Returns:
        (boxes (G, 6), classes (G,) int64).
    """
    boxes = as_boxes(boxes, where)
    _check_extent(boxes, where, strict=True)
    classes = _check_classes(classes, len(boxes), num_classes, where, "ground-truth classes")
    return boxes, classes


# ------------------------------------------------------------------------------------------- image geometry
def _gt_label_file(gt_folder: str, case: str) -> Optional[str]:
    import os

    from nnpre_detection.instances import LABEL_ENDINGS

    for ending in LABEL_ENDINGS:
        p = os.path.join(gt_folder, case + ending)
        if os.path.isfile(p):
            return p
    return None


def check_prediction_geometry(predictions: dict, gt_folder: str, pred_source: str = "predictions") -> None:
    """Refuse detection predictions made on another image grid than their ground truth.

    Each prediction that records its image geometry (``nnPre_predict`` writes ``spacing``, ``origin``,
    ``direction`` and ``shape``) is compared with the header of the ground-truth label image of the same case
    (:func:`nnpre.image_io.geometry_difference`: shape exact, the rest with ``numpy.allclose``, as nnU-Net's
    dataset check). A mismatch means the boxes (voxel indices) refer to another image, e.g. swapped cases or a
    resampled input, and would be scored against the wrong objects. Ground truth given as ``*_boxes_gt.npz``
    has no header and is not checked.
    """
    import os

    from nnpre.image_io import geometry_difference, read_header

    for case, pred in sorted(predictions.items()):
        geo = pred.get("geometry")
        if not geo:
            continue
        gt = _gt_label_file(gt_folder, case)
        if gt is None:
            continue
        size, spacing, origin, direction = read_header(gt)
        diff = geometry_difference((geo.get("shape"), geo.get("spacing"), geo.get("origin"), geo.get("direction")),
                                   (size, spacing, origin, direction))
        if diff:
            fail(f"{os.path.join(pred_source, case + '.json')}: image geometry differs from the ground truth {gt} "
                 f"({diff}); the prediction was made on another image (swapped case or resampled input): predict "
                 f"the original image of case {case}")


def check_segmentation_pairs(pairs: dict, allowed_labels=None, label_source: str = "dataset.json") -> None:
    """Check predicted and reference label maps before nnU-Net's metrics run on them.

    Args:
        pairs: ``{case: (reference path, prediction path)}``.
        allowed_labels: label values the dataset declares (dataset.json ``labels``, ignore label included);
            None = any integer >= 0.
        label_source: where ``allowed_labels`` came from, for the message.

    Each file is read with :func:`nnpre.image_io.read_image` (truncated files, fractional / negative / undeclared
    values); the prediction must have the reference's shape, spacing, origin and direction (nnU-Net's tolerance),
    otherwise Dice compares voxels of two different grids (a doubled spacing would still score 1.0).
    """
    from nnpre.image_io import geometry, geometry_difference, read_image

    for case, (ref, pred) in sorted(pairs.items()):
        r = read_image(ref, kind="label", allowed_labels=allowed_labels, ndim=None, label_source=label_source)
        p = read_image(pred, kind="label", allowed_labels=allowed_labels, ndim=None, label_source=label_source)
        diff = geometry_difference(geometry(p), geometry(r))
        if diff:
            fail(f"{pred}: geometry differs from the reference {ref} ({diff}); predictions must be on the reference "
                 f"image's grid (predict the original image, or resample with nearest neighbour onto it)")


def check_semantic_labels_declared(gt_folder: str, dataset_json: Optional[str] = None) -> None:
    """nnU-Net semantic ground truth must hold only the label values its ``dataset.json`` declares.

    Without this, a value missing from ``labels`` (e.g. 5 when the dataset has background 0 and lesion 1) would
    silently not become an object. Applies to label images without an nnDetection ``case.json`` next to them,
    when an nnU-Net v2 dataset.json (``"background": 0``) is given or found in ``gt_folder`` or its parent;
    every such file is read with :func:`nnpre.image_io.read_image` (truncated, negative, fractional values too).
    """
    import json
    import os

    from nnpre.image_io import allowed_label_values, read_image
    from nnpre_detection.instances import LABEL_ENDINGS
    from nnpre_detection.metrics.classes import find_dataset_json

    if not os.path.isdir(gt_folder):
        return
    path = dataset_json or find_dataset_json(gt_folder)
    if path is None:
        return
    try:
        with open(path, encoding="utf-8") as f:
            labels = json.load(f)["labels"]
    except (OSError, ValueError, KeyError, TypeError):
        return  # reported by the class lookup
    if not isinstance(labels, dict) or labels.get("background") != 0:
        return  # nnDetection dataset.json: classes, not label values
    allowed = allowed_label_values(labels)
    names = sorted(os.listdir(gt_folder))
    jsons = {n[: -len(".json")] for n in names if n.endswith(".json")}
    for name in names:
        ending = next((e for e in LABEL_ENDINGS if name.endswith(e)), None)
        if ending is None or name.startswith(".") or name[: -len(ending)] in jsons:
            continue
        read_image(os.path.join(gt_folder, name), kind="label", allowed_labels=allowed, ndim=None, label_source=path)
