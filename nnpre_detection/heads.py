"""Shared detection heads (nnDetection v001 ``BCECLassifier`` / ``GIoURegressor``, ``nndet/arch/heads/classifier.py``
/ ``regressor.py``).

Both heads run the same small conv tower on every detection level (weights shared across levels):
``num_convs`` x [conv3x3 -> GroupNorm (16 channels per group, affine) -> ReLU] followed by an output conv3x3
with bias. nnDetection: 2 hidden convs of 128 channels, weights N(0, 0.01), biases 0, classifier output bias
``-log((1 - p) / p)`` with prior p = 0.01, and the regressor output multiplied by a learnable scalar per level
(init 1). Outputs of all levels are flattened position-major with anchors innermost -- the anchor order of
:class:`~nnpre_detection.anchors.AnchorGenerator` -- and concatenated level by level.
"""
from __future__ import annotations

import math
from typing import List, Sequence

import torch
from torch import nn


def _tower(in_channels: int, head_channels: int, num_convs: int, group_channels: int) -> nn.Sequential:
    if head_channels % group_channels != 0 and head_channels > group_channels:
        raise ValueError(f"head_channels ({head_channels}) must be a multiple of group_channels ({group_channels})")
    groups = max(1, head_channels // group_channels)
    layers: List[nn.Module] = []
    c = in_channels
    for _ in range(num_convs):
        layers += [nn.Conv3d(c, head_channels, 3, padding=1), nn.GroupNorm(groups, head_channels),
                   nn.ReLU(inplace=True)]
        c = head_channels
    return nn.Sequential(*layers)


class _SharedHead(nn.Module):
    def __init__(self, in_channels: int, out_per_anchor: int, num_anchors: int, head_channels: int,
                 num_convs: int, group_channels: int):
        super().__init__()
        self.out_per_anchor = out_per_anchor
        self.num_anchors = num_anchors
        self.tower = _tower(in_channels, head_channels, num_convs, group_channels)
        c = head_channels if num_convs > 0 else in_channels
        self.out = nn.Conv3d(c, num_anchors * out_per_anchor, 3, padding=1)
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)

    def _flatten(self, x: torch.Tensor) -> torch.Tensor:
        # (B, A*K, X, Y, Z) -> (B, X*Y*Z*A, K)
        b = x.shape[0]
        return x.permute(0, 2, 3, 4, 1).reshape(b, -1, self.out_per_anchor)


class ClassificationHead(_SharedHead):
    """Sigmoid classifier (no background channel).

    Args:
        in_channels: channels of the detection levels. num_anchors: anchors per position.
        num_classes: foreground classes C. head_channels / num_convs / group_channels: tower shape
            (nnDetection: 128 / 2 / 16). prior_prob: initial foreground probability (0.01).
    """

    def __init__(self, in_channels: int, num_anchors: int, num_classes: int, head_channels: int = 128,
                 num_convs: int = 2, group_channels: int = 16, prior_prob: float = 0.01):
        super().__init__(in_channels, num_classes, num_anchors, head_channels, num_convs, group_channels)
        nn.init.constant_(self.out.bias, -math.log((1 - prior_prob) / prior_prob))

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """List of (B, C_in, X_l, Y_l, Z_l) -> (B, sum_l X_l Y_l Z_l A, C) logits."""
        return torch.cat([self._flatten(self.out(self.tower(f))) for f in features], dim=1)


class RegressionHead(_SharedHead):
    """Box-delta regressor with a learnable output scale per level.

    Args:
        in_channels: channels of the detection levels. num_anchors: anchors per position.
        num_levels: number of detection levels (one scale each). learn_scale: train the scales (nnDetection:
            True). Other arguments as :class:`ClassificationHead`.
    """

    def __init__(self, in_channels: int, num_anchors: int, num_levels: int, head_channels: int = 128,
                 num_convs: int = 2, group_channels: int = 16, learn_scale: bool = True):
        super().__init__(in_channels, 6, num_anchors, head_channels, num_convs, group_channels)
        self.scales = nn.Parameter(torch.ones(num_levels), requires_grad=learn_scale)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """List of (B, C_in, X_l, Y_l, Z_l) -> (B, sum_l X_l Y_l Z_l A, 6) deltas ``(dx, dy, dw, dh, dz, dd)``."""
        if len(features) != self.scales.numel():
            raise ValueError(f"regressor was built for {self.scales.numel()} levels, got {len(features)}")
        return torch.cat([self._flatten(self.out(self.tower(f)) * self.scales[i]) for i, f in enumerate(features)],
                         dim=1)


class SegmentationHead(nn.Module):
    """Auxiliary foreground/background segmentation: 1x1x1 conv on decoder level 0 -> 2 logits (bg, fg)."""

    def __init__(self, in_channels: int, num_outputs: int = 2):
        super().__init__()
        self.conv = nn.Conv3d(in_channels, num_outputs, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, X, Y, Z) -> (B, 2, X, Y, Z) logits."""
        return self.conv(x)
