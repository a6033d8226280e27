"""Instance maps, semantic labels and ground-truth boxes (nnDetection conventions).

Axis convention
    Every array here is indexed like the numpy array returned by ``SimpleITK.GetArrayFromImage``:
    axis 0 is the slice axis (world z for an axial scan), axes 1 and 2 are the in-plane axes.
    Boxes live in that voxel *index* space (not world mm).

Box layout (nnDetection, MONAI mode ``"xyxyzz"``)
    ``(a0_1, a1_1, a0_2, a1_2, a2_1, a2_2)`` where ``aK_1``/``aK_2`` are the lower/upper bound along array
    axis K. Bounds follow nnDetection's ``get_bbox_np``: ``min_index - 1`` and ``max_index + 1`` per axis, so a
    single voxel at index i spans [i-1, i+1] (width 2). Volumes are ``prod(upper - lower)`` without +1. This is
    what nnDetection stores in ``{case}_boxes_gt.npz`` and evaluates against, so using it for ground truth
    reproduces nnDetection's numbers. (MONAI's ``convert_mask_to_box`` uses half-open ``[min, max+1)``
    instead; IoUs of small objects differ.)

Classes
    Detection classes start at 0 (nnDetection). A semantic (nnU-Net) label value ``v > 0`` becomes class
    ``v - 1``.

Ground-truth folders (:func:`load_ground_truth`)
    * nnDetection raw layout: ``case.nii.gz`` (instance map, 0 = background) + ``case.json``
      (``{"instances": {"1": 0, "2": 1}}``, instance id -> class index).
    * nnDetection preprocessed boxes: ``case_boxes_gt.npz`` (keys ``boxes``, ``classes``).
    * nnU-Net semantic labels: ``case.nii.gz`` (or ``.nii``/``.mha``/``.nrrd``) without JSON; converted to
      instances by 26-connected components per class (as nnDetection's ``nndet_seg2det``).
"""
from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np
import scipy.ndimage

from nnpre.errors import fail
from nnpre.image_io import read_image

#: File endings (SimpleITK-readable) recognised as label images, longest first.
LABEL_ENDINGS = (".nii.gz", ".nii", ".mha", ".nrrd")
#: Suffix of nnDetection's preprocessed ground-truth box files.
BOXES_NPZ_SUFFIX = "_boxes_gt.npz"


