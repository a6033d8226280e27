"""Validation of an nnU-Net raw dataset before anything is planned or written.

nnU-Net's own checks (``verify_dataset_integrity``) use asserts and long tracebacks; these checks read
only image headers (SimpleITK ``ReadImageInformation``) and turn each problem into one line naming the
file and the fix: malformed ``dataset.json``, a missing channel file, image/label geometry mismatch,
non-positive or absurd spacing. Labels are optional: a dataset without ``labelsTr`` (or with
``"nnpre_unlabeled": true`` in dataset.json) is an image-only pretraining pool.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Dict, List

import numpy as np
import SimpleITK as sitk

from nnpre.errors import fail

#: Spacing outside this range (mm) is treated as a broken header rather than real data.
SPACING_RANGE_MM = (1e-3, 50.0)


@dataclass
class RawDatasetInfo:
    """What the checks learned about a raw dataset."""

    folder: str
    dataset_json: dict
    cases: Dict[str, dict]  # case id -> {"images": [paths], "label": path | None}
    num_channels: int
    labelled: bool
    spacings: List[tuple] = field(default_factory=list)


def load_dataset_json(folder: str) -> dict:
    path = os.path.join(folder, "dataset.json")
    if not os.path.isfile(path):
        fail(f"{path} is missing; every nnU-Net raw dataset needs a dataset.json (channel_names, labels, "
             f"numTraining, file_ending)")
    try:
        with open(path, encoding="utf-8") as f:
            dj = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        fail(f"{path} is not valid JSON ({e}); fix the syntax")
    if not isinstance(dj, dict):
        fail(f"{path} must hold a JSON object")
    channels = dj.get("channel_names", dj.get("modality"))
    missing = [k for k, v in (("channel_names", channels), ("file_ending", dj.get("file_ending")),
                              ("labels", dj.get("labels"))) if not v]
    if missing:
        fail(f"{path} lacks {', '.join(missing)}; add them (e.g. \"channel_names\": {{\"0\": \"CT\"}}, "
             f"\"labels\": {{\"background\": 0}}, \"file_ending\": \".nii.gz\")")
    if not isinstance(channels, dict) or sorted(channels) != [str(i) for i in range(len(channels))]:
        fail(f"{path}: channel_names must map \"0\", \"1\", ... to names, got {channels!r}")
    if not isinstance(dj["labels"], dict) or dj["labels"].get("background") != 0:
        fail(f"{path}: labels must be a mapping with \"background\": 0, got {dj['labels']!r}")
    return dj


def _header(path: str):
    r = sitk.ImageFileReader()
    r.SetFileName(path)
    try:
        r.ReadImageInformation()
    except RuntimeError:
        fail(f"cannot read image header of {path}; the file is corrupt or not a supported image format")
    return r.GetSize(), r.GetSpacing(), r.GetOrigin(), r.GetDirection()


def check_raw_dataset(folder: str, read_headers: bool = True) -> RawDatasetInfo:
    """Check a raw dataset folder; returns :class:`RawDatasetInfo` or raises a one-line NnPreError."""
    if not os.path.isdir(folder):
        fail(f"dataset folder {folder} does not exist")
    dj = load_dataset_json(folder)
    ending = dj["file_ending"]
    nch = len(dj.get("channel_names", dj.get("modality")))
    images_dir = os.path.join(folder, "imagesTr")
    labels_dir = os.path.join(folder, "labelsTr")
    labelled = os.path.isdir(labels_dir) and not dj.get("nnpre_unlabeled", False)
    if "dataset" in dj:  # nnU-Net's alternative layout with explicit file lists
        cases = {}
        for k, v in dj["dataset"].items():
            imgs = [os.path.join(folder, os.path.expandvars(p)) if not os.path.isabs(p) else p for p in v["images"]]
            lab = v.get("label")
            cases[k] = {"images": imgs, "label": (os.path.join(folder, lab) if lab and not os.path.isabs(lab) else lab)}
        labelled = labelled or any(c["label"] for c in cases.values())
    else:
        if not os.path.isdir(images_dir):
            fail(f"{images_dir} is missing; put the training images there as CASE_0000{ending}")
        files = sorted(f for f in os.listdir(images_dir) if f.endswith(ending))
        ids = sorted({f[: -len(ending) - 5] for f in files if len(f) > len(ending) + 5 and f[-len(ending) - 5] == "_"})
        if not ids:
            fail(f"no images ending in '{ending}' named CASE_XXXX{ending} found in {images_dir}")
        cases = {}
        for i in ids:
            imgs = [os.path.join(images_dir, f"{i}_{c:04d}{ending}") for c in range(nch)]
            for p in imgs:
                if not os.path.isfile(p):
                    fail(f"channel file {p} is missing (dataset.json declares {nch} channel(s)); add it or fix "
                         f"channel_names")
            lab = os.path.join(labels_dir, i + ending) if labelled else None
            if labelled and not os.path.isfile(lab):
                fail(f"label file {lab} is missing for case {i}; add it or remove the case's images")
            cases[i] = {"images": imgs, "label": lab}
        n_decl = dj.get("numTraining")
        if n_decl is not None and int(n_decl) != len(cases):
            fail(f"{os.path.join(folder, 'dataset.json')}: numTraining is {n_decl} but imagesTr holds "
                 f"{len(cases)} case(s); set numTraining to {len(cases)}")
    info = RawDatasetInfo(folder=folder, dataset_json=dj, cases=cases, num_channels=nch, labelled=labelled)
    if read_headers and ending in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd"):
        for k, c in cases.items():
            ref = None
            for p in c["images"] + ([c["label"]] if c["label"] else []):
                size, spacing, origin, direction = _header(p)
                if len(size) != 3:
                    fail(f"{p} has {len(size)} dimensions; nnpre plans 3D images only")
                sp = np.asarray(spacing, float)
                if not np.all(np.isfinite(sp)) or np.any(sp <= 0):
                    fail(f"{p} has non-positive spacing {tuple(spacing)} in its header; fix the header "
                         f"(e.g. with SimpleITK SetSpacing)")
                if np.any(sp < SPACING_RANGE_MM[0]) or np.any(sp > SPACING_RANGE_MM[1]):
                    fail(f"{p} has implausible spacing {tuple(spacing)} mm (allowed {SPACING_RANGE_MM[0]}–"
                         f"{SPACING_RANGE_MM[1]} mm); the header is probably in the wrong unit")
                if ref is None:
                    ref = (p, size, sp, np.asarray(origin), np.asarray(direction))
                    info.spacings.append(tuple(spacing))
                else:
                    if tuple(size) != tuple(ref[1]):
                        fail(f"{p} has shape {tuple(size)} but {ref[0]} has {tuple(ref[1])}; all channels and "
                             f"the label of case {k} must share one geometry")
                    if not (np.allclose(sp, ref[2], rtol=1e-3) and np.allclose(origin, ref[3], atol=1e-2)
                            and np.allclose(direction, ref[4], atol=1e-3)):
                        fail(f"{p} has a different spacing/origin/direction than {ref[0]}; resample it onto the "
                             f"same grid (geometry of case {k} must match)")
    return info
