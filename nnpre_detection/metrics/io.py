"""Reading prediction files written by the nnpre detector (or nnDetection's ``<case>_boxes.pkl``).

One JSON file per case, ``<case>.json``::

    {"case": "case_000",
     "boxes": [[a0_1, a1_1, a0_2, a1_2, a2_1, a2_2], ...],   # voxel index space, nnDetection layout
     "scores": [0.9, ...], "labels": [0, ...],
     "boxes_world": [[xmin, ymin, zmin, xmax, ymax, zmax], ...], "spacing": [...], "origin": [...],
     "direction": [...]}

Only ``boxes``, ``scores`` and ``labels`` are used for the metrics; ``spacing``, ``origin``, ``direction`` and
``shape`` (when present) are kept as ``"geometry"`` so that evaluation can refuse predictions made on another
grid than the ground truth (:func:`nnpre_detection.metrics.validate.check_prediction_geometry`). Boxes and
scores are read as float32, the precision of nnDetection's (and our) network outputs, so evaluation sees the
same numbers nnDetection would. JSON objects without any of the three keys (e.g. a run summary) are skipped; a
file with only some of them, or a JSON list instead of an object, is an error. A folder of nnDetection
``<case>_boxes.pkl`` files (and no JSON) is read with
:mod:`nnpre_detection.metrics.nndet_pickle`, which runs no code from the files.
"""
from __future__ import annotations

import os

import numpy as np

from nnpre.atomic import read_json
from nnpre.errors import fail

PREDICTION_KEYS = ("boxes", "scores", "labels")
#: Image geometry nnPre_predict records (SimpleITK order); ``shape`` is the image size (x, y, z).
GEOMETRY_KEYS = ("shape", "spacing", "origin", "direction")


def read_prediction(path: str) -> dict:
    """Read one prediction file.

    Returns:
        ``{"boxes": (N, 6) float32, "scores": (N,) float32, "labels": (N,) as stored}``; shapes are checked
        later by :mod:`nnpre_detection.metrics.validate`.
    """
    return parse_prediction(read_json(path, "prediction JSON"), path)


def parse_prediction(data, path: str) -> dict:
    """Convert a parsed prediction JSON object (see :func:`read_prediction`); ``path`` names it in errors."""
    if not isinstance(data, dict):
        fail(f"{path}: expected a JSON object with keys {list(PREDICTION_KEYS)}")
    missing = [k for k in PREDICTION_KEYS if k not in data]
    if missing:
        fail(f"{path}: prediction file lacks {missing}; expected keys {list(PREDICTION_KEYS)}")
    try:
        boxes = np.asarray(data["boxes"], dtype=np.float32)
        scores = np.asarray(data["scores"], dtype=np.float32).reshape(-1)
        labels = np.asarray(data["labels"])
    except (TypeError, ValueError) as e:
        fail(f"{path}: boxes/scores/labels must be numeric lists ({e})")
    if boxes.size == 0:
        boxes = boxes.reshape(0, 6)
    if labels.size == 0:
        labels = labels.reshape(0).astype(np.int64)
    out = {"boxes": boxes, "scores": scores, "labels": labels.reshape(-1)}
    geo = {k: data.get(k) for k in GEOMETRY_KEYS}
    if any(v is not None for v in geo.values()):
        out["geometry"] = geo
    return out


def load_predictions(folder: str) -> dict[str, dict]:
    """Load every ``<case>.json`` prediction file of a folder.

    Args:
        folder: prediction folder.

    Returns:
        ``{case_id: {"boxes", "scores", "labels"}}`` sorted by case id (case id = file name without
        ``.json``; a ``"case"`` entry, if present, must agree).
    """
    if not os.path.isdir(folder):
        fail(f"prediction folder {folder} does not exist")
    out: dict[str, dict] = {}
    names = sorted(os.listdir(folder))
    if any(n.endswith("_boxes.pkl") for n in names) and not any(n.endswith(".json") for n in names):
        return _load_nndet_predictions(folder, names)
    for name in names:
        if not name.endswith(".json") or name.startswith("."):
            continue
        path = os.path.join(folder, name)
        head = read_json(path)
        if not isinstance(head, dict):
            fail(f"{path} holds a JSON {type(head).__name__}, not a prediction object {{\"boxes\": [...], "
                 f"\"scores\": [...], \"labels\": [...]}}; write one object per case (<case>.json) or move the "
                 f"file out of the prediction folder")
        if not any(k in head for k in PREDICTION_KEYS):
            continue  # not a prediction file (e.g. a summary)
        case = name[: -len(".json")]
        if "case" in head and str(head["case"]) != case:
            fail(f"{path}: file name says case {case!r} but the file says {head['case']!r}; rename one")
        out[case] = parse_prediction(head, path)
    if not out:
        fail(f"{folder}: no prediction files (<case>.json with boxes/scores/labels) found")
    return out


def _load_nndet_predictions(folder: str, names: list[str]) -> dict[str, dict]:
    """nnDetection's ``<case>_boxes.pkl`` files (read with a restricted unpickler, see
    :mod:`nnpre_detection.metrics.nndet_pickle`), converted like our JSON predictions."""
    from nnpre_detection.metrics.nndet_pickle import nndet_case_id, read_nndet_boxes

    out: dict[str, dict] = {}
    for name in names:
        case = nndet_case_id(name)
        if case is None:
            continue
        path = os.path.join(folder, name)
        pred = read_nndet_boxes(path)
        out[case] = parse_prediction({k: np.asarray(pred[k]).tolist() for k in PREDICTION_KEYS}, path)
    return out
