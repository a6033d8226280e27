"""Weighted box clustering (WBC; Jaeger et al. 2018, Retina U-Net), as nnDetection uses it to merge the
predictions of several tiles / test-time augmentations / models of one case (nnDetection
``nndet/inference/detection/wbc.py``).

Per class, greedily from the highest score: the cluster C of the current box b* is every remaining box with
``IoU(b*, b_i) > iou_threshold`` (b* included). With ``u_i = IoU(b*, b_i) * weight_i``:

* ``n_missing = max(0, mean(n_exp_preds over C) - |C|)`` -- predictions expected but not present;
* ``score = sum(u_i s_i) / (sum(u_i) + n_missing * mean(u_i))``;
* ``box = sum(u_i s_i b_i) / sum(u_i s_i)``;

the merged box is kept when ``score > score_threshold`` and C leaves the pool.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from nnpre_detection.boxes import _check, box_iou


def weighted_box_clustering(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    weights: Optional[torch.Tensor] = None,
    n_exp_preds: Optional[torch.Tensor | float] = None,
    iou_threshold: float = 0.5,
    score_threshold: float = 0.0,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge overlapping predictions by weighted box clustering.

    Args:
        boxes: (N, 6) boxes ``(x1, y1, x2, y2, z1, z2)``.
        scores: (N,) scores in [0, 1].
        labels: (N,) integer classes; clusters never mix classes. ``None``: one class (0).
        weights: (N,) per-box weights (nnDetection: tile-position weight in [0.5, 1]); default 1.
        n_exp_preds: number of predictions expected per object, per box (N,) or scalar (nnDetection: the number
            of (model, TTA) prediction sets); default 1, i.e. no penalty for missing predictions.
        iou_threshold: cluster membership threshold (nnDetection ensemble: 0.5).
        score_threshold: merged boxes with ``score <= score_threshold`` are dropped (nnDetection: 0.0).

    Returns:
        boxes (K, 6) float32, scores (K,) float32, labels (K,) long of the merged predictions, sorted by
        descending score.
    """
    _check(boxes)
    n = boxes.shape[0]
    device = boxes.device
    if scores.shape != (n,):
        raise ValueError(f"scores must have shape ({n},), got {tuple(scores.shape)}")
    labels = torch.zeros(n, dtype=torch.long, device=device) if labels is None else labels.long()
    weights = torch.ones(n, device=device) if weights is None else weights.float()
    if n_exp_preds is None:
        n_exp_preds = 1.0
    n_exp = torch.as_tensor(n_exp_preds, dtype=torch.float32, device=device).expand(n)
    if labels.shape != (n,) or weights.shape != (n,):
        raise ValueError("labels and weights must have one entry per box")
    boxes_f, scores_f = boxes.float(), scores.float()

    out_boxes, out_scores, out_labels = [], [], []
    for label in torch.unique(labels):
        idx = torch.nonzero(labels == label, as_tuple=False).flatten()
        pool = idx[torch.argsort(scores_f[idx], descending=True, stable=True)]
        while pool.numel() > 0:
            iou = box_iou(boxes_f[pool[:1]], boxes_f[pool])[0]
            iou[0] = 1.0  # the seed is always its own cluster member (also for degenerate boxes)
            member = iou > iou_threshold
            member[0] = True
            c = pool[member]
            u = iou[member] * weights[c]
            s = scores_f[c]
            n_missing = (n_exp[c].mean() - c.numel()).clamp(min=0)
            denom = u.sum() + n_missing * u.mean()
            score = (u * s).sum() / denom if denom > 0 else s[0]
            us = u * s
            box = (us[:, None] * boxes_f[c]).sum(0) / us.sum() if us.sum() > 0 else boxes_f[c[0]]
            if score > score_threshold:
                out_boxes.append(box)
                out_scores.append(score)
                out_labels.append(label)
            pool = pool[~member]

    if not out_boxes:
        return (torch.zeros((0, boxes.shape[1]), device=device), torch.zeros(0, device=device),
                torch.zeros(0, dtype=torch.long, device=device))
    b, s, lab = torch.stack(out_boxes), torch.stack(out_scores), torch.stack(out_labels)
    order = torch.argsort(s, descending=True, stable=True)
    return b[order], s[order], lab[order]
