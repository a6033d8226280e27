"""Box coder: boxes <-> regression deltas relative to anchors (nnDetection ``BoxCoderND``).

Delta order follows the box layout ``(x1, y1, x2, y2, z1, z2)``: ``(dx, dy, dw, dh, dz, dd)`` with
``dx = wx * (gx_c - ax_c) / a_w`` and ``dw = ww * log(g_w / a_w)`` (same for y/h and z/d); centres are
``lo + size / 2`` and sizes ``hi - lo`` (no ``+1``). Weights default to 1 and the log-size deltas are clamped
at ``log(1000 / 16)`` before ``exp`` when decoding (nnDetection / torchvision defaults, nnDetection
``nndet/core/boxes/coder.py``).
MONAI's coder orders deltas ``(dx, dy, dz, dw, dh, dd)`` instead; only the network's own outputs use deltas.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Tuple

import torch

from nnpre_detection.boxes import _check, corners, from_corners

#: Clamp for log-size deltas before exp (torchvision / nnDetection default).
DEFAULT_CLIP = math.log(1000.0 / 16)


@dataclass(frozen=True)
class BoxCoder:
    """Encode/decode boxes as deltas to anchors.

    Attributes:
        weights: 6 multipliers for ``(dx, dy, dw, dh, dz, dd)`` (nnDetection v001: all 1).
        clip: maximal log-size delta used when decoding.
    """

    weights: Tuple[float, ...] = (1.0, 1.0, 1.0, 1.0, 1.0, 1.0)
    clip: float = DEFAULT_CLIP

    def _split_weights(self, dim: int, ref: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if len(self.weights) != 2 * dim:
            raise ValueError(f"BoxCoder has {len(self.weights)} weights but boxes are {dim}D (need {2 * dim})")
        w = torch.as_tensor(self.weights, dtype=ref.dtype, device=ref.device)
        # delta layout (dx, dy, dw, dh, dz, dd) -> centre weights (x, y, z) and size weights (w, h, d)
        ctr_idx, size_idx = ([0, 1, 4], [2, 3, 5]) if dim == 3 else ([0, 1], [2, 3])
        return w[ctr_idx], w[size_idx]

    @staticmethod
    def _to_deltas(d_ctr: torch.Tensor, d_size: torch.Tensor) -> torch.Tensor:
        # same column layout as the boxes: (c0, c1, s0, s1, c2, s2)
        return from_corners(d_ctr, d_size)

    @staticmethod
    def _from_deltas(deltas: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return corners(deltas)

    def encode(self, boxes: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
        """Deltas that map ``anchors`` onto ``boxes``.

        Args:
            boxes: (N, 6) target boxes. anchors: (N, 6) anchors (positive sizes).

        Returns:
            (N, 6) float32 deltas ``(dx, dy, dw, dh, dz, dd)``.
        """
        dim = _check(boxes)
        if boxes.shape != anchors.shape:
            raise ValueError(f"boxes {tuple(boxes.shape)} and anchors {tuple(anchors.shape)} must match")
        blo, bhi = corners(boxes.float())
        alo, ahi = corners(anchors.float())
        w_ctr, w_size = self._split_weights(dim, blo)
        a_size, b_size = ahi - alo, bhi - blo
        a_ctr, b_ctr = alo + a_size / 2, blo + b_size / 2
        d_ctr = w_ctr * (b_ctr - a_ctr) / a_size
        d_size = w_size * torch.log(b_size / a_size)
        return self._to_deltas(d_ctr, d_size)

    def decode(self, deltas: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
        """Apply deltas to anchors.

        Args:
            deltas: (N, 6) ``(dx, dy, dw, dh, dz, dd)`` (any float dtype; computed in float32).
            anchors: (N, 6) anchors.

        Returns:
            (N, 6) float32 boxes in nnDetection layout (differentiable w.r.t. ``deltas``).
        """
        dim = _check(deltas, "deltas")
        if deltas.shape != anchors.shape:
            raise ValueError(f"deltas {tuple(deltas.shape)} and anchors {tuple(anchors.shape)} must match")
        d_ctr, d_size = self._from_deltas(deltas.float())
        alo, ahi = corners(anchors.float())
        w_ctr, w_size = self._split_weights(dim, alo)
        a_size = ahi - alo
        a_ctr = alo + a_size / 2
        ctr = d_ctr / w_ctr * a_size + a_ctr
        size = torch.exp((d_size / w_size).clamp(max=self.clip)) * a_size
        return from_corners(ctr - size / 2, ctr + size / 2)