def boxes_from_instances(instances: np.ndarray, ids: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Bounding boxes of the instances of an instance map (nnDetection ``min-1``/``max+1`` convention).

    Args:
        instances: (X, Y, Z) integer instance map (array axes 0, 1, 2), 0 = background, ids >= 0.
        ids: instance ids to return, in this order; ids without any voxel are skipped. Default: every id
            present in ``instances``, ascending.

    Returns:
        boxes: (N, 6) float32 in nnDetection layout ``(a0_1, a1_1, a0_2, a1_2, a2_1, a2_2)``.
        ids: (N,) int64, the instance id of each box.
    """
    instances = np.asarray(instances)
    if instances.ndim != 3:
        fail(f"instance map must be 3D (X, Y, Z), got shape {instances.shape}")
    if not np.issubdtype(instances.dtype, np.integer):
        if instances.size and not np.all(np.mod(instances, 1) == 0):
            fail("instance map holds non-integer values; expected integer instance ids (0 = background)")
        instances = instances.astype(np.int64)
    if instances.size and instances.min() < 0:
        fail("instance map holds negative values; expected instance ids >= 0 (0 = background)")
    slices = scipy.ndimage.find_objects(instances)  # slices[i] is the bounding slice of id i+1 (or None)
    present = np.array([i + 1 for i, s in enumerate(slices) if s is not None], dtype=np.int64)
    if ids is None:
        out_ids = present
    else:
        wanted = np.asarray(list(ids), dtype=np.int64).reshape(-1)
        out_ids = wanted[np.isin(wanted, present)]
    boxes = np.zeros((len(out_ids), 6), dtype=np.float32)
    for row, iid in enumerate(out_ids):
        s0, s1, s2 = slices[iid - 1]
        # slice.stop = max_index + 1, slice.start = min_index
        boxes[row] = (s0.start - 1, s1.start - 1, s0.stop, s1.stop, s2.start - 1, s2.stop)
    return boxes, out_ids


def semantic_to_instances(
    seg: np.ndarray, classes: Sequence[int] | None = None, min_size: int = 0
) -> tuple[np.ndarray, dict[int, int]]:
    """Split a semantic segmentation into instances: 26-connected components per semantic class.

    Mirrors nnDetection's ``seg_to_instances`` (used by ``nndet_seg2det``): classes are processed in
    ascending label order, components of one class in raster-scan (C) order, ids are consecutive.

    Args:
        seg: (X, Y, Z) integer semantic label map, 0 = background, label ``v`` = class ``v - 1``.
        classes: semantic label values to convert (default: every nonzero value present).
        min_size: components with fewer voxels are dropped (nnDetection ``min_num_voxel``, default 0 = keep
            all).

    Returns:
        instances: (X, Y, Z) int32 map with ids 1..N (0 = background).
        mapping: ``{instance_id: class_index}`` with ``class_index = label - 1``.
    """
    import cc3d  # local import: only needed for semantic ground truth

    seg = np.asarray(seg)
    if seg.ndim != 3:
        fail(f"semantic segmentation must be 3D (X, Y, Z), got shape {seg.shape}")
    if classes is None:
        labels = np.unique(seg)
        labels = labels[labels > 0]
    else:
        labels = np.unique(np.asarray(list(classes)))
        if labels.size and labels.min() <= 0:
            fail(f"semantic classes must be positive label values, got {labels.tolist()}")
    instances = np.zeros(seg.shape, dtype=np.int32)
    mapping: dict[int, int] = {}
    next_id = 1
    for label in labels:
        # C-contiguous input makes cc3d number components in the same raster order as scipy.ndimage.label
        comps, n = cc3d.connected_components(np.ascontiguousarray(seg == label), connectivity=26, return_N=True)
        if n == 0:
            continue
        comps = comps.astype(np.int64, copy=False)
        keep = np.ones(n + 1, dtype=bool)
        keep[0] = False
        if min_size > 0:
            keep &= np.bincount(comps.ravel(), minlength=n + 1) >= min_size
        new_ids = np.zeros(n + 1, dtype=np.int32)
        n_keep = int(keep.sum())
        new_ids[keep] = np.arange(next_id, next_id + n_keep, dtype=np.int32)
        fg = comps > 0
        instances[fg] = new_ids[comps[fg]]
        for iid in range(next_id, next_id + n_keep):
            mapping[iid] = int(label) - 1
        next_id += n_keep
    return instances, mapping


def _label_stem(filename: str) -> str | None:
    for ending in LABEL_ENDINGS:
        if filename.endswith(ending):
            return filename[: -len(ending)]
    return None


def load_nndet_label(label_file: str) -> tuple[np.ndarray, dict[int, int], "SimpleITK.Image"]:  # noqa: F821
    """Read an nnDetection raw label: ``case.nii.gz`` (instance map) and ``case.json`` next to it.

    Args:
        label_file: path of the instance map image (``.nii.gz``, ``.nii``, ``.mha`` or ``.nrrd``).

    Returns:
        instances: (X, Y, Z) int64 array in ``GetArrayFromImage`` order.
        mapping: ``{instance_id: class_index}`` from the JSON's ``"instances"`` entry.
        image: the SimpleITK image (for spacing/origin/direction).
    """
    import SimpleITK as sitk

    stem = _label_stem(os.path.basename(label_file))
    if stem is None:
        fail(f"{label_file}: not a label image (expected one of {', '.join(LABEL_ENDINGS)})")
    json_file = os.path.join(os.path.dirname(label_file), stem + ".json")
    if not os.path.isfile(json_file):
        fail(f"{label_file}: missing instance->class file {json_file} (nnDetection labels need case.json)")
    try:
        with open(json_file, encoding="utf-8") as f:
            meta = json.load(f)
        mapping = {int(k): int(v) for k, v in meta["instances"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        fail(f"{json_file}: expected {{\"instances\": {{\"1\": 0, ...}}}} ({type(e).__name__}: {e})")
    if any(v < 0 for v in mapping.values()):
        fail(f"{json_file}: class indices must be >= 0 (nnDetection classes start at 0)")
    image = read_image(label_file, kind="label", ndim=None)  # truncated / negative / fractional -> one line
    arr = sitk.GetArrayFromImage(image)
    if arr.ndim != 3:
        fail(f"{label_file}: expected a 3D single-channel instance map, got array shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        if not np.all(np.mod(arr, 1) == 0):
            fail(f"{label_file}: instance map holds non-integer values")
    return arr.astype(np.int64), mapping, image


def _boxes_from_nndet_label(label_file: str) -> dict:
    instances, mapping, _ = load_nndet_label(label_file)
    boxes, ids = boxes_from_instances(instances)
    missing = [int(i) for i in ids if int(i) not in mapping]
    if missing:
        fail(f"{label_file}: instance ids {missing} have no class in the JSON file next to it; add them to "
             f"\"instances\"")
    classes = np.array([mapping[int(i)] for i in ids], dtype=np.int64)
    return {"boxes": boxes, "classes": classes}


def _boxes_from_semantic_label(label_file: str, min_size: int, classes: Sequence[int] | None) -> dict:
    import SimpleITK as sitk

    arr = sitk.GetArrayFromImage(read_image(label_file, kind="label", ndim=None))  # truncated, negative, ...
    if arr.ndim != 3:
        fail(f"{label_file}: expected a 3D single-channel label map, got array shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        if not np.all(np.mod(arr, 1) == 0):
            fail(f"{label_file}: label map holds non-integer values")
        arr = arr.astype(np.int64)
    if arr.size and arr.min() < 0:
        fail(f"{label_file}: label map holds negative values (nnU-Net labels are 0 = background, 1..K)")
    instances, mapping = semantic_to_instances(arr, classes=classes, min_size=min_size)
    boxes, ids = boxes_from_instances(instances)
    classes = np.array([mapping[int(i)] for i in ids], dtype=np.int64)
    return {"boxes": boxes, "classes": classes}


def _boxes_from_npz(npz_file: str) -> dict:
    try:
        with np.load(npz_file, allow_pickle=False) as data:
            boxes = np.asarray(data["boxes"], dtype=np.float32).reshape(-1, 6)
            classes = np.asarray(data["classes"]).astype(np.int64).reshape(-1)
    except (OSError, ValueError, KeyError) as e:
        fail(f"{npz_file}: expected an npz with arrays 'boxes' (N, 6) and 'classes' (N,) ({e})")
    if len(boxes) != len(classes):
        fail(f"{npz_file}: {len(boxes)} boxes but {len(classes)} classes")
    return {"boxes": boxes, "classes": classes}


def load_ground_truth(gt_folder: str, min_size: int = 0,
                      semantic_classes: Sequence[int] | None = None) -> dict[str, dict]:
    """Load ground-truth boxes of every case in a folder.

    The layout is detected automatically:
    nnDetection raw labels (``case.nii.gz`` + ``case.json``), nnDetection ``case_boxes_gt.npz`` files, or
    nnU-Net semantic labels (``case.nii.gz`` without JSON, converted with :func:`semantic_to_instances`).
    Mixing layouts in one folder is an error.

    Args:
        gt_folder: folder holding the label files.
        min_size: for semantic labels only: components with fewer voxels are dropped (default 0).
        semantic_classes: for semantic labels only: label values to convert (default every nonzero value;
            pass the foreground labels of dataset.json to leave an ignore label out).

    Returns:
        ``{case_id: {"boxes": (N, 6) float32 nnDetection layout, "classes": (N,) int64 (>= 0)}}``,
        sorted by case id.
    """
    if not os.path.isdir(gt_folder):
        fail(f"ground-truth folder {gt_folder} does not exist")
    names = sorted(os.listdir(gt_folder))
    images = {}
    for name in names:
        stem = _label_stem(name)
        if stem is not None and not name.startswith("."):
            if stem in images:
                fail(f"{gt_folder}: case {stem} has more than one label file ({images[stem]}, {name})")
            images[stem] = name
    npz = {n[: -len(BOXES_NPZ_SUFFIX)]: n for n in names if n.endswith(BOXES_NPZ_SUFFIX)}
    jsons = {n[: -len(".json")] for n in names if n.endswith(".json")}
    with_json = [s for s in images if s in jsons]
    if images and npz:
        fail(f"{gt_folder}: holds both label images and *{BOXES_NPZ_SUFFIX} files; keep one kind of ground truth")
    if not images and not npz:
        fail(f"{gt_folder}: no label files found (expected case.nii.gz [+ case.json] or case{BOXES_NPZ_SUFFIX})")
    out: dict[str, dict] = {}
    if npz:
        for case, name in sorted(npz.items()):
            out[case] = _boxes_from_npz(os.path.join(gt_folder, name))
        return out
    if with_json:
        without = sorted(set(images) - set(with_json))
        if without:
            fail(f"{gt_folder}: nnDetection labels need a JSON per case, missing for {without[:5]}"
                 f"{' ...' if len(without) > 5 else ''} (add case.json or use only semantic labels)")
        for case, name in sorted(images.items()):
            out[case] = _boxes_from_nndet_label(os.path.join(gt_folder, name))
    else:
        for case, name in sorted(images.items()):
            out[case] = _boxes_from_semantic_label(os.path.join(gt_folder, name), min_size, semantic_classes)
    return out
