"""Retina U-Net losses (nnDetection v001, ``nndet/losses/classification.py`` / ``regression.py``).

* classification: sigmoid binary cross-entropy on one-hot foreground targets (background = all zeros), mean
  over sampled anchors x classes (:func:`sigmoid_focal_loss` over all anchors is the small-budget option);
* regression: GIoU between the decoded boxes of the sampled positives and their matched boxes,
  ``sum(1 - GIoU) / max(1, #positives)`` (nnDetection reports ``-sum(GIoU)``; same gradient, shifted value);
* segmentation: ``0.5 * CE + 0.5 * (1 - soft Dice)`` on the fg/bg logits, soft Dice with softmax, batch Dice,
  background excluded, smoothing 1e-5 in numerator and denominator.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F

from nnpre_detection.boxes import box_pair_giou

#: Dice smoothing (nnDetection ``SoftDiceLoss``: smooth_nom = smooth_denom = 1e-5).
DICE_SMOOTH = 1e-5


def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sigmoid BCE.

    Args:
        logits: (K, C) logits of the sampled anchors. labels: (K,) long, 0 = background, c + 1 = class c.

    Returns:
        scalar mean BCE over K x C (0 if nothing was sampled, still attached to ``logits``).
    """
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    target = torch.zeros_like(logits, dtype=torch.float32)
    fg = labels > 0
    target[fg, labels[fg] - 1] = 1.0
    return F.binary_cross_entropy_with_logits(logits.float(), target, reduction="mean")


def sigmoid_focal_loss(logits: torch.Tensor, labels: torch.Tensor, num_positives: int, alpha: float = 0.25,
                       gamma: float = 2.0) -> torch.Tensor:
    """RetinaNet's dense focal loss (Lin et al. 2017) over all anchors, normalised by the number of positives.

    ``FL = -alpha_t (1 - p_t)^gamma log(p_t)``, summed over anchors x classes and divided by
    ``max(1, num_positives)``; anchors with label < 0 are ignored.

    Args:
        logits: (A, C) logits. labels: (A,) long, 0 = background, c + 1 = class c, < 0 = ignored.
        num_positives: normaliser. alpha / gamma: RetinaNet's 0.25 / 2.
    """
    valid = labels >= 0
    logits, labels = logits[valid].float(), labels[valid]
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    target = torch.zeros_like(logits)
    fg = labels > 0
    target[fg, labels[fg] - 1] = 1.0
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = p * target + (1 - p) * (1 - target)
    a_t = alpha * target + (1 - alpha) * (1 - target)
    return (a_t * (1 - p_t) ** gamma * ce).sum() / max(1, int(num_positives))


def giou_loss(pred_boxes: torch.Tensor, target_boxes: torch.Tensor) -> torch.Tensor:
    """GIoU regression loss ``sum(1 - GIoU) / max(1, P)`` for (P, 6) predicted / target boxes (0 if P = 0)."""
    if pred_boxes.shape[0] == 0:
        return pred_boxes.sum() * 0.0
    giou = box_pair_giou(pred_boxes, target_boxes)
    return (1.0 - giou).sum() / max(1, pred_boxes.shape[0])


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = DICE_SMOOTH) -> torch.Tensor:
    """``1 - mean foreground soft Dice`` (softmax, batch Dice, background excluded).

    Args:
        logits: (B, K, X, Y, Z) logits, K >= 2 (channel 0 = background). target: (B, X, Y, Z) long in [0, K).
    """
    probs = torch.softmax(logits.float(), dim=1)
    onehot = F.one_hot(target.long(), logits.shape[1]).movedim(-1, 1).float()
    axes = [0] + list(range(2, logits.ndim))  # batch Dice: sum over batch and space
    tp = (probs * onehot).sum(axes)
    fp = (probs * (1 - onehot)).sum(axes)
    fn = ((1 - probs) * onehot).sum(axes)
    dice = (2 * tp + smooth) / (2 * tp + fp + fn + smooth)
    return 1.0 - dice[1:].mean()


def segmentation_losses(logits: torch.Tensor, target: torch.Tensor,
                        ce_weight: float = 0.5, dice_weight: float = 0.5) -> Tuple[torch.Tensor, torch.Tensor]:
    """Weighted CE and Dice terms of the auxiliary fg/bg segmentation.

    Args:
        logits: (B, 2, X, Y, Z). target: (B, X, Y, Z) with 0 = background, 1 = foreground.
        ce_weight / dice_weight: nnDetection: 0.5 / 0.5.

    Returns:
        ``(ce_weight * CE, dice_weight * (1 - Dice))``.
    """
    if logits.shape[2:] != target.shape[1:] or logits.shape[0] != target.shape[0]:
        raise ValueError(f"segmentation logits {tuple(logits.shape)} and target {tuple(target.shape)} do not match")
    ce = F.cross_entropy(logits.float(), target.long())
    return ce_weight * ce, dice_weight * soft_dice_loss(logits, target)
