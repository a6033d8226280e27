"""Validation of an nnU-Net raw dataset before anything is planned or written.

nnU-Net's own checks (``verify_dataset_integrity``) use asserts and long tracebacks; these checks read
only image headers (SimpleITK ``ReadImageInformation``) and turn each problem into one line naming the
file and the fix: malformed ``dataset.json``, a missing channel file, image/label geometry mismatch,
non-positive or absurd spacing. Labels are optional: a dataset without ``labelsTr`` (or with
``"nnpre_unlabeled": true`` in dataset.json) is an image-only pretraining pool.

Further checks, in the order ``nnPre_plan`` runs them (all before anything is written):

* :func:`check_target_geometry`: the requested target spacing and patch size against the image sizes and
  spacings in the headers (every case keeps >= 4 voxels per axis, no case grows beyond 2**31 voxels, the patch
  is at most twice the largest resampled image or 128 voxels);
* :func:`check_dataset_contents`: every image and label file read in full with :func:`nnpre.image_io.check_file`
  (truncated files, NaN/Inf voxels, fractional, negative or undeclared label values).

After preprocessing, :func:`write_completion_marker` lists the preprocessed cases and the data-relevant plan
entries; :func:`verify_preprocessed` (called when a trainer is built) checks the folder against it, and
:func:`retire_stale_splits` moves aside a ``splits_final.json`` that names other cases than the preprocessed set.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from nnpre.errors import fail
from nnpre.image_io import allowed_label_values, check_file, read_header

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
    spacings: List[tuple] = field(default_factory=list)  # per case, SimpleITK order (x, y, z), mm
    sizes: List[tuple] = field(default_factory=list)  # per case, SimpleITK order (x, y, z), voxels
    case_ids: List[str] = field(default_factory=list)  # order of ``spacings`` / ``sizes``


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
    return read_header(path)


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
                    info.sizes.append(tuple(int(v) for v in size))
                    info.case_ids.append(k)
                else:
                    if tuple(size) != tuple(ref[1]):
                        fail(f"{p} has shape {tuple(size)} but {ref[0]} has {tuple(ref[1])}; all channels and "
                             f"the label of case {k} must share one geometry")
                    if not (np.allclose(sp, ref[2], rtol=1e-3) and np.allclose(origin, ref[3], atol=1e-2)
                            and np.allclose(direction, ref[4], atol=1e-3)):
                        fail(f"{p} has a different spacing/origin/direction than {ref[0]}; resample it onto the "
                             f"same grid (geometry of case {k} must match)")
    return info


# ------------------------------------------------------------------------------------------ target geometry
#: A case must keep at least this many voxels along every axis after resampling (or all it has, if fewer).
MIN_RESAMPLED_VOXELS_PER_AXIS = 4
#: No case may exceed this many voxels after resampling (int32 indexing; 8 GiB per float32 channel).
MAX_RESAMPLED_VOXELS = 2 ** 31 - 1
#: A patch axis may always be this large (the faithful default), whatever the image size.
PATCH_ALWAYS_ALLOWED = 128


def _fmt(v: Iterable[float]) -> str:
    return "(" + ", ".join(f"{x:.4g}" for x in v) + ")"


def check_target_geometry(info: RawDatasetInfo, spacing: Sequence[float], patch_size: Sequence[int]) -> None:
    """Refuse a target spacing / patch size that cannot work on this dataset, before anything is written.

    Args:
        info: from :func:`check_raw_dataset` (header sizes and spacings, SimpleITK order x, y, z).
        spacing: target spacing in mm, nnU-Net array axis order (z, y, x for SimpleITK-read files).
        patch_size: patch in voxels, same axis order.

    Rules (the error names the sane range for this dataset):
        * every case keeps ``>= min(4, its size)`` voxels per axis after resampling (coarser spacings resample
          images to nothing: nnU-Net then fails on an empty array);
        * no case grows beyond :data:`MAX_RESAMPLED_VOXELS` voxels (finer spacings ask for petabytes);
        * each patch axis is at most ``max(128, 2 x the largest resampled image along that axis)``.
    """
    if not info.sizes:
        return
    t = np.asarray(spacing, float)
    shapes = np.asarray([s[::-1] for s in info.sizes], float)  # array axis order
    sps = np.asarray([s[::-1] for s in info.spacings], float)
    extent = shapes * sps  # mm
    resampled = np.round(extent / t)  # nnU-Net's compute_new_shape
    need = np.minimum(MIN_RESAMPLED_VOXELS_PER_AXIS, shapes)
    max_sp = (extent / need).min(axis=0)  # per axis: the coarsest spacing every case survives
    vox = extent.prod(axis=1)
    min_iso = float((vox.max() / MAX_RESAMPLED_VOXELS) ** (1 / 3))
    sane = f"sane range for this dataset: {min_iso:.3g} to {float(max_sp.min()):.3g} mm"
    bad = resampled < need
    if bad.any():
        case, axis = (int(i) for i in np.argwhere(bad)[0])
        fail(f"target spacing {_fmt(t)} mm leaves case {info.case_ids[case]} ({_fmt(extent[case])} mm) with "
             f"{int(resampled[case, axis])} voxel(s) along axis {axis}; use a spacing of at most {_fmt(max_sp)} mm "
             f"({sane}), e.g. --spacing 1")
    n_vox = resampled.prod(axis=1)
    if n_vox.max() > MAX_RESAMPLED_VOXELS:
        case = int(np.argmax(n_vox))
        fail(f"target spacing {_fmt(t)} mm would resample case {info.case_ids[case]} to "
             f"{_fmt(resampled[case])} = {n_vox[case]:.3g} voxels (limit {MAX_RESAMPLED_VOXELS:.3g}); use a "
             f"coarser spacing ({sane}), e.g. --spacing 1")
    p = np.asarray(patch_size, float)
    limit = np.maximum(PATCH_ALWAYS_ALLOWED, 2 * resampled.max(axis=0))
    over = p > limit
    if over.any():
        axis = int(np.flatnonzero(over)[0])
        fail(f"patch size {[int(v) for v in p]} is larger than twice the largest image along axis {axis} "
             f"({int(resampled[:, axis].max())} voxels at {t[axis]:.4g} mm); use at most "
             f"{[int(v) for v in limit]} voxels (e.g. --patch 128 or a preset's patch)")


# ------------------------------------------------------------------------------------------ file contents
def _check_case_files(args) -> Optional[str]:
    images, label, allowed = args
    from nnpre.errors import NnPreError

    try:
        for p in images:
            check_file(p, kind="image")
        if label:
            check_file(label, kind="label", allowed_labels=allowed)
    except NnPreError as e:
        return str(e)
    return None


def check_dataset_contents(info: RawDatasetInfo, num_processes: int = 1) -> None:
    """Read every image and label file of ``info`` in full (:func:`nnpre.image_io.check_file`; the checks of
    :func:`nnpre.image_io.read_image` in one decompression per NIfTI file).

    Stops with the first problem (and how many other cases have one): truncated/corrupt files, NaN/Inf image
    voxels, fractional or negative label values, label values not in dataset.json ``labels``.
    """
    allowed = sorted(allowed_label_values(info.dataset_json["labels"])) if info.labelled else None
    jobs = [(c["images"], c["label"] if info.labelled else None, allowed) for c in info.cases.values()]
    if num_processes <= 1 or len(jobs) <= 1:
        errors = [e for e in map(_check_case_files, jobs) if e]
    else:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(min(num_processes, len(jobs))) as pool:
            errors = [e for e in pool.imap(_check_case_files, jobs, chunksize=4) if e]
    if errors:
        fail(errors[0] + (f" (and {len(errors) - 1} more problem case(s))" if len(errors) > 1 else ""))


# ------------------------------------------------------------------------------------------ preprocessed data
#: Suffix of nnpre's completion record, written NEXT TO the data folder (``<data_identifier>.nnpre_complete.json``):
#: inside it, stock nnU-Net's ``infer_dataset_class`` would refuse the folder (it allows one file ending only).
COMPLETION_MARKER = ".nnpre_complete.json"


def marker_path(data_folder: str) -> str:
    """Path of the completion record of ``data_folder`` (a sibling file, see :data:`COMPLETION_MARKER`)."""
    return os.path.normpath(data_folder) + COMPLETION_MARKER


#: Configuration entries that change the preprocessed arrays (a re-plan that changes one of them needs a new
#: preprocessing run; batch size, patch size or the network do not).
DATA_KEYS = ("spacing", "normalization_schemes", "use_mask_for_norm", "preprocessor_name", "resampling_fn_data",
             "resampling_fn_data_kwargs", "resampling_fn_seg", "resampling_fn_seg_kwargs")


def data_signature(plans: dict, configuration: str) -> str:
    """SHA-256 of what in ``plans`` determines the preprocessed data (:data:`DATA_KEYS` of the configuration,
    the per-channel intensity statistics and the transpose)."""
    import hashlib

    c = plans["configurations"][configuration]
    rec = {k: c.get(k) for k in DATA_KEYS}
    rec["intensity"] = plans.get("foreground_intensity_properties_per_channel")
    rec["transpose"] = plans.get("transpose_forward")
    return hashlib.sha256(json.dumps(rec, sort_keys=True, default=str).encode()).hexdigest()


def write_completion_marker(data_folder: str, cases: Iterable[str], plans_identifier: str,
                            configuration: str, plans: Optional[dict] = None, path: Optional[str] = None) -> str:
    """Record that ``data_folder`` holds exactly ``cases``, preprocessed with ``plans`` (signature stored).

    Written to ``path`` (default :func:`marker_path`); returns it."""
    from nnpre.atomic import write_json

    path = path or marker_path(data_folder)
    write_json({"cases": sorted(cases), "plans_identifier": plans_identifier, "configuration": configuration,
                "data_signature": data_signature(plans, configuration) if plans else None,
                "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, path)
    return path


def preprocessed_cases(data_folder: str) -> set[str]:
    """Case ids with a complete blosc2 case in ``data_folder`` (``.b2nd`` + ``_seg.b2nd`` + ``.pkl``; nnU-Net's
    preprocessor writes the ``.pkl`` last)."""
    names = set(os.listdir(data_folder))
    return {n[:-4] for n in names if n.endswith(".pkl") and f"{n[:-4]}.b2nd" in names
            and f"{n[:-4]}_seg.b2nd" in names}


def verify_preprocessed(data_folder: str, dataset: str | int = "DATASET", plans: Optional[dict] = None,
                        configuration: str = "3d_fullres") -> List[str]:
    """Check that a preprocessed data folder is complete and current before training; returns its case ids.

    With nnpre's completion marker the folder must hold every listed case and no other, and (given ``plans``)
    have been made with the same data-relevant plan entries (:func:`data_signature`; a re-plan with
    ``--no-preprocess`` or an interrupted re-plan leaves data of the old plans). Without a marker (stock
    ``nnUNetv2_preprocess``) the number of complete cases must equal ``numTraining`` of the preprocessed
    ``dataset.json``. (Whether ``splits_final.json`` matches these cases is checked by the trainer for the fold
    it trains; ``nnPre_plan`` moves a mismatching one aside, :func:`retire_stale_splits`.)
    """
    fix = f"re-run nnPre_plan -d {dataset} (preprocessing is redone from scratch)"
    if not os.path.isdir(data_folder):
        fail(f"{data_folder} is missing; {fix}")
    have = preprocessed_cases(data_folder)
    marker = marker_path(data_folder)
    if os.path.isfile(marker):
        try:
            with open(marker, encoding="utf-8") as f:
                record = json.load(f)
            listed = set(record["cases"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            fail(f"{marker} is unreadable ({type(e).__name__}); {fix}")
        sig = record.get("data_signature")
        if plans is not None and sig and sig != data_signature(plans, configuration):
            fail(f"{data_folder} was preprocessed with other plans than the current "
                 f"{record.get('plans_identifier') or 'plans'} (spacing, normalisation or intensity statistics "
                 f"changed, e.g. by nnPre_plan --no-preprocess or an interrupted re-plan); {fix}")
        missing, extra = sorted(listed - have), sorted(have - listed)
        if missing:
            fail(f"{data_folder} is incomplete: {len(missing)} of {len(listed)} preprocessed case(s) are missing or "
                 f"partial ({missing[:3]}{' ...' if len(missing) > 3 else ''}); {fix}")
        if extra:
            fail(f"{data_folder} holds {len(extra)} case(s) its completion record {marker} does not list "
                 f"({extra[:3]}); {fix}")
    else:
        dj_file = os.path.join(os.path.dirname(data_folder), "dataset.json")
        try:
            with open(dj_file, encoding="utf-8") as f:
                n = int(json.load(f).get("numTraining", len(have)))
        except (OSError, ValueError, TypeError):
            n = len(have)
        if not have or len(have) != n:
            fail(f"{data_folder} holds {len(have)} complete preprocessed case(s) but {dj_file} declares numTraining "
                 f"{n}; preprocessing was interrupted or is stale: {fix}")
    return sorted(have)


def read_splits(splits_file: str) -> Tuple[list, set]:
    """``(folds, every case id any fold names)`` of an nnU-Net ``splits_final.json``.

    Raises ``OSError``, ``ValueError``, ``KeyError`` or ``TypeError`` on an unreadable or malformed file (the
    caller words the error for its context).
    """
    with open(splits_file, encoding="utf-8") as f:
        splits = json.load(f)
    return splits, {c for s in splits for part in ("train", "val") for c in s[part]}


def _splits_mismatch(splits_file: str, cases: set) -> Optional[str]:
    """None if ``splits_file`` is absent or uses exactly ``cases``, else a description of the difference."""
    if not os.path.isfile(splits_file):
        return None
    try:
        _, named = read_splits(splits_file)
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"is unreadable ({type(e).__name__}: {e})"
    unknown, unused = sorted(named - cases), sorted(cases - named)
    if unknown:
        return f"names {len(unknown)} case(s) that are not preprocessed ({unknown[:3]})"
    if unused:
        return f"leaves out {len(unused)} preprocessed case(s) ({unused[:3]}); they would never be trained on"
    return None


def retire_stale_splits(preprocessed_dataset_folder: str, cases: Iterable[str]) -> Optional[str]:
    """Move ``splits_final.json`` aside (to ``splits_final.json.stale``) when it does not use exactly ``cases``.

    Returns the new path (None if nothing was moved), so the caller can say so.
    """
    splits = os.path.join(preprocessed_dataset_folder, "splits_final.json")
    if _splits_mismatch(splits, set(cases)) is None:
        return None
    target = splits + ".stale"
    os.replace(splits, target)
    return target
