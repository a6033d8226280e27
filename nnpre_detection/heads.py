"""Shared detection heads (nnDetection v001 ``BCECLassifier`` / ``GIoURegressor``, ``nndet/arch/heads/classifier.py``
/ ``regressor.py``).

Both heads run the same small conv tower on every detection level (weights shared across levels):
``num_convs`` x [conv3x3 -> GroupNorm (16 channels per group, affine) -> ReLU] followed by an output conv3x3
with bias. nnDetection: 2 hidden convs of 128 channels, weights N(0, 0.01), biases 0, classifier output bias
``-log((1 - p) / p)`` with prior p = 0.01, and the regressor output multiplied by a learnable scalar per level
(init 1). Outputs of all levels are flattened position-major with anchors innermost -- the anchor order of
:class:`~nnpre_detection.anchors.AnchorGenerator` -- and concatenated level by level.

Training needs the regressor's output only at the sampled positives (a few dozen anchors per batch), so
:meth:`RegressionHead.deltas_at` evaluates the output conv there from the tower outputs (:meth:`towers`) instead
of densely on every level (6 x anchors-per-position output channels; 27 anchors -> 162 channels). Same weights and
values as the dense :meth:`RegressionHead.forward`, which evaluation and inference use.
"""
from __future__ import annotations

import math
from typing import List, Sequence

import torch
import torch.nn.functional as F
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

    def _level_output(self, f: torch.Tensor) -> torch.Tensor:
        return self.out(self._tower(f))

    def _tower(self, f: torch.Tensor) -> torch.Tensor:
        # On CPU the head runs in channels-last memory (same values): the output conv then writes (B, X, Y, Z, A*K)
        # memory, so the position-major flatten below is a view (channels-first, the flatten's gradient -- a
        # strided copy of the head's largest tensor -- cost more than the output conv itself), and oneDNN's 3D
        # convs ran 1.2-2.5x faster channels-last here (measured for benchmarks/bench_detection_step.py). Other
        # devices keep PyTorch's default layout (not measured there).
        if f.device.type == "cpu":
            f = f.contiguous(memory_format=torch.channels_last_3d)
        return self.tower(f)

    def _flatten(self, x: torch.Tensor) -> torch.Tensor:
        # (B, A*K, X, Y, Z) -> (B, X*Y*Z*A, K)
        b = x.shape[0]
        return x.permute(0, 2, 3, 4, 1).reshape(b, -1, self.out_per_anchor)

    def towers(self, features: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """List of (B, C_in, X_l, Y_l, Z_l) -> list of (B, head_channels, X_l, Y_l, Z_l) tower outputs (the
        output conv's inputs), for :meth:`outputs_at`."""
        return [self._tower(f) for f in features]

    def outputs_at(self, towers: Sequence[torch.Tensor], batch_index: torch.Tensor,
                   anchor_index: torch.Tensor) -> torch.Tensor:
        """The output conv evaluated only at selected anchors: rows ``forward(features)[batch_index, anchor_index]``
        (same weights and math, before any per-level scale), computed from the (kx, ky, kz) neighbourhood of each
        anchor's position instead of a dense conv over every position.

        Args:
            towers: :meth:`towers` of the detection levels. batch_index / anchor_index: (P,) long image index and
                anchor index in the level-by-level, position-major order of :meth:`forward`.

        Returns:
            (P, K) outputs and (P,) long level index of every selected anchor.
        """
        a, k_out = self.num_anchors, self.out_per_anchor
        weight = self.out.weight  # (A*K, C, kx, ky, kz)
        kx, ky, kz = weight.shape[2:]
        px, py, pz = self.out.padding
        c = weight.shape[1]
        weight = weight.reshape(a, k_out, c, kx, ky, kz)
        bias = self.out.bias.reshape(a, k_out)
        pieces, order, levels = [], [], []
        start = 0
        for lvl, t in enumerate(towers):
            sx, sy, sz = t.shape[2:]
            n = sx * sy * sz * a
            sel = torch.nonzero((anchor_index >= start) & (anchor_index < start + n)).flatten()
            start += n
            if sel.numel() == 0:
                continue
            local = anchor_index[sel] - (start - n)
            k, pos = local % a, torch.div(local, a, rounding_mode="floor")
            z, y, x = pos % sz, torch.div(pos, sz, rounding_mode="floor") % sy, torch.div(pos, sy * sz,
                                                                                         rounding_mode="floor")
            padded = F.pad(t, (pz, pz, py, py, px, px))
            ox, oy, oz = (torch.arange(v, device=t.device) for v in (kx, ky, kz))
            # (P, kx, ky, kz, C): advanced indices around a slice put the broadcast index dims first
            patch = padded[batch_index[sel].view(-1, 1, 1, 1), :, x.view(-1, 1, 1, 1) + ox.view(1, -1, 1, 1),
                           y.view(-1, 1, 1, 1) + oy.view(1, 1, -1, 1), z.view(-1, 1, 1, 1) + oz.view(1, 1, 1, -1)]
            # float32 (a few dozen anchors): autocast would otherwise mix half-precision towers with fp32 weights
            pieces.append(torch.einsum("pxyzc,pocxyz->po", patch.float(), weight[k].float()) + bias[k].float())
            order.append(sel)
            levels.append(torch.full_like(sel, lvl))
        if not pieces:
            if anchor_index.numel():
                raise ValueError(f"anchor_index has entries outside the {start} anchors of the detection levels")
            return weight.new_zeros((0, k_out)) + weight.sum() * 0.0, anchor_index.new_zeros(0)
        order = torch.cat(order)
        if order.numel() != anchor_index.numel():
            raise ValueError(f"anchor_index has entries outside the {start} anchors of the detection levels")
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        return torch.cat(pieces)[inverse], torch.cat(levels)[inverse]


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
        return torch.cat([self._flatten(self._level_output(f)) for f in features], dim=1)

    def from_towers(self, towers: Sequence[torch.Tensor]) -> torch.Tensor:
        """:meth:`forward` from the :meth:`towers` outputs of the same features (output conv + flatten)."""
        return torch.cat([self._flatten(self.out(t)) for t in towers], dim=1)


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
        return torch.cat([self._flatten(self._level_output(f) * self.scales[i]) for i, f in enumerate(features)],
                         dim=1)

    def deltas_at(self, towers: Sequence[torch.Tensor], batch_index: torch.Tensor,
                  anchor_index: torch.Tensor) -> torch.Tensor:
        """(P, 6) deltas of selected anchors only, equal to ``forward(features)[batch_index, anchor_index]``
        (see :meth:`outputs_at`; ``towers`` = :meth:`towers` of the same features). Training needs the deltas
        of the sampled positives only: a few dozen anchors instead of a dense 6 x A-channel conv per level."""
        if len(towers) != self.scales.numel():
            raise ValueError(f"regressor was built for {self.scales.numel()} levels, got {len(towers)}")
        out, levels = self.outputs_at(towers, batch_index, anchor_index)
        return out * self.scales[levels][:, None]


class SegmentationHead(nn.Module):
    """Auxiliary foreground/background segmentation: 1x1x1 conv on decoder level 0 -> 2 logits (bg, fg)."""

    def __init__(self, in_channels: int, num_outputs: int = 2):
        super().__init__()
        self.conv = nn.Conv3d(in_channels, num_outputs, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, X, Y, Z) -> (B, 2, X, Y, Z) logits."""
        return self.conv(x)
