"""Whole-case box ensembling as nnDetection's ``BoxEnsemblerSelective`` (the v001 predictor's ensembler).

nnDetection (``nndet/inference/ensembler/detection.py``, ``nndet/inference/detection/{model,wbc}.py``) merges
the tile predictions of one case in two stages:

1. **per prediction set** -- one set per (model, test-time augmentation) pair, holding the per-patch
   detections of every tile shifted to case coordinates, each box weighted by its position in its tile
   (:func:`tile_position_weight`): sort by score, keep the top ``model_topk`` (1000), drop scores
   ``<= model_score_thresh`` (0.0), clip to the case, drop boxes with a side ``< remove_small_boxes`` (0.01),
   class-wise NMS at ``model_iou`` (0.1) ranking by ``score * weight`` ("weighted" NMS; the weights are
   reset to 1 afterwards) or by score alone ("plain" NMS; the tile weights are kept), keep the top
   ``model_detections_per_image`` (100);
2. **across sets**: concatenate the processed sets, keep the top ``ensemble_topk`` (1000) by score, then
   class-wise weighted box clustering (:func:`~nnpre_detection.wbc.weighted_box_clustering`) at
   ``ensemble_iou`` (0.5) with ``n_exp_preds`` = the number of sets and score threshold
   ``ensemble_score_thresh`` (0.0).

Because every set contributes at most one box per object after stage 1, a WBC cluster has at most one box
per set and WBC's missing-prediction penalty (``n_exp_preds - |cluster|``) measures how many (model, TTA)
pairs missed the object. The parameters are an :class:`InferencePlan`; its defaults are nnDetection's, and
:mod:`nnpre_detection.postprocess_sweep` tunes them on validation predictions as nnDetection's sweep does.

Boxes use the nnDetection layout ``(x1, y1, x2, y2, z1, z2)`` = array axes (0, 1, 0, 1, 2, 2).
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

from nnpre.errors import fail
from nnpre_detection.boxes import box_center, clip_boxes, remove_small_boxes
from nnpre_detection.nms import batched_nms
from nnpre_detection.wbc import weighted_box_clustering

#: File name of a tuned plan in a model (fold or trainer) folder.
INFERENCE_PLAN_FILE = "inference_plan.json"
#: nnDetection's plateau of the tile-position weight (``_get_box_in_tile_weight``: ``plateau_length = 0.5``).
TILE_WEIGHT_PLATEAU = 0.5
NMS_FUNCTIONS = ("weighted", "plain")


@dataclass(frozen=True)
class InferencePlan:
    """Whole-case post-processing parameters (defaults: nnDetection ``BoxEnsemblerSelective``).

    Attributes:
        model_iou: per-set class-wise NMS IoU threshold (0.1).
        model_nms_fn: ``"weighted"`` (rank by score x tile weight, then weights 1; nnDetection's
            ``batched_weighted_nms_model``, the default) or ``"plain"`` (rank by score, keep the weights).
        model_score_thresh: per-set score threshold, boxes ``> thresh`` are kept (0.0).
        model_topk: per-set candidates before NMS (1000).
        model_detections_per_image: per-set boxes after NMS (100).
        remove_small_boxes: minimal box side in voxels after clipping (0.01).
        ensemble_iou: WBC cluster IoU threshold (0.5).
        ensemble_topk: boxes entering WBC (1000).
        ensemble_score_thresh: WBC output threshold, scores ``> thresh`` are kept (0.0).
    """

    model_iou: float = 0.1
    model_nms_fn: str = "weighted"
    model_score_thresh: float = 0.0
    model_topk: int = 1000
    model_detections_per_image: int = 100
    remove_small_boxes: float = 1e-2
    ensemble_iou: float = 0.5
    ensemble_topk: int = 1000
    ensemble_score_thresh: float = 0.0

    def __post_init__(self):
        if self.model_nms_fn not in NMS_FUNCTIONS:
            fail(f"inference plan: model_nms_fn must be one of {NMS_FUNCTIONS}, got {self.model_nms_fn!r}")
        for name in ("model_iou", "ensemble_iou"):
            if not 0.0 <= float(getattr(self, name)) <= 1.0:
                fail(f"inference plan: {name} must be in [0, 1], got {getattr(self, name)}")

    def replace(self, **changes) -> "InferencePlan":
        """Copy with fields replaced; unknown names raise a one-line error."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            fail(f"unknown inference plan parameter(s) {unknown}; valid: {sorted(known)}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str = "inference plan") -> "InferencePlan":
        if not isinstance(d, dict):
            fail(f"{source}: expected a JSON object of inference parameters, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            fail(f"{source}: unknown parameter(s) {unknown}; valid: {sorted(known)} (delete the file to use defaults)")
        return cls().replace(**d)


def save_inference_plan(plan: InferencePlan, folder: str, extra: Optional[dict] = None) -> str:
    """Write ``folder/inference_plan.json`` atomically (``extra`` goes under the key ``"sweep"``)."""
    from nnpre.atomic import write_json

    path = os.path.join(folder, INFERENCE_PLAN_FILE)
    payload = plan.to_dict()
    if extra:
        payload = {**payload, "sweep": extra}
    write_json(payload, path)
    return path


def load_inference_plan(folder: str) -> Optional[InferencePlan]:
    """The plan in ``folder/inference_plan.json`` (``None`` when there is none)."""
    path = os.path.join(folder, INFERENCE_PLAN_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            d = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        fail(f"{path} is not valid JSON ({e}); delete it to use nnDetection's default parameters or rerun the sweep")
    if isinstance(d, dict):
        d = {k: v for k, v in d.items() if k != "sweep"}
    return InferencePlan.from_dict(d, path)


def tile_position_weight(centers: torch.Tensor, tile_size: Sequence[int]) -> torch.Tensor:
    """Weight of boxes by the position of their centre in the tile (nnDetection ``BoxEnsemblerSelective``).

    ``w = 1 - max(0, |c - t / 2| / |t / 2| - 0.5)`` with ``t`` the tile size and norms Euclidean: 1 on a
    plateau around the tile centre (up to half the centre-to-corner distance), then linear down to 0.5 at
    the tile corners.

    Args:
        centers: (N, 3) box centres in tile voxel coordinates. tile_size: (3,) tile shape.

    Returns:
        (N,) float32 weights in [0.5, 1] (lower outside the tile).
    """
    if centers.numel() == 0:
        return torch.zeros(0, dtype=torch.float32, device=centers.device)
    half = torch.as_tensor([float(t) for t in tile_size], dtype=torch.float32, device=centers.device) / 2.0
    dist = (centers.float() - half[None]).norm(dim=1) / half.norm()
    return 1.0 - (dist - TILE_WEIGHT_PLATEAU).clamp(min=0)


@dataclass
class PredictionSet:
    """The tile predictions of one (model, TTA) pair on one case, in case voxel coordinates.

    Attributes:
        boxes: (N, 6) float32. scores: (N,) in [0, 1]. labels: (N,) long class indices from 0.
        weights: (N,) tile-position weight x model weight.
    """

    boxes: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor
    weights: torch.Tensor

    @classmethod
    def empty(cls) -> "PredictionSet":
        return cls(torch.zeros((0, 6)), torch.zeros(0), torch.zeros(0, dtype=torch.long), torch.zeros(0))

    @classmethod
    def from_tiles(cls, tiles: Sequence[dict], tile_size: Sequence[int], model_weight: float = 1.0) -> "PredictionSet":
        """Collect per-tile detections.

        Args:
            tiles: per tile ``{"boxes": (K, 6) in tile coordinates (TTA already undone), "scores", "labels",
                "origin": (3,) tile start in the case}``.
            tile_size: (3,) tile shape (for the position weight). model_weight: multiplies every weight.
        """
        boxes, scores, labels, weights = [], [], [], []
        for t in tiles:
            b = torch.as_tensor(t["boxes"], dtype=torch.float32).reshape(-1, 6).cpu()
            o = [float(v) for v in t["origin"]]
            offset = torch.tensor([o[0], o[1], o[0], o[1], o[2], o[2]], dtype=torch.float32)
            weights.append(tile_position_weight(box_center(b), tile_size) * float(model_weight))
            boxes.append(b + offset)
            scores.append(torch.as_tensor(t["scores"], dtype=torch.float32).reshape(-1).cpu())
            labels.append(torch.as_tensor(t["labels"]).long().reshape(-1).cpu())
        if not boxes:
            return cls.empty()
        return cls(torch.cat(boxes), torch.cat(scores), torch.cat(labels), torch.cat(weights))

    def top(self, k: int) -> "PredictionSet":
        """The ``k`` highest-scoring boxes (what nnDetection caches per set for its sweep)."""
        order = torch.argsort(self.scores, descending=True, stable=True)[:k]
        return PredictionSet(self.boxes[order], self.scores[order], self.labels[order], self.weights[order])

    def to_arrays(self) -> Dict[str, object]:
        return {k: getattr(self, k).numpy() for k in ("boxes", "scores", "labels", "weights")}

    @classmethod
    def from_arrays(cls, d: dict) -> "PredictionSet":
        return cls(torch.as_tensor(d["boxes"]).float().reshape(-1, 6), torch.as_tensor(d["scores"]).float(),
                   torch.as_tensor(d["labels"]).long(), torch.as_tensor(d["weights"]).float())


def process_set(pred: PredictionSet, shape: Sequence[int], plan: InferencePlan = InferencePlan()) -> PredictionSet:
    """Stage 1 on one set: top-k, score threshold, clip, small boxes, class-wise NMS, top-N.

    Args:
        pred: one (model, TTA) set. shape: (X, Y, Z) case shape for clipping. plan: parameters.

    Returns:
        the kept boxes sorted by descending NMS rank (score, or score x weight for weighted NMS); weights are
        1 after weighted NMS and the tile weights after plain NMS (nnDetection ``batched_*_nms_model``).
    """
    order = torch.argsort(pred.scores, descending=True, stable=True)[: int(plan.model_topk)]
    order = order[pred.scores[order] > plan.model_score_thresh]
    b = clip_boxes(pred.boxes[order], shape)
    s, lab, w = pred.scores[order], pred.labels[order], pred.weights[order]
    keep = remove_small_boxes(b, plan.remove_small_boxes)
    b, s, lab, w = b[keep], s[keep], lab[keep], w[keep]
    rank = s * w if plan.model_nms_fn == "weighted" else s
    keep = batched_nms(b, rank, lab, plan.model_iou)[: int(plan.model_detections_per_image)]
    w = torch.ones_like(w[keep]) if plan.model_nms_fn == "weighted" else w[keep]
    return PredictionSet(b[keep], s[keep], lab[keep], w)


def ensemble_sets(sets: Sequence[PredictionSet], plan: InferencePlan = InferencePlan()) -> Dict[str, torch.Tensor]:
    """Stage 2: WBC across the processed sets with ``n_exp_preds = len(sets)``.

    Returns:
        ``{"boxes": (K, 6) float32, "scores": (K,), "labels": (K,) long}`` sorted by descending score.
    """
    if not sets:
        return {"boxes": torch.zeros((0, 6)), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}
    b = torch.cat([p.boxes for p in sets])
    s = torch.cat([p.scores for p in sets])
    lab = torch.cat([p.labels for p in sets])
    w = torch.cat([p.weights for p in sets])
    order = torch.argsort(s, descending=True, stable=True)[: int(plan.ensemble_topk)]
    if order.numel() == 0:
        return {"boxes": torch.zeros((0, 6)), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}
    b, s, lab = weighted_box_clustering(b[order], s[order], lab[order], weights=w[order],
                                        n_exp_preds=float(len(sets)), iou_threshold=plan.ensemble_iou,
                                        score_threshold=plan.ensemble_score_thresh)
    return {"boxes": b.reshape(-1, 6).float(), "scores": s.reshape(-1).float(), "labels": lab.reshape(-1).long()}


def ensemble_case(sets: Sequence[PredictionSet], shape: Sequence[int],
                  plan: InferencePlan = InferencePlan()) -> Dict[str, torch.Tensor]:
    """Both stages: :func:`process_set` per (model, TTA) set, then :func:`ensemble_sets`."""
    return ensemble_sets([process_set(p, shape, plan) for p in sets], plan)


def sets_to_arrays(sets: Sequence[PredictionSet]) -> List[dict]:
    """Plain numpy form of a case's sets (for caching sweep predictions)."""
    return [p.to_arrays() for p in sets]
