"""Which detection classes a dataset has (needed because classes without ground truth still count in AP).

Sources, in order of precedence:
    1. an explicit number of classes;
    2. a ``dataset.json``: nnDetection style ``"labels": {"0": "nodule", ...}`` (classes 0..K-1), or nnU-Net
       v2 style ``"labels": {"background": 0, "lesion": 1, ..., "ignore": k}`` (label value v > 0 becomes
       class v - 1; the ignore label is no class; region-based labels are not supported for detection);
    3. the ground truth itself: ``max class + 1`` (a class absent from all ground truth is then unknown,
       so its -1 entry that nnDetection would average in is missing: pass 1. or 2. to reproduce that).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from nnpre.errors import fail


@dataclass(frozen=True)
class DetectionClasses:
    """Class set of a detection evaluation.

    Attributes:
        num_classes: K, class ids are 0..K-1.
        names: K display names (default the index as text).
        source: where K came from (for the report).
        semantic_labels: nnU-Net label values to turn into instances (None = all nonzero values).
    """

    num_classes: int
    names: tuple = field(default=())
    source: str = "explicit"
    semantic_labels: tuple | None = None


def classes_from_dataset_json(path: str) -> DetectionClasses:
    """Read the class set from an nnDetection or nnU-Net v2 ``dataset.json``."""
    try:
        with open(path, encoding="utf-8") as f:
            labels = json.load(f)["labels"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        fail(f"{path}: cannot read \"labels\" from dataset.json ({type(e).__name__}: {e})")
    if not isinstance(labels, dict) or not labels:
        fail(f"{path}: \"labels\" must be a non-empty object")
    if all(str(k).isdigit() for k in labels):  # nnDetection: {"0": "name"}
        ids = sorted(int(k) for k in labels)
        if ids != list(range(len(ids))):
            fail(f"{path}: nnDetection labels must be numbered 0..K-1, got {ids}")
        return DetectionClasses(len(ids), tuple(str(labels[str(i)]) for i in ids), f"nnDetection {path}")
    values = {}
    for name, value in labels.items():
        if isinstance(value, (list, tuple)):
            fail(f"{path}: region-based label {name!r} cannot be evaluated as detection classes; give the number "
                 f"of classes explicitly")
        if name == "ignore":
            continue
        try:
            values[int(value)] = str(name)
        except (TypeError, ValueError):
            fail(f"{path}: label {name!r} has non-integer value {value!r}")
    fg = sorted(v for v in values if v > 0)
    if not fg:
        fail(f"{path}: no foreground labels")
    k = max(fg)
    names = tuple(values.get(v, str(v - 1)) for v in range(1, k + 1))
    return DetectionClasses(k, names, f"nnU-Net {path}", tuple(fg))


def find_dataset_json(gt_folder: str) -> str | None:
    """``dataset.json`` next to the labels: in the ground-truth folder, its parent (nnU-Net ``labelsTr``) or,
    for nnDetection's ``raw_splitted/labelsTr``, the task folder above; None if there is none."""
    parent = os.path.dirname(os.path.abspath(gt_folder))
    folders = [gt_folder, parent]
    if os.path.basename(parent) == "raw_splitted":
        folders.append(os.path.dirname(parent))
    for folder in folders:
        candidate = os.path.join(folder, "dataset.json")
        if os.path.isfile(candidate):
            return candidate
    return None


def resolve_classes(num_classes: int | None = None, dataset_json: str | None = None,
                    gt_folder: str | None = None) -> DetectionClasses | None:
    """Class set from an explicit count, a given or discovered dataset.json; None = infer from ground truth."""
    if num_classes is not None:
        if int(num_classes) < 1:
            fail(f"number of classes must be >= 1, got {num_classes}")
        return DetectionClasses(int(num_classes), tuple(str(i) for i in range(int(num_classes))), "explicit")
    if dataset_json is None and gt_folder is not None:
        dataset_json = find_dataset_json(gt_folder)
    if dataset_json is not None:
        if not os.path.isfile(dataset_json):
            fail(f"dataset.json {dataset_json} does not exist")
        return classes_from_dataset_json(dataset_json)
    return None
