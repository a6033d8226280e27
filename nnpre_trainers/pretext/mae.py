"""Masked auto-encoding with blocky masks, as nnssl's ``BaseMAETrainer`` (ResEnc-L MAE, Wald et al. 2025).

Defaults (nnssl ``BaseMAETrainer`` / ``create_blocky_mask`` / ``MAEMSELoss``): 75 % of the 16³ blocks of
each patch are masked, the mask is drawn per sample, masked voxels are set to 0 (the mean after z-scoring;
no learnable token) and the loss is the MSE over masked voxels only, normalised by their count.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import torch
from torch import Tensor

from nnpre_trainers.pretext.base import PretextSample, PretextTask, _vol, check_image
from nnpre_trainers.pretext.registry import register_pretext

FILLS = ("zero", "noise")


@dataclass(frozen=True)
class MAEConfig:
    """MAE hyperparameters.

    Attributes:
        mask_ratio: fraction of blocks masked per sample, in [0, 1]. nnssl default 0.75.
        block_size: edge of the cubic mask blocks in voxels. nnssl default 16.
        fill: value of masked input voxels: ``"zero"`` (nnssl: 0, the z-score mean) or ``"noise"``
            (standard normal, the z-score distribution).
        augmentation: loader augmentation before masking (:mod:`nnpre_trainers.pretext_data`): ``"nnssl"``
            (rotation ±30°, scaling 0.7-1.4, mirroring: nnssl ``BaseMAETrainer.get_training_transforms``),
            ``"mirror"`` or ``"none"``.
    """

    mask_ratio: float = 0.75
    block_size: int = 16
    fill: str = "zero"
    augmentation: str = "nnssl"

    def __post_init__(self):
        if not 0.0 <= float(self.mask_ratio) <= 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1], got {self.mask_ratio}")
        if int(self.block_size) < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.augmentation not in ("nnssl", "mirror", "none"):
            raise ValueError(f"augmentation must be 'nnssl', 'mirror' or 'none', got {self.augmentation!r}")
        if self.fill not in FILLS:
            raise ValueError(f"fill must be one of {FILLS}, got {self.fill!r}")


def num_masked_blocks(num_blocks: int, mask_ratio: float) -> int:
    """Blocks masked per sample: ``floor(mask_ratio * num_blocks)`` (nnssl's ``int(...)``, robust to 0.29*100)."""
    return int(math.floor(mask_ratio * num_blocks + 1e-9))


def block_mask(batch_size: int, spatial_shape: Sequence[int], block_size: int, mask_ratio: float,
               generator: torch.Generator) -> Tensor:
    """Per-sample blocky visibility mask.

    The patch is tiled from its origin by a grid of ``ceil(dim / block_size)`` blocks per axis; exactly
    ``num_masked_blocks(N, mask_ratio)`` of the N blocks are masked in each sample, chosen by a seeded random
    permutation (argsort of uniform keys). The block grid is upsampled to voxels and cropped to the patch, so
    when a dimension is not a multiple of ``block_size`` the last block along it is partial (the realised
    *voxel* ratio can then differ slightly from ``mask_ratio``; the *block* ratio is exact).

    Args:
        batch_size: B.
        spatial_shape: (X, Y, Z) of the patch.
        block_size: block edge in voxels.
        mask_ratio: fraction of blocks to mask.
        generator: random source (on CPU; the mask is returned on CPU).

    Returns:
        (B, 1, X, Y, Z) float32 mask, 1 = visible, 0 = masked (nnssl's convention).
    """
    spatial_shape = [int(s) for s in spatial_shape]
    grid = [math.ceil(s / block_size) for s in spatial_shape]
    n = grid[0] * grid[1] * grid[2]
    k = num_masked_blocks(n, mask_ratio)
    keys = torch.rand(batch_size, n, generator=generator, device=generator.device)
    masked = keys.argsort(dim=1)[:, :k]
    coarse = torch.ones(batch_size, n, device=generator.device)
    coarse.scatter_(1, masked, 0.0)
    mask = coarse.view(batch_size, 1, *grid)
    for axis in (2, 3, 4):
        mask = mask.repeat_interleave(block_size, dim=axis)
    return mask[:, :, : spatial_shape[0], : spatial_shape[1], : spatial_shape[2]].contiguous().cpu()


@register_pretext("mae")
class MAETask(PretextTask):
    """Masked auto-encoder pretext (see module docstring).

    Input range: any real values (z-scored patches). Output: one channel per input channel; target = the
    clean patch; ``loss_mask`` = masked voxels (1 - visibility mask).
    """

    config_class = MAEConfig

    def corrupt(self, image: Tensor, generator: torch.Generator,
                context: Optional[dict] = None) -> PretextSample:
        check_image(image, self.name)
        cfg = self.config
        visible = block_mask(image.shape[0], image.shape[2:], int(cfg.block_size), float(cfg.mask_ratio),
                             generator).to(image.device, image.dtype)
        if cfg.fill == "zero":
            corrupted = image * visible
        else:
            noise = torch.randn(image.shape, generator=generator, device=generator.device, dtype=image.dtype)
            corrupted = image * visible + noise.to(image.device) * (1.0 - visible)
        return PretextSample(input=corrupted, target=image, loss_mask=1.0 - visible, extras={})

    def preview(self, sample: PretextSample, prediction: Tensor) -> Dict[str, Tensor]:
        """input (clean), corrupted (masked), prediction, and prediction pasted into the visible voxels."""
        vis = 1.0 - sample.loss_mask
        return {"input": _vol(sample.target), "corrupted": _vol(sample.input), "prediction": _vol(prediction),
                "target": _vol(sample.target),
                "composite": _vol(sample.target * vis + prediction.detach().to(vis.dtype) * (1.0 - vis))}
