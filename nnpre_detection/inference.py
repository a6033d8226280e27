"""Whole-case Retina U-Net inference: sliding window, mirror TTA, WBC merge, boxes in image and world space.

Pipeline per case (nnDetection's, with nnU-Net preprocessing):

1. the plans' preprocessor (``configuration_manager.preprocessor_class().run_case``): crop to nonzero,
   resample to the plans spacing, normalise; array axes stay those of ``SimpleITK.GetArrayFromImage``
   (nnpre plans never transpose);
2. :func:`predict_case`: tiles of ``patch_size`` with ``overlap`` (nnU-Net's tile steps; images smaller than a
   patch are zero-padded at the end); per tile, model and mirror variant ``RetinaUNet.predict_patch``, boxes
   flipped back (:func:`flip_boxes`), weighted by their position in the tile and shifted to the case: one
   prediction set per (model, mirror variant); then nnDetection's ensembler (:mod:`nnpre_detection.ensemble`):
   per set top 1000 -> class-wise NMS at IoU 0.1 -> top 100, and weighted box clustering across the sets
   with ``n_exp_preds`` = their number; parameters from the model folder's ``inference_plan.json`` (written
   by :mod:`nnpre_detection.postprocess_sweep`) or nnDetection's defaults;
3. :func:`to_original_index` undoes resampling and cropping; :func:`boxes_to_world` maps corners with
   ``TransformContinuousIndexToPhysicalPoint`` (array axes (0, 1, 2) = SimpleITK index (2, 1, 0)).

Coordinates follow :mod:`nnpre_detection.instances`: voxel centres sit at integer coordinates, boxes are
``(a0_1, a1_1, a0_2, a1_2, a2_1, a2_2)``.
"""
from __future__ import annotations

import itertools
import os
import re
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from nnpre.errors import fail
from nnpre_detection.boxes import HI_3D, LO_3D, box_iou, clip_boxes
from nnpre_detection.ensemble import InferencePlan, PredictionSet, ensemble_case
from nnpre_detection.wbc import weighted_box_clustering

#: WBC IoU threshold of nnDetection's ensembler (0.5); used by :func:`merge_detections`.
WBC_IOU = 0.5
#: nnU-Net's input naming: ``<case>_<4-digit channel><ending>``.
CHANNEL_RE = re.compile(r"^(?P<case>.+)_(?P<ch>\d{4})(?P<ending>\.nii\.gz|\.nii|\.mha|\.nrrd)$")


def flip_boxes(boxes: torch.Tensor, axes: Sequence[int], shape: Sequence[int]) -> torch.Tensor:
    """Boxes predicted on an image flipped along ``axes`` -> boxes of the unflipped image.

    Voxel centres are integer coordinates, so flipping axis k of size S maps coordinate c to S - 1 - c and
    swaps the bounds: ``lo' = S - 1 - hi``, ``hi' = S - 1 - lo`` (its own inverse).

    Args:
        boxes: (N, 6) nnDetection layout. axes: spatial axes 0..2 that were flipped. shape: (X, Y, Z).
    """
    out = boxes.clone()
    for k in axes:
        lo, hi = LO_3D[k], HI_3D[k]
        s = float(shape[k]) - 1.0
        out[:, lo] = s - boxes[:, hi]
        out[:, hi] = s - boxes[:, lo]
    return out


def _starts(size: int, tile: int, overlap: float) -> List[int]:
    from nnunetv2.inference.sliding_window_prediction import compute_steps_for_sliding_window

    return compute_steps_for_sliding_window((size,), (tile,), 1.0 - overlap)[0]


def mirror_variants(mirror: bool, mirror_axes: Sequence[int] = (0, 1, 2)) -> List[tuple]:
    """Test-time mirror variants: every subset of ``mirror_axes`` (8 for 3 axes, nnDetection's 3D TTA), the
    identity first; ``[()]`` without mirroring."""
    if not mirror:
        return [()]
    return [c for r in range(len(mirror_axes) + 1) for c in itertools.combinations(mirror_axes, r)]


