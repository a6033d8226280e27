"""Validation by box mAP on validation patches, as nnDetection selects its best checkpoint.

nnDetection (``RetinaUNetModule.validation_step`` / ``evaluation_end``) runs the detector on every validation
batch, keeps the per-patch post-processed detections (top 10000 -> NMS 0.6 -> top 100, the same as
``RetinaUNet.predict_patch``), and evaluates them with the fast box evaluator, each *patch* counting as one
image; ``mAP_IoU_0.10_0.50_0.05_MaxDet_100`` of the epoch picks the best checkpoint (``v001.yaml``
``monitor_key``). :class:`PatchEvaluator` accumulates the patches of an epoch; :func:`validation_map` runs a
model over given batches.
"""
from __future__ import annotations

from typing import Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from nnpre_detection.metrics.coco import IOU_LIST_FAST

#: Keys a detection trainer logs per validation epoch.
VALIDATION_KEYS = ("AP_IoU_0.10_MaxDet_100", "mAP_IoU_0.10_0.50_0.05_MaxDet_100", "FROC_score_IoU_0.10")


class PatchEvaluator:
    """Collect per-patch predictions and targets of a validation epoch; :meth:`finish` scores them.

    Args:
        num_classes: foreground detection classes.
    """

    def __init__(self, num_classes: int):
        self.num_classes = int(num_classes)
        self.reset()

    def reset(self) -> None:
        self._pred, self._gt = {}, {}

    def __len__(self) -> int:
        return len(self._gt)

    def add(self, predictions: Sequence[dict], targets: Sequence[dict]) -> None:
        """Add one batch.

        Args:
            predictions: per patch ``{"boxes": (K, 6), "scores": (K,), "labels": (K,)}`` (``predict_patch``).
            targets: per patch ``{"boxes": (G, 6), "labels": (G,)}`` (the training targets).
        """
        if len(predictions) != len(targets):
            raise ValueError(f"{len(predictions)} predictions for {len(targets)} targets")
        for p, t in zip(predictions, targets):
            key = f"patch{len(self._gt):06d}"
            self._pred[key] = {k: torch.as_tensor(p[k]).detach().cpu().numpy() for k in ("boxes", "scores", "labels")}
            self._gt[key] = {"boxes": torch.as_tensor(t["boxes"]).detach().cpu().numpy().reshape(-1, 6),
                             "classes": torch.as_tensor(t["labels"]).detach().cpu().numpy().reshape(-1)}

    def finish(self, reset: bool = True) -> dict:
        """Fast-evaluator metrics (IoU list 0.1, 0.5) over the collected patches (``{}`` if none)."""
        from nnpre_detection.metrics.evaluate import evaluate_boxes

        if not self._gt:
            return {}
        out = evaluate_boxes(self._pred, self._gt, classes=self.num_classes, iou_list=IOU_LIST_FAST,
                             missing_predictions="empty")["metrics"]
        if reset:
            self.reset()
        return {k: float(v) for k, v in out.items() if np.ndim(v) == 0}


@torch.no_grad()
def validation_map(model, batches: Iterable[Tuple[torch.Tensor, List[dict]]], num_classes: Optional[int] = None,
                   device: Optional[torch.device] = None) -> dict:
    """Box metrics of ``model`` on validation patches (nnDetection's per-epoch validation).

    Args:
        model: :class:`~nnpre_detection.retina_unet.RetinaUNet` (its training/eval mode is restored).
        batches: ``(images (B, C, X, Y, Z), targets)`` pairs; targets as for training (``boxes``, ``labels``).
        num_classes: default ``model.num_classes``. device: default the model's.

    Returns:
        metrics dict with :data:`VALIDATION_KEYS` among others (``{}`` without batches).
    """
    ev = PatchEvaluator(num_classes if num_classes is not None else model.num_classes)
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for images, targets in batches:
            ev.add(model.predict_patch(images.to(device)), targets)
    finally:
        model.train(was_training)
    return ev.finish()
