"""S3D: sparse 3-D masked image modelling (SparK-style) on a plain/ResEnc nnU-Net encoder.

References: Wald et al., "Revisiting MAE pre-training for 3D medical image segmentation" (CVPR 2025,
arXiv 2410.23132; nnssl ``training/nnsslTrainer/masked_image_modeling/SparkTrainer.py``,
``architectures/spark_model.py`` ``SparK3D``, ``architectures/spark_utils.py``, ``training/loss/spark_loss.py``)
and Tian et al., SparK (ICLR 2023, ``keyu-tian/SparK`` ``pretrain/spark.py``).

What happens (defaults = nnssl ``SparkMAETrainer``):

* **mask**: as MAE (:func:`nnpre_trainers.pretext.mae.block_mask`): 75 % of the 16³ blocks of each patch
  masked, per sample; loss = MSE over masked voxels only (``SparkLoss``).
* **sparse encoder**: every ``Conv3d``, ``AvgPool3d``/``MaxPool3d`` and ``InstanceNorm3d`` of
  ``network.encoder`` is switched (class swap, same parameters, same state-dict keys) to a masked variant:
  convolution/pooling outputs are multiplied by the visibility mask at their resolution, and instance norm
  computes its per-sample statistics over visible positions only and writes 0 at masked positions. Masked
  positions therefore stay empty through every encoder layer.
* **densify** (the module returned by :meth:`S3DTask.build_conditioning`, stored as
  ``nnpre_conditioning.*`` outside ``encoder.*``/``decoder.*``): per encoder level a sparse instance norm
  (no affine, nnssl ``SparseInstanceNorm3d(C)``), a learnable mask token (1, C, 1, 1, 1) (trunc-normal,
  std 0.02, clipped to ±0.02) filled in at masked positions, and a 3×3×3 projection conv at every level
  except the first (full-resolution) one, which is the identity (nnssl's list is not reversed, so its
  ``i == 0`` identity is the stride-1 level). The dense features go to the network's own decoder.

The mask reaches the sparse layers through a per-network :class:`SparseMaskContext` that only
:meth:`S3DTask.forward` sets (and clears afterwards); nnssl uses a module-level global instead. Outside that
call the swapped layers compute exactly as the plain ones, so the pretrained network *is* the dense network:
its ``encoder.*`` keys load strictly into a freshly built plain/ResEnc U-Net (``nnpre.weight_transfer``).

Level masks: the voxel mask is max-pooled by the level's stride (a feature voxel is visible if any voxel it
covers is; exact down-sampling when the stride divides the block size, the nnU-Net case). A level whose
stride exceeds the block size on every axis is dense (all visible), as nnssl's ``_get_active_ex_or_ii``.

Deviation from nnssl: the network input is the *masked* image (SparK), so visible voxels next to a masked
block do not see the hidden intensities through the stem kernel; nnssl feeds the unmasked image and only
masks the stem's output (``mask_input=False`` reproduces that).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nnpre.errors import fail
from nnpre_trainers.pretext.base import (
    CONDITIONING_ATTR,
    PretextSample,
    PretextTask,
    _vol,
    check_image,
    unwrap_network,
)
from nnpre_trainers.pretext.mae import block_mask
from nnpre_trainers.pretext.registry import register_pretext


@dataclass(frozen=True)
class S3DConfig:
    """S3D hyperparameters (nnssl ``SparkMAETrainer`` / ``SparK3D`` defaults).

    Attributes:
        mask_ratio: fraction of blocks masked per sample. nnssl 0.75.
        block_size: mask block edge in voxels. nnssl 16 (``BaseMAETrainer`` ``create_blocky_mask``).
        mask_token: fill masked decoder inputs with learnable tokens + densify norm/projection
            (nnssl ``use_mask_token=True``); False = pass the sparse features unchanged (``…noMaskToken``).
        mask_input: feed the masked image (SparK, default) instead of the unmasked one (nnssl).
        augmentation: loader augmentation before masking; ``"nnssl"`` (``SparkMAETrainer`` inherits
            ``BaseMAETrainer``'s rotation/scaling/mirroring), ``"mirror"`` or ``"none"``.
    """

    mask_ratio: float = 0.75
    block_size: int = 16
    mask_token: bool = True
    mask_input: bool = True
    augmentation: str = "nnssl"

    def __post_init__(self):
        if not 0.0 <= float(self.mask_ratio) < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {self.mask_ratio}")
        if int(self.block_size) < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.augmentation not in ("nnssl", "mirror", "none"):
            raise ValueError(f"augmentation must be 'nnssl', 'mirror' or 'none', got {self.augmentation!r}")


# ----------------------------------------------------------------------------------------------------------
# per-network mask context and the sparse layers
# ----------------------------------------------------------------------------------------------------------
class SparseMaskContext:
    """Holds the visibility mask of the current forward pass of one network (not a module-level global).

    Attributes:
        visible: (B, 1, X, Y, Z) float mask, 1 = visible, or None (= every sparse layer is dense).
        block_size: mask block edge in voxels; levels coarser than it on every axis are dense.
    """

    def __init__(self, block_size: int) -> None:
        self.visible: Optional[Tensor] = None
        self.block_size = int(block_size)
        self._cache: Dict[Tuple[int, ...], Tensor] = {}

    def set(self, visible: Optional[Tensor]) -> None:
        self.visible = visible
        self._cache = {}

    def at(self, x: Tensor) -> Optional[Tensor]:
        """(B, 1, x, y, z) mask at the resolution of feature map ``x`` (B, C, x, y, z), or None when dense."""
        v = self.visible
        if v is None:
            return None
        shape = tuple(int(s) for s in x.shape[2:])
        m = self._cache.get(shape)
        if m is None:
            full = [int(s) for s in v.shape[2:]]
            stride = [max(1, f // s) for f, s in zip(full, shape)]
            if all(st > self.block_size for st in stride):
                m = torch.ones(v.shape[0], 1, *shape, device=v.device, dtype=v.dtype)
            else:
                m = F.max_pool3d(v[:, :, : stride[0] * shape[0], : stride[1] * shape[1], : stride[2] * shape[2]],
                                 stride, stride) if any(st > 1 for st in stride) else v
                if tuple(m.shape[2:]) != shape:  # odd sizes: pad the last row (visible) to the feature shape
                    pads = []
                    for a in (2, 1, 0):
                        pads += [0, shape[a] - m.shape[2 + a]]
                    m = F.pad(m, pads, value=1.0)
            self._cache[shape] = m
        return m.to(x.dtype)


class _MaskedOutput:
    """Mixin for a layer class: its output times the context's mask at the output's resolution (unchanged
    while the context holds no mask)."""

    nnpre_sparse_ctx: SparseMaskContext

    def forward(self, x: Tensor) -> Tensor:
        y = super().forward(x)
        m = self.nnpre_sparse_ctx.at(y)
        return y if m is None else y * m


class SparseConv3d(_MaskedOutput, nn.Conv3d):
    """``nn.Conv3d`` whose output is zero at masked positions while its context holds a mask."""


class SparseAvgPool3d(_MaskedOutput, nn.AvgPool3d):
    """``nn.AvgPool3d`` with masked output (nnssl ``SparseAvgPooling``)."""


class SparseMaxPool3d(_MaskedOutput, nn.MaxPool3d):
    """``nn.MaxPool3d`` with masked output (nnssl ``SparseMaxPooling``)."""


def sparse_instance_norm(x: Tensor, m: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                         eps: float) -> Tensor:
    """Instance norm of (B, C, x, y, z) ``x`` with statistics over the positions where (B, 1, x, y, z) ``m`` = 1.

    Biased variance as ``nn.InstanceNorm`` (nnssl ``sp_bn_forward`` gathers the visible positions and runs
    ``InstanceNorm1d`` on them); masked positions are 0 in the output.
    """
    n = m.sum(dim=(2, 3, 4), keepdim=True).clamp_min(1.0)
    mean = (x * m).sum(dim=(2, 3, 4), keepdim=True) / n
    var = (((x - mean) * m) ** 2).sum(dim=(2, 3, 4), keepdim=True) / n
    y = (x - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight.view(1, -1, 1, 1, 1) + bias.view(1, -1, 1, 1, 1)
    return y * m


class SparseInstanceNorm3d(nn.InstanceNorm3d):
    """``nn.InstanceNorm3d`` with statistics over visible positions only (see :func:`sparse_instance_norm`)."""

    nnpre_sparse_ctx: SparseMaskContext

    def forward(self, x: Tensor) -> Tensor:
        m = self.nnpre_sparse_ctx.at(x)
        if m is None:
            return super().forward(x)
        return sparse_instance_norm(x, m, self.weight if self.affine else None, self.bias if self.affine else None,
                                    self.eps)


_SPARSE_OF = {nn.Conv3d: SparseConv3d, nn.AvgPool3d: SparseAvgPool3d, nn.MaxPool3d: SparseMaxPool3d,
              nn.InstanceNorm3d: SparseInstanceNorm3d}


def sparsify_encoder(encoder: nn.Module, ctx: SparseMaskContext) -> int:
    """Switch the encoder's conv/pool/instance-norm layers to their sparse variants in place.

    Parameters, buffers and state-dict keys are unchanged (class swap); nnssl ``convert_to_spark_cnn`` builds
    new modules instead. Other norm types are refused (nnssl: "Only InstanceNorm supported").

    Returns:
        the number of switched modules.
    """
    n = 0
    for name, mod in encoder.named_modules():
        if isinstance(mod, tuple(_SPARSE_OF.values())):
            mod.nnpre_sparse_ctx = ctx
            continue
        if isinstance(mod, nn.modules.batchnorm._NormBase) and not isinstance(mod, nn.InstanceNorm3d):
            fail(f"S3D needs instance norm in the encoder, found {type(mod).__name__} at 'encoder.{name}'; "
                 f"use an nnU-Net plan with InstanceNorm3d (the default)")
        sparse = _SPARSE_OF.get(type(mod))
        if sparse is not None:
            mod.__class__ = sparse
            mod.nnpre_sparse_ctx = ctx
            n += 1
    return n


class SparkDensify(nn.Module):
    """Per-level densification of the sparse encoder features (nnssl ``SparK3D``; see module docstring).

    Args:
        channels: encoder output channels per level (``encoder.output_channels``), full resolution first.
        ctx: the network's mask context.
        mask_token: False = identity (nnssl ``use_mask_token=False``).

    Keys: ``mask_tokens.<i>`` (1, C_i, 1, 1, 1) and ``projs.<i>.weight/bias`` for i >= 1.
    """

    def __init__(self, channels: Sequence[int], ctx: SparseMaskContext, mask_token: bool = True) -> None:
        super().__init__()
        self.ctx = ctx
        self.use_mask_token = bool(mask_token)
        self.mask_tokens = nn.ParameterList()
        self.projs = nn.ModuleList()
        if self.use_mask_token:
            for i, c in enumerate(channels):
                p = nn.Parameter(torch.zeros(1, int(c), 1, 1, 1))
                nn.init.trunc_normal_(p, mean=0.0, std=0.02, a=-0.02, b=0.02)
                self.mask_tokens.append(p)
                self.projs.append(nn.Identity() if i == 0 else nn.Conv3d(int(c), int(c), 3, 1, 1, bias=True))

    def forward(self, feats: Sequence[Tensor]) -> List[Tensor]:
        """Encoder skips (sparse) -> decoder skips (dense), same shapes (B, C_i, x_i, y_i, z_i)."""
        if not self.use_mask_token:
            return list(feats)
        out = []
        for i, f in enumerate(feats):
            m = self.ctx.at(f)
            if m is None:
                m = torch.ones_like(f[:, :1])
            f = sparse_instance_norm(f, m, None, None, 1e-5)
            f = torch.where(m > 0, f, self.mask_tokens[i].to(f.dtype).expand_as(f))
            out.append(self.projs[i](f))
        return out


# ----------------------------------------------------------------------------------------------------------
# the task
# ----------------------------------------------------------------------------------------------------------
@register_pretext("s3d")
class S3DTask(PretextTask):
    """Sparse masked image modelling (see module docstring).

    ``corrupt``: input = masked (or clean, ``mask_input=False``) patch, target = clean patch, ``loss_mask`` =
    masked voxels (B, 1, X, Y, Z), ``extras = {"visible": (B, 1, X, Y, Z) float}``. ``forward`` needs
    :meth:`build_conditioning` to have run on the network (what the pretraining trainer and
    :func:`nnpre_trainers.pretext.attach_conditioning` do): it makes the encoder sparse in place and
    returns the densify module.
    """

    config_class = S3DConfig

    def corrupt(self, image: Tensor, generator: torch.Generator,
                context: Optional[dict] = None) -> PretextSample:
        check_image(image, self.name)
        cfg = self.config
        visible = block_mask(image.shape[0], image.shape[2:], int(cfg.block_size), float(cfg.mask_ratio),
                             generator).to(image.device, image.dtype)
        inp = image * visible if cfg.mask_input else image.clone()
        return PretextSample(input=inp, target=image, loss_mask=1.0 - visible, extras={"visible": visible})

    def build_conditioning(self, network: nn.Module) -> nn.Module:
        net = unwrap_network(network)
        enc = getattr(net, "encoder", None)
        if enc is None or not hasattr(enc, "output_channels") or not hasattr(net, "decoder"):
            fail(f"S3D needs an nnU-Net U-Net with 'encoder' and 'decoder' (ResidualEncoderUNet/PlainConvUNet), "
                 f"got {type(net).__name__}")
        ctx = SparseMaskContext(int(self.config.block_size))
        sparsify_encoder(enc, ctx)
        return SparkDensify(list(enc.output_channels), ctx, bool(self.config.mask_token))

    def _densify(self, network: nn.Module) -> SparkDensify:
        mod = getattr(unwrap_network(network), CONDITIONING_ATTR, None)
        if not isinstance(mod, SparkDensify):
            fail(f"the s3d pretext needs its densify module on the network: register task.build_conditioning("
                 f"network) as network.{CONDITIONING_ATTR} (or call nnpre_trainers.pretext.attach_conditioning("
                 f"network, task)) before training")
        return mod

    def forward(self, network: nn.Module, sample: PretextSample) -> Tensor:
        """Sparse encoder -> densify -> decoder; returns (B, C, X, Y, Z) reconstructions."""
        dens = self._densify(network)
        net = unwrap_network(network)
        visible = sample.extras.get("visible")
        if visible is None:
            visible = 1.0 - sample.loss_mask
        dens.ctx.set(visible.to(sample.input.device, sample.input.dtype))
        try:
            return net.decoder(dens(net.encoder(sample.input)))
        finally:
            dens.ctx.set(None)

    def preview(self, sample: PretextSample, prediction: Tensor) -> Dict[str, Tensor]:
        """input (clean), corrupted (masked), prediction, target and the prediction pasted into the visible voxels."""
        vis = 1.0 - sample.loss_mask
        return {"input": _vol(sample.target), "corrupted": _vol(sample.target * vis), "prediction": _vol(prediction),
                "target": _vol(sample.target),
                "composite": _vol(sample.target * vis + prediction.detach().to(vis.dtype) * (1.0 - vis))}