@torch.no_grad()
def predict_case_sets(models, image: torch.Tensor, patch_size: Sequence[int], overlap: float = 0.5,
                      mirror: bool = True, mirror_axes: Sequence[int] = (0, 1, 2),
                      model_weights: Optional[Sequence[float]] = None) -> List[PredictionSet]:
    """Raw prediction sets of one preprocessed case, one per (model, mirror variant) pair (nnDetection's
    ``Predictor.predict_tiles`` + ``BoxEnsemblerSelective.process_batch``).

    Every tile runs through ``RetinaUNet.predict_patch`` (per patch: top 10000, NMS 0.6, top 100); boxes are
    flipped back, weighted by their position in the tile (:func:`~nnpre_detection.ensemble.tile_position_weight`
    x the model weight) and shifted to the case.

    Args:
        models: one :class:`~nnpre_detection.retina_unet.RetinaUNet` or a sequence (e.g. fold models), put in
            eval mode here. image: (C, X, Y, Z) float preprocessed image (any device).
        patch_size: (3,) tile size (the plans' patch size). overlap: tile overlap fraction in [0, 1) (0.5).
        mirror: test-time mirroring over every subset of ``mirror_axes``.
        model_weights: per-model weights (default 1 each).

    Returns:
        ``len(models) * len(variants)`` :class:`~nnpre_detection.ensemble.PredictionSet` in case voxel
        coordinates (model-major order), on CPU.
    """
    models = list(models) if isinstance(models, (list, tuple)) else [models]
    if image.ndim != 4:
        fail(f"predict_case expects a (C, X, Y, Z) image, got shape {tuple(image.shape)}")
    if not 0 <= overlap < 1:
        fail(f"overlap must be in [0, 1), got {overlap}")
    weights = [1.0] * len(models) if model_weights is None else [float(w) for w in model_weights]
    if len(weights) != len(models):
        fail(f"got {len(weights)} model weights for {len(models)} models")
    shape = tuple(int(s) for s in image.shape[1:])
    ps = tuple(int(p) for p in patch_size)
    padded = tuple(max(s, p) for s, p in zip(shape, ps))
    img = image.float()
    if padded != shape:
        img = torch.nn.functional.pad(img, [v for s, p in zip(reversed(shape), reversed(padded)) for v in (0, p - s)])
    variants = mirror_variants(mirror, mirror_axes)
    tiles: List[List[dict]] = [[] for _ in range(len(models) * len(variants))]
    for m in models:
        m.eval()
    for start in itertools.product(*[_starts(s, p, overlap) for s, p in zip(padded, ps)]):
        tile = img[:, start[0]:start[0] + ps[0], start[1]:start[1] + ps[1], start[2]:start[2] + ps[2]][None]
        for mi, model in enumerate(models):
            x0 = tile.to(next(model.parameters()).device)
            for vi, axes in enumerate(variants):
                x = torch.flip(x0, [a + 2 for a in axes]) if axes else x0
                det = model.predict_patch(x)[0]
                b = det["boxes"].float().cpu()
                if axes:
                    b = flip_boxes(b, axes, ps)
                tiles[mi * len(variants) + vi].append({"boxes": b, "scores": det["scores"].float().cpu(),
                                                       "labels": det["labels"].long().cpu(), "origin": start})
    return [PredictionSet.from_tiles(t, ps, weights[i // len(variants)]) for i, t in enumerate(tiles)]


@torch.no_grad()
def predict_case(model, image: torch.Tensor, patch_size: Sequence[int], overlap: float = 0.5, mirror: bool = True,
                 mirror_axes: Sequence[int] = (0, 1, 2), plan: Optional[InferencePlan] = None,
                 model_weights: Optional[Sequence[float]] = None) -> Dict[str, torch.Tensor]:
    """Detections of one preprocessed case (nnDetection's whole-case pipeline, :mod:`nnpre_detection.ensemble`).

    :func:`predict_case_sets` per (model, mirror variant), then per set top-k / NMS / top-N and WBC across
    sets with ``n_exp_preds`` = the number of sets (:func:`~nnpre_detection.ensemble.ensemble_case`).

    Args:
        model: a :class:`~nnpre_detection.retina_unet.RetinaUNet` or a sequence of them (fold ensemble).
        image: (C, X, Y, Z) float preprocessed image. patch_size: (3,) tile size. overlap: in [0, 1).
        mirror: 8 mirror variants (3 axes) instead of 1. plan: post-processing parameters (default
            nnDetection's). model_weights: per-model weights.

    Returns:
        ``{"boxes": (K, 6) float32 in case voxel coordinates, "scores": (K,), "labels": (K,) long}`` on CPU.
    """
    sets = predict_case_sets(model, image, patch_size, overlap, mirror, mirror_axes, model_weights)
    return ensemble_case(sets, tuple(int(s) for s in image.shape[1:]), plan or InferencePlan())


def isolated_boxes(boxes: torch.Tensor, labels: torch.Tensor, iou_threshold: float, chunk: int = 256) -> torch.Tensor:
    """(N,) bool: boxes whose IoU with every other box of the same label is <= ``iou_threshold``.

    Pairs are only compared where they can overlap: boxes are sorted by their axis-0 centre, and two boxes
    that intersect have centres closer than the longest axis-0 side, so each chunk of sorted boxes is compared
    (with :func:`~nnpre_detection.boxes.box_iou`, as WBC does) with one contiguous range of candidates.

    Args:
        boxes: (N, 6) nnDetection layout. labels: (N,) classes. iou_threshold: WBC's cluster threshold.
    """
    n = boxes.shape[0]
    if n <= 1:
        return torch.ones(n, dtype=torch.bool, device=boxes.device)
    b = boxes.float()
    centre = (b[:, LO_3D[0]] + b[:, HI_3D[0]]) / 2
    reach = float((b[:, HI_3D[0]] - b[:, LO_3D[0]]).max())
    order = torch.argsort(centre)
    b, centre, lab = b[order], centre[order], labels[order]
    has_neighbour = torch.zeros(n, dtype=torch.bool, device=boxes.device)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        lo = int(torch.searchsorted(centre, centre[s] - reach))
        hi = int(torch.searchsorted(centre, centre[e - 1] + reach, right=True))
        iou = box_iou(b[s:e], b[lo:hi])
        iou[torch.arange(e - s), torch.arange(s, e) - lo] = 0.0  # not its own neighbour
        has_neighbour[s:e] = ((iou > iou_threshold) & (lab[s:e, None] == lab[None, lo:hi])).any(dim=1)
    out = torch.empty(n, dtype=torch.bool, device=boxes.device)
    out[order] = ~has_neighbour
    return out


def merge_detections(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, n_exp_preds: float,
                     iou_threshold: float = WBC_IOU):
    """``weighted_box_clustering`` of the tile / mirror predictions of a case, isolated boxes merged at once.

    A box whose IoU with every other box of its class is at most the threshold (:func:`isolated_boxes`) is
    a cluster of its own in WBC and no other cluster involves it. So WBC's result is WBC of the other boxes
    plus, per isolated box, WBC's single-member cluster, computed here with WBC's own operations: score
    ``s / (1 + max(0, n_exp_preds - 1))`` (weight and self-IoU 1), box ``s * b / s`` (= b), kept if the score
    is > 0. Most tile predictions are isolated low-score boxes and WBC's loop costs Python time per cluster,
    so this removes most of its iterations (on the sliding-window benchmark WBC was 14 % of the network time).
    Same boxes, scores and labels as one ``weighted_box_clustering`` call, sorted by descending score (ties
    in WBC's order, except that a merged cluster precedes an isolated box of exactly equal score).

    Returns:
        boxes (K, 6) float32, scores (K,), labels (K,) long.
    """
    iso = isolated_boxes(boxes, labels, iou_threshold)
    if not bool(iso.any()):
        return weighted_box_clustering(boxes, scores, labels, n_exp_preds=n_exp_preds, iou_threshold=iou_threshold)
    rest = ~iso
    cb, cs, cl = weighted_box_clustering(boxes[rest], scores[rest], labels[rest], n_exp_preds=n_exp_preds,
                                         iou_threshold=iou_threshold)
    idx = torch.nonzero(iso, as_tuple=False).flatten()
    idx = idx[torch.argsort(labels[idx], stable=True)]  # WBC visits classes in ascending order
    s = scores[idx].float()
    b = boxes[idx].float()
    one = torch.ones_like(s)
    n_missing = (torch.as_tensor(n_exp_preds, dtype=torch.float32, device=s.device) - 1.0).clamp(min=0)
    score = (one * s) / (one + n_missing * one)
    us = one * s
    pos = us > 0
    b = torch.where(pos[:, None], (us[:, None] * b) / torch.where(pos, us, one)[:, None], b)
    keep = score > 0.0
    b, s, lab = torch.cat((cb, b[keep])), torch.cat((cs, score[keep])), torch.cat((cl, labels[idx][keep].long()))
    order = torch.argsort(s, descending=True, stable=True)
    return b[order], s[order], lab[order]


def to_original_index(boxes: np.ndarray, preprocessed_shape: Sequence[int], properties: dict) -> np.ndarray:
    """Map boxes from the preprocessed array to the original image's array index space.

    Undoes resampling (scale ``cropped / resampled`` per axis, voxel-centre aligned: ``c -> (c + 0.5) * f -
    0.5``) and cropping (adds ``bbox_used_for_cropping`` lower bounds).

    Args:
        boxes: (N, 6) in preprocessed voxel coordinates. preprocessed_shape: (X, Y, Z) of the preprocessed array.
        properties: the preprocessor's properties (``shape_after_cropping_and_before_resampling``,
            ``bbox_used_for_cropping``).
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 6)
    cropped = properties["shape_after_cropping_and_before_resampling"]
    bbox = properties["bbox_used_for_cropping"]
    out = boxes.copy()
    for k in range(3):
        f = float(cropped[k]) / float(preprocessed_shape[k])
        for col in (LO_3D[k], HI_3D[k]):
            out[:, col] = (boxes[:, col] + 0.5) * f - 0.5 + float(bbox[k][0])
    return out


def boxes_to_world(boxes: np.ndarray, reference) -> np.ndarray:
    """World bounding boxes ``(xmin, ymin, zmin, xmax, ymax, zmax)`` in mm of index-space boxes.

    Args:
        boxes: (N, 6) nnDetection layout in array index space (axis 0 = SimpleITK index 2).
        reference: the ``SimpleITK.Image`` the array came from (origin, spacing, direction).

    Returns:
        (N, 6) float64: min / max over the 8 transformed box corners.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 6)
    out = np.zeros((boxes.shape[0], 6))
    for i, b in enumerate(boxes):
        pts = []
        for a0, a1, a2 in itertools.product((b[0], b[2]), (b[1], b[3]), (b[4], b[5])):
            pts.append(reference.TransformContinuousIndexToPhysicalPoint((float(a2), float(a1), float(a0))))
        pts = np.asarray(pts)
        out[i, :3], out[i, 3:] = pts.min(0), pts.max(0)
    return out


# ------------------------------------------------------------------------------------------------ model I/O
def find_checkpoint(model_dir: str, checkpoint: str = "checkpoint_final.pth") -> str:
    """``model_dir/checkpoint`` or, for a trainer folder, ``model_dir/fold_*/checkpoint`` (exactly one)."""
    direct = os.path.join(model_dir, checkpoint)
    if os.path.isfile(direct):
        return direct
    if not os.path.isdir(model_dir):
        fail(f"model folder {model_dir} does not exist")
    found = sorted(os.path.join(model_dir, d, checkpoint) for d in os.listdir(model_dir)
                   if d.startswith("fold_") and os.path.isfile(os.path.join(model_dir, d, checkpoint)))
    if len(found) != 1:
        fail(f"{model_dir}: expected {checkpoint} in the folder or in exactly one fold_* subfolder, found "
             f"{len(found)}; pass the fold folder with -m")
    return found[0]


def load_detector(checkpoint_path: str, device: torch.device = torch.device("cpu")):
    """Rebuild the Retina U-Net of a ``nnPreDetectionTrainer`` checkpoint (loaded with ``weights_only=True``).

    An adapter run's checkpoint (``nnpre_run.adapter``, e.g. LoRA: ``...conv.base.weight`` + ``lora_A/B``) gets its
    recorded adapter applied to the rebuilt model before the weights load, as the trainer did before training
    (:func:`nnpre_trainers.adapters.adapter_from_dict`); ``nnPre_export --full`` output loads as it is.

    Returns:
        (model in eval mode on ``device``, the checkpoint's ``nnpre_detection`` dict).
    """
    from nnpre.checkpoints import safe_load, strip_prefixes
    from nnpre_detection.retina_unet import build_retina_unet

    ck = safe_load(checkpoint_path)
    info = ck.get("nnpre_detection")
    if not isinstance(info, dict):
        fail(f"{checkpoint_path} is not a detection checkpoint (no 'nnpre_detection' entry); train with "
             f"nnPre_train detect")
    cfg = {k: (tuple(v) if isinstance(v, list) else v) for k, v in info["config"].items()}
    model = build_retina_unet(info["arch_class_name"], info["arch_kwargs"], int(info["num_input_channels"]),
                              int(info["num_classes"]), anchor_sizes=info["anchor_sizes"],
                              arch_kwargs_req_import=info["arch_kwargs_req_import"], **cfg)
    adapter = (ck.get("nnpre_run") or {}).get("adapter")
    if adapter and adapter.get("name", "full") != "full":
        from nnpre_trainers.adapters import adapter_from_dict

        adapter_from_dict(adapter).apply(model)
    model.load_state_dict(strip_prefixes(ck["network_weights"]))
    return model.to(device).eval(), info


# ------------------------------------------------------------------------------------------------ folders
def group_input_files(in_folder: str, num_channels: int, file_ending: Optional[str] = None) -> Dict[str, List[str]]:
    """``{case: [channel files in order]}`` for nnU-Net-named inputs (``case_0000.nii.gz``, ...)."""
    if not os.path.isdir(in_folder):
        fail(f"input folder {in_folder} does not exist")
    cases: Dict[str, Dict[int, str]] = {}
    for fn in sorted(os.listdir(in_folder)):
        m = CHANNEL_RE.match(fn)
        if m is None or (file_ending and m.group("ending") != file_ending):
            continue
        cases.setdefault(m.group("case"), {})[int(m.group("ch"))] = os.path.join(in_folder, fn)
    if not cases:
        fail(f"{in_folder}: no input images named like CASE_0000{file_ending or '.nii.gz'}")
    out = {}
    for case, chans in cases.items():
        if sorted(chans) != list(range(num_channels)):
            fail(f"{in_folder}: case '{case}' has channels {sorted(chans)} but the model expects "
                 f"{list(range(num_channels))} (files {case}_0000..{case}_{num_channels - 1:04d}); add or remove "
                 f"channel files")
        out[case] = [chans[c] for c in range(num_channels)]
    return out


def check_finite(files: Sequence[str]):
    """Read ``files`` with :func:`nnpre.image_io.read_image` (3-D only; truncated files and NaN/Inf voxels -> one
    NnPreError line naming the file; ITK's NIfTI reader alone would turn NaN into 0). Returns the first image."""
    from nnpre.image_io import read_image

    ref = None
    for f in files:
        im = read_image(f, kind="image", ndim=3)
        ref = ref or im
    return ref


def fold_model_dirs(model_dir: str, folds: Optional[Sequence] = None) -> List[str]:
    """Model folders to ensemble: ``model_dir`` itself, or ``model_dir/fold_<f>`` for each of ``folds``.

    Args:
        model_dir: a fold folder (``folds=None``) or the trainer folder holding ``fold_*`` subfolders.
        folds: fold names (``0``, ``1``, ..., or ``all``) as ``nnPre_predict -f 0 1 2 3 4``.
    """
    if not folds:
        return [model_dir]
    if not os.path.isdir(model_dir):
        fail(f"model folder {model_dir} does not exist")
    dirs = []
    for f in folds:
        d = os.path.join(model_dir, f"fold_{f}")
        if not os.path.isdir(d):
            have = sorted(x for x in os.listdir(model_dir) if x.startswith("fold_"))
            fail(f"{model_dir} has no fold_{f} folder (found {have}); with -f pass the trainer folder that holds "
                 f"the fold_* folders")
        dirs.append(d)
    if len(set(dirs)) != len(dirs):
        fail(f"folds {list(folds)} name a fold twice; list each fold once")
    return dirs


def load_fold_detectors(model_dirs: Sequence[str], checkpoint: str = "checkpoint_final.pth",
                        device: torch.device = torch.device("cpu")):
    """Load one detector per folder; all must share plans configuration, patch size, channels and classes.

    Returns:
        (list of models in eval mode, the first checkpoint's ``nnpre_detection`` dict).
    """
    models, infos = [], []
    for d in model_dirs:
        m, info = load_detector(find_checkpoint(d, checkpoint), device)
        models.append(m)
        infos.append(info)
    ref = infos[0]
    for d, info in zip(model_dirs[1:], infos[1:]):
        for key in ("configuration", "num_input_channels", "num_classes"):
            if info[key] != ref[key]:
                fail(f"{d}: {key} {info[key]!r} differs from {model_dirs[0]} ({ref[key]!r}); ensemble only folds "
                     f"of one training setup")
        pa = info["plans"]["configurations"][info["configuration"]].get("patch_size")
        pb = ref["plans"]["configurations"][ref["configuration"]].get("patch_size")
        if list(pa) != list(pb):
            fail(f"{d}: patch size {pa} differs from {model_dirs[0]} ({pb}); ensemble only folds of one plans file")
    return models, ref


def resolve_inference_plan(model_dirs: Sequence[str], trainer_dir: Optional[str] = None):
    """The post-processing parameters for these models and where they came from.

    One model: its folder's ``inference_plan.json`` (the sweep at the end of ``nnPre_train detect``). Several
    (fold ensemble): the trainer folder's consolidated plan; if missing and every fold cached its sweep
    predictions, the sweep is rerun on the pooled validation predictions of all folds (as nnDetection's
    ``nndet_consolidate --sweep_boxes``) and saved there. Otherwise nnDetection's defaults.

    Returns:
        (:class:`~nnpre_detection.ensemble.InferencePlan`, description of the source).
    """
    from nnpre_detection.ensemble import load_inference_plan

    if len(model_dirs) == 1:
        plan = load_inference_plan(model_dirs[0])
        if plan is not None:
            return plan, os.path.join(model_dirs[0], "inference_plan.json")
        return InferencePlan(), "nnDetection defaults (no inference_plan.json in the model folder)"
    if trainer_dir is not None:
        plan = load_inference_plan(trainer_dir)
        if plan is not None:
            return plan, os.path.join(trainer_dir, "inference_plan.json")
        from nnpre_detection.postprocess_sweep import consolidate_sweep, has_sweep_cache

        if all(has_sweep_cache(d) for d in model_dirs):
            plan = consolidate_sweep(trainer_dir, model_dirs)
            return plan, f"sweep over the pooled validation predictions of {len(model_dirs)} folds"
    return InferencePlan(), "nnDetection defaults (no consolidated inference_plan.json for these folds)"


def predict_folder(model_dir: str, in_folder: str, out_folder: str, checkpoint: str = "checkpoint_final.pth",
                   mirror: bool = True, overlap: float = 0.5, device: torch.device = torch.device("cpu"),
                   progress: bool = True, save_instances: bool = False,
                   instance_min_score: float = 0.5, folds: Optional[Sequence] = None,
                   plan: Optional[InferencePlan] = None) -> List[str]:
    """Predict every case of ``in_folder`` and write ``out_folder/<case>.json`` (atomically).

    Args:
        model_dir: fold folder, or with ``folds`` the trainer folder (fold ensemble: one prediction set per
            (fold model, mirror variant), merged by WBC as nnDetection does).
        plan: post-processing parameters; ``None`` = :func:`resolve_inference_plan`.

    Returns:
        the written JSON paths. JSON keys: ``case, boxes, scores, labels, boxes_world, spacing, origin,
        direction`` (see :mod:`nnpre_detection.metrics.io`). With ``save_instances`` also
        ``out_folder/<case>_instances.nii.gz``: boxes scoring at least ``instance_min_score`` painted as
        numbered cuboids in the input image's geometry (for viewers).
    """
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from tqdm import tqdm

    from nnpre.atomic import write_json

    model_dirs = fold_model_dirs(model_dir, folds)
    models, info = load_fold_detectors(model_dirs, checkpoint, device)
    if plan is None:
        plan, source = resolve_inference_plan(model_dirs, model_dir if folds else None)
        if progress:
            print(f"post-processing parameters: {source}")
    plans_manager = PlansManager(info["plans"])
    cm = plans_manager.get_configuration(info["configuration"])
    dataset_json = info["dataset_json"]
    cases = group_input_files(in_folder, int(info["num_input_channels"]), dataset_json.get("file_ending"))
    os.makedirs(out_folder, exist_ok=True)
    preprocessor = cm.preprocessor_class(verbose=False)
    written = []
    for case, files in tqdm(cases.items(), desc="predict", disable=not progress):
        ref = check_finite(files)
        data, _, props = preprocessor.run_case(files, None, plans_manager, cm, dataset_json)
        det = predict_case(models, torch.from_numpy(np.asarray(data, dtype=np.float32)), cm.patch_size,
                           overlap=overlap, mirror=mirror, plan=plan)
        boxes = to_original_index(det["boxes"].numpy(), data.shape[1:], props)
        orig_shape = props["shape_before_cropping"]
        boxes = clip_boxes(torch.from_numpy(boxes), orig_shape).numpy()
        path = os.path.join(out_folder, f"{case}.json")
        write_json({
            "case": case,
            "boxes": boxes.tolist(),
            "scores": det["scores"].tolist(),
            "labels": det["labels"].tolist(),
            "boxes_world": boxes_to_world(boxes, ref).tolist(),
            "spacing": list(ref.GetSpacing()),
            "origin": list(ref.GetOrigin()),
            "direction": list(ref.GetDirection()),
            "shape": list(ref.GetSize()),  # SimpleITK (x, y, z); nnPre_evaluate checks it against the ground truth
        }, path)
        if save_instances:
            from nnpre_detection.instance_map import write_instance_map

            write_instance_map(boxes, det["scores"].numpy(), ref, os.path.join(out_folder, f"{case}_instances.nii.gz"),
                               instance_min_score)
        written.append(path)
    return written
