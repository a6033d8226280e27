"""nnDetection's empirical post-processing sweep on validation predictions.

After training, nnDetection (``RetinaUNetModule.sweep``, ``nndet/inference/sweeper.py``) predicts the fold's
validation cases with the last checkpoint and 8 mirror TTAs, caches the raw prediction sets of every case
(top 1000 boxes per (model, TTA) set), and then tunes the whole-case post-processing
(:class:`~nnpre_detection.ensemble.InferencePlan`) greedily, one parameter at a time in this order, starting
from the defaults and keeping the best value of each parameter before moving to the next:

==========================  ===============================================
``model_iou``               1e-5, 0.1, 0.2, 0.3, 0.4, 0.5
``model_nms_fn``            weighted, plain
``ensemble_iou``            1e-5, 0.1, 0.2, 0.3, 0.4, 0.5
``model_score_thresh``      0.0, 0.1, ..., 0.6
``remove_small_boxes``      0.01, 2, 3, 4, 5, 6, 7
==========================  ===============================================

(``BoxEnsemblerSelective.sweep_parameters``). The objective is ``mAP_IoU_0.10_0.50_0.05_MaxDet_100`` of the
fast evaluator (IoU list 0.1, 0.5) in preprocessed voxel space; ties go to the first value (``np.argmax``).
The result is saved as ``inference_plan.json`` in the model folder, where ``nnPre_predict`` reads it; the
cached predictions (``sweep_predictions/<case>.npz``, plain numpy arrays) let a fold ensemble re-sweep on the
pooled validation cases of all folds without predicting again (:func:`consolidate_sweep`, nnDetection's
``nndet_consolidate --sweep_boxes``).

At the end of detection training (:class:`nnpre_detection.task.DetectionTask`) the trainer's network (the last
weights, as nnDetection sweeps the last checkpoint), validation keys and preprocessed folder are passed in.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from nnpre.errors import fail
from nnpre_detection.ensemble import InferencePlan, PredictionSet, ensemble_case, save_inference_plan

#: Sweep objective (nnDetection ``RetinaUNetModule.eval_score_key``).
SWEEP_METRIC = "mAP_IoU_0.10_0.50_0.05_MaxDet_100"
#: Folder of cached validation prediction sets inside a model folder.
CACHE_DIR = "sweep_predictions"
_IOUS = (1e-5, 0.1, 0.2, 0.3, 0.4, 0.5)
#: Parameters and candidate values in nnDetection's sweep order.
SWEEP_VALUES: Dict[str, tuple] = {
    "model_iou": _IOUS,
    "model_nms_fn": ("weighted", "plain"),
    "ensemble_iou": _IOUS,
    "model_score_thresh": (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6),
    "remove_small_boxes": (1e-2, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0),
}

CaseSets = Mapping[str, Tuple[Sequence[PredictionSet], Sequence[int]]]


def evaluate_plan(plan: InferencePlan, case_sets: CaseSets, ground_truth: Mapping[str, dict],
                  num_classes: int) -> dict:
    """Fast-evaluator metrics (IoU list 0.1, 0.5) of the ensembled predictions of every case under ``plan``.

    Args:
        plan: post-processing parameters. case_sets: ``{case: (prediction sets, (X, Y, Z) shape)}``.
        ground_truth: ``{case: {"boxes": (G, 6), "classes": (G,)}}`` in the same voxel space.
        num_classes: detection classes.
    """
    from nnpre_detection.metrics.evaluate import evaluate_boxes

    preds = {}
    for case, (sets, shape) in case_sets.items():
        d = ensemble_case(sets, shape, plan)
        preds[case] = {k: v.numpy() for k, v in d.items()}
    return evaluate_boxes(preds, ground_truth, classes=int(num_classes), missing_predictions="empty")["metrics"]


def _score(metrics: dict, key: str) -> float:
    v = metrics.get(key)
    if v is None:
        fail(f"sweep metric {key!r} is not computed; choose one of {sorted(metrics)}")
    v = float(v)
    return v if np.isfinite(v) else float("-inf")


def sweep_inference_plan(case_sets: CaseSets, ground_truth: Mapping[str, dict], num_classes: int,
                         values: Optional[Mapping[str, Sequence]] = None, initial: Optional[InferencePlan] = None,
                         target_metric: str = SWEEP_METRIC) -> Tuple[InferencePlan, List[dict]]:
    """Greedy one-parameter-at-a-time sweep (nnDetection ``BoxSweeper.run_postprocessing_sweep``).

    Args:
        case_sets / ground_truth / num_classes: as :func:`evaluate_plan`.
        values: ``{parameter: candidates}`` in sweep order (default :data:`SWEEP_VALUES`).
        initial: starting plan (default nnDetection's defaults). target_metric: metric to maximise.

    Returns:
        (best plan, history: one ``{"parameter", "value", "score"}`` entry per evaluated value).
    """
    if not case_sets:
        fail("post-processing sweep: no validation cases to sweep on; the fold needs at least one validation case")
    plan = initial or InferencePlan()
    values = SWEEP_VALUES if values is None else values
    history = []
    for name, candidates in values.items():
        scores = []
        for v in candidates:
            s = _score(evaluate_plan(plan.replace(**{name: v}), case_sets, ground_truth, num_classes), target_metric)
            scores.append(s)
            history.append({"parameter": name, "value": v, "score": s})
        plan = plan.replace(**{name: candidates[int(np.argmax(scores))]})
    return plan, history


# ------------------------------------------------------------------------------------------------ cache
def save_case_cache(folder: str, case: str, sets: Sequence[PredictionSet], shape: Sequence[int], gt: dict,
                    num_classes: int) -> str:
    """Write ``folder/<case>.npz``: the case's sets (``boxes_i``, ``scores_i``, ``labels_i``, ``weights_i``),
    its shape, its ground truth and the number of classes (plain arrays, loaded without pickle)."""
    from nnpre.atomic import write_with

    arrays = {"shape": np.asarray(shape, dtype=np.int64), "num_sets": np.asarray(len(sets)),
              "num_classes": np.asarray(int(num_classes)),
              "gt_boxes": np.asarray(gt["boxes"], dtype=np.float32).reshape(-1, 6),
              "gt_classes": np.asarray(gt["classes"], dtype=np.int64).reshape(-1)}
    for i, p in enumerate(sets):
        for k, v in p.to_arrays().items():
            arrays[f"{k}_{i}"] = v
    path = os.path.join(folder, f"{case}.npz")
    os.makedirs(folder, exist_ok=True)

    def _write(tmp: str):
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    write_with(_write, path)
    return path


def load_cache(folder: str) -> Tuple[Dict[str, tuple], Dict[str, dict], int]:
    """Read every ``<case>.npz`` of a cache folder -> (case_sets, ground_truth, num_classes)."""
    if not os.path.isdir(folder):
        fail(f"{folder} does not exist; run the post-processing sweep of that fold first")
    case_sets, gts, num_classes = {}, {}, 1
    for fn in sorted(os.listdir(folder)):
        if not fn.endswith(".npz"):
            continue
        path = os.path.join(folder, fn)
        try:
            with np.load(path, allow_pickle=False) as z:
                n = int(z["num_sets"])
                sets = [PredictionSet.from_arrays({k: z[f"{k}_{i}"] for k in ("boxes", "scores", "labels", "weights")})
                        for i in range(n)]
                case = fn[:-4]
                case_sets[case] = (sets, tuple(int(v) for v in z["shape"]))
                gts[case] = {"boxes": z["gt_boxes"], "classes": z["gt_classes"]}
                num_classes = max(num_classes, int(z["num_classes"]))
        except (OSError, KeyError, ValueError) as e:
            fail(f"{path} is not a sweep cache file ({e}); delete {folder} and rerun the sweep")
    return case_sets, gts, num_classes


def has_sweep_cache(model_folder: str) -> bool:
    d = os.path.join(model_folder, CACHE_DIR)
    return os.path.isdir(d) and any(f.endswith(".npz") for f in os.listdir(d))


# ------------------------------------------------------------------------------------------------ folds
def ground_truth_from_seg(seg: np.ndarray) -> dict:
    """Boxes and classes of the 26-connected components of a preprocessed (1, X, Y, Z) or (X, Y, Z) label map
    (label ``v`` = class ``v - 1``; negative padding values count as background)."""
    from nnpre_detection.instances import boxes_from_instances, semantic_to_instances

    seg = np.asarray(seg)
    if seg.ndim == 4:
        seg = seg[0]
    inst, mapping = semantic_to_instances(np.clip(np.rint(seg), 0, None).astype(np.int64))
    boxes, ids = boxes_from_instances(inst)
    return {"boxes": boxes.reshape(-1, 6).astype(np.float32),
            "classes": np.asarray([mapping[int(i)] for i in ids], dtype=np.int64)}


def dataset_class_for(folder: str):
    """nnU-Net's dataset class for a preprocessed folder (Blosc2 when ``.b2nd`` files are present, else numpy);
    unlike ``infer_dataset_class`` it ignores other files such as nnpre's preprocessing record."""
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2, nnUNetDatasetNumpy

    return nnUNetDatasetBlosc2 if any(f.endswith(".b2nd") for f in os.listdir(folder)) else nnUNetDatasetNumpy


def _validation_cases(model_folder: str, info: dict) -> Tuple[str, List[str]]:
    """(preprocessed folder, validation keys of the fold) from nnU-Net's folders and ``splits_final.json``."""
    from nnunetv2.paths import nnUNet_preprocessed

    if not nnUNet_preprocessed:
        fail("nnUNet_preprocessed is not set; export it or pass preprocessed_folder and case_ids")
    name = info["plans"]["dataset_name"]
    ident = info["plans"]["configurations"][info["configuration"]].get("data_identifier")
    folder = os.path.join(nnUNet_preprocessed, name, ident)
    base = os.path.basename(os.path.normpath(model_folder))
    if not base.startswith("fold_"):
        fail(f"{model_folder} is not a fold_* folder; pass case_ids (the validation cases) explicitly")
    fold = base[len("fold_"):]
    if fold == "all":
        fail(f"{model_folder}: fold 'all' has no validation cases; pass case_ids explicitly")
    splits_file = os.path.join(nnUNet_preprocessed, name, "splits_final.json")
    try:
        with open(splits_file) as f:
            splits = json.load(f)
        return folder, list(splits[int(fold)]["val"])
    except (OSError, ValueError, IndexError, KeyError) as e:
        fail(f"{splits_file}: cannot read the validation cases of fold {fold} ({e}); pass case_ids explicitly")


def predict_validation_sets(model_folder: str, preprocessed_folder: Optional[str] = None,
                            case_ids: Optional[Sequence[str]] = None, checkpoint: str = "checkpoint_final.pth",
                            mirror: bool = True, overlap: float = 0.5, device: torch.device = torch.device("cpu"),
                            progress: bool = False, network=None, patch_size: Optional[Sequence[int]] = None
                            ) -> Tuple[Dict[str, tuple], Dict[str, dict], int]:
    """Predict the fold's validation cases in preprocessed space and cache their raw sets.

    Each case keeps the top ``model_topk`` (1000) boxes per set, as nnDetection's ``save_state``.

    Args:
        network / patch_size: an in-memory detector (e.g. the trainer's network at the end of training, which
            holds the last weights) and its tile size, instead of loading ``checkpoint``; then
            ``preprocessed_folder`` and ``case_ids`` are required.

    Returns:
        (case_sets, ground_truth, num_classes).
    """
    from tqdm import tqdm

    from nnpre_detection.inference import find_checkpoint, load_detector, predict_case_sets

    if network is not None:
        if preprocessed_folder is None or case_ids is None or patch_size is None:
            fail("predict_validation_sets with an in-memory network needs preprocessed_folder, case_ids and "
                 "patch_size")
        model, patch, num_classes = network, list(patch_size), int(network.num_classes)
        was_training = bool(network.training)
    else:
        model, info = load_detector(find_checkpoint(model_folder, checkpoint), device)
        if preprocessed_folder is None or case_ids is None:
            pf, keys = _validation_cases(model_folder, info)
            preprocessed_folder = preprocessed_folder or pf
            case_ids = keys if case_ids is None else case_ids
        patch = info["plans"]["configurations"][info["configuration"]]["patch_size"]
        num_classes = int(info["num_classes"])
    if not os.path.isdir(preprocessed_folder):
        fail(f"preprocessed folder {preprocessed_folder} does not exist; run nnPre_plan / preprocessing first")
    ds = dataset_class_for(preprocessed_folder)(preprocessed_folder, list(case_ids))
    cache = os.path.join(model_folder, CACHE_DIR)
    if os.path.isdir(cache):  # stale cases of an earlier sweep would enter a later consolidation
        for fn in os.listdir(cache):
            if fn.endswith(".npz"):
                os.remove(os.path.join(cache, fn))
    topk = InferencePlan().model_topk
    case_sets, gts = {}, {}
    for k in tqdm(list(case_ids), desc="sweep predictions", disable=not progress):
        data, seg, _, _ = ds.load_case(k)
        image = torch.from_numpy(np.asarray(data, dtype=np.float32))
        sets = [p.top(topk) for p in predict_case_sets(model, image, patch, overlap, mirror)]
        shape = tuple(int(s) for s in image.shape[1:])
        gt = ground_truth_from_seg(np.asarray(seg))
        save_case_cache(cache, k, sets, shape, gt, num_classes)
        case_sets[k], gts[k] = (sets, shape), gt
    if network is not None and was_training:
        model.train()  # predict_case_sets switched it to eval mode
    return case_sets, gts, num_classes


def run_postprocessing_sweep(model_folder: str, preprocessed_folder: Optional[str] = None,
                             case_ids: Optional[Sequence[str]] = None, checkpoint: str = "checkpoint_final.pth",
                             mirror: bool = True, overlap: float = 0.5, device: torch.device = torch.device("cpu"),
                             values: Optional[Mapping[str, Sequence]] = None,
                             progress: bool = False, network=None,
                             patch_size: Optional[Sequence[int]] = None) -> InferencePlan:
    """Predict the validation cases, sweep the post-processing and save ``model_folder/inference_plan.json``.

    Args:
        model_folder: a fold folder of ``nnPre_train detect`` (holds ``checkpoint``).
        preprocessed_folder / case_ids: the trainer's ``preprocessed_dataset_folder`` and validation keys;
            ``None`` = from ``nnUNet_preprocessed`` and ``splits_final.json`` (fold from the folder name).
        checkpoint: nnDetection sweeps the last checkpoint (``checkpoint_final.pth``).
        mirror / overlap: prediction as at test time (nnDetection: 8 TTAs, 0.5).
        values: candidate values (default :data:`SWEEP_VALUES`).
        network / patch_size: sweep an in-memory detector (see :func:`predict_validation_sets`).

    Returns:
        the best plan (also written, with the sweep history, to ``inference_plan.json``).
    """
    case_sets, gts, num_classes = predict_validation_sets(model_folder, preprocessed_folder, case_ids, checkpoint,
                                                          mirror, overlap, device, progress, network, patch_size)
    plan, history = sweep_inference_plan(case_sets, gts, num_classes, values)
    save_inference_plan(plan, model_folder, {"metric": SWEEP_METRIC, "cases": sorted(case_sets),
                                             "checkpoint": checkpoint, "history": history})
    return plan


def consolidate_sweep(trainer_folder: str, model_folders: Sequence[str],
                      values: Optional[Mapping[str, Sequence]] = None) -> InferencePlan:
    """Re-sweep on the pooled cached validation predictions of several folds (each fold's cases predicted by
    its own model) and save ``trainer_folder/inference_plan.json`` (nnDetection ``nndet_consolidate``).

    The cached sets hold one fold model's TTA variants, as in nnDetection's consolidation sweep.
    """
    case_sets, gts, num_classes = {}, {}, 1
    for d in model_folders:
        cs, g, k = load_cache(os.path.join(d, CACHE_DIR))
        case_sets.update(cs)
        gts.update(g)
        num_classes = max(num_classes, k)
    plan, history = sweep_inference_plan(case_sets, gts, num_classes, values)
    save_inference_plan(plan, trainer_folder, {"metric": SWEEP_METRIC, "folds": [os.path.basename(d) for d in
                                                                              model_folders],
                                               "cases": sorted(case_sets), "history": history})
    return plan
