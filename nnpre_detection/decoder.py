"""UFPN decoder: a feature pyramid over all encoder stages (nnDetection ``UFPNModular``,
``nndet/arch/decoder/base.py``).

For every encoder stage a lateral 1x1x1 conv maps its features to the level's channels; a top-down path adds
the transposed-conv upsampled (kernel = stride = the stage's pooling stride) merged features of the level
below; one output conv per requested level (kernel = that stage's conv kernel) produces the decoder feature
map. No norms, no activations (nnDetection v001). The detector asks for level 0 (full resolution, read by the
segmentation head) and its detection levels; the top-down path always runs over all stages.

Channels (:func:`ufpn_channels`): ``fpn_channels`` (nnDetection: 4 x the first stage's width = 128) on every
level >= the first detection level, halving per level above it with a floor of 8 (e.g. detection levels
2..5: P0 = 32, P1 = 64, P2..P5 = 128).
"""
from __future__ import annotations

from typing import List, Sequence

import torch
from torch import nn


def ufpn_channels(n_stages: int, first_detection_level: int, fpn_channels: int, min_channels: int = 8) -> List[int]:
    """Decoder channels per level (see module docstring)."""
    return [fpn_channels if lvl >= first_detection_level
            else max(min_channels, fpn_channels // 2 ** (first_detection_level - lvl)) for lvl in range(n_stages)]


def _as_tuple3(v) -> tuple:
    return tuple(int(x) for x in v) if isinstance(v, (list, tuple)) else (int(v),) * 3


class UFPNDecoder(nn.Module):
    """Feature pyramid decoder.

    Args:
        encoder_channels: channels of every encoder stage output.
        strides: pooling stride per stage (nnU-Net ``strides``; entry s downsamples stage s's input).
        kernel_sizes: conv kernel per stage (nnU-Net ``kernel_sizes``), used for the output convs.
        channels: decoder channels per level (:func:`ufpn_channels`).
        output_levels: levels whose output conv is built and returned, ascending.
    """

    def __init__(self, encoder_channels: Sequence[int], strides: Sequence, kernel_sizes: Sequence,
                 channels: Sequence[int], output_levels: Sequence[int]):
        super().__init__()
        n = len(encoder_channels)
        if not (len(strides) == len(kernel_sizes) == len(channels) == n):
            raise ValueError("encoder_channels, strides, kernel_sizes and channels need one entry per stage")
        if sorted(set(output_levels)) != list(output_levels) or not all(0 <= lvl < n for lvl in output_levels):
            raise ValueError(f"output_levels must be ascending stage indices in [0, {n}), got {output_levels}")
        self.output_levels = tuple(int(v) for v in output_levels)
        self.channels = tuple(int(c) for c in channels)
        self.lateral = nn.ModuleList([nn.Conv3d(encoder_channels[i], channels[i], 1) for i in range(n)])
        self.up = nn.ModuleList([
            nn.ConvTranspose3d(channels[i + 1], channels[i], _as_tuple3(strides[i + 1]), _as_tuple3(strides[i + 1]))
            for i in range(n - 1)
        ])
        self.out = nn.ModuleList()
        for lvl in self.output_levels:
            k = _as_tuple3(kernel_sizes[lvl])
            self.out.append(nn.Conv3d(channels[lvl], channels[lvl], k, padding=tuple(x // 2 for x in k)))

    def forward(self, skips: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """Encoder stage outputs (B, C_s, X_s, Y_s, Z_s), s = 0..n-1 -> list of (B, channels[l], X_l, Y_l, Z_l)
        for ``l`` in ``output_levels``."""
        if len(skips) != len(self.lateral):
            raise ValueError(f"decoder expects {len(self.lateral)} encoder outputs, got {len(skips)}")
        merged = [None] * len(skips)
        x = self.lateral[-1](skips[-1])
        merged[-1] = x
        for i in range(len(skips) - 2, -1, -1):
            x = self.lateral[i](skips[i]) + self.up[i](x)
            merged[i] = x
        # On CPU the output convs run channels-last (same values): oneDNN's backward of a 3x3x3 conv with few channels
        # at full resolution (level 0: 8-16 channels at the patch size) ran 2-3x faster so, and the heads read that
        # layout. Other devices keep PyTorch's default layout (not measured there).
        cl = skips[0].device.type == "cpu"
        return [conv(merged[lvl].contiguous(memory_format=torch.channels_last_3d) if cl else merged[lvl])
                for conv, lvl in zip(self.out, self.output_levels)]
