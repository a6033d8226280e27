"""VoCo: volume contrast (Wu et al., "VoCo: A Simple-yet-Effective Volume Contrastive Learning Framework for
3D Medical Image Analysis", CVPR 2024, arXiv 2402.17300) on the nnU-Net encoder.

Reference implementation: nnssl ``training/nnsslTrainer/volume_contrastive/vocoTrainer.py`` (``VoCoTrainer``),
``ssl_data/dataloading/voco_transform.py`` (``VocoTransform``), ``training/loss/voco_loss.py`` (``VoCoLoss``),
``architectures/voco_architecture.py`` (``VoCoArchitecture``, ``VocoProjectionHead``).

Per sample (the loader crops a region of ``region_size``, nnssl's 256×256×64 "patch"):

* **base crops**: the region split into a ``base_crops`` grid (4×4×1) of non-overlapping crops (64³);
* **target crops**: ``num_target_crops`` (4) crops of the same size at uniform random positions in the region;
* **targets**: the overlap ratio of every target crop with every base crop, ``|T ∩ B| / |crop|`` (B, N_t, N_b);
  each row sums to 1 because the base crops tile the region;
* **network**: the encoder only; each stage output is average-pooled and concatenated, then a projection
  head (Linear 2048 → norm → ReLU → Linear 2048 → norm → ReLU → Linear 2048); stored as
  ``nnpre_conditioning.*`` (outside ``encoder.*``, dropped at transfer like the decoder, which VoCo leaves unused);
* **loss** (``VoCoLoss``, weights 1 and 1): prediction loss with ``s = relu(cos(base.detach(), target))``,
  ``-log(1 - |overlap - s| + 1e-6)`` weighted by the overlap over overlapping pairs plus ``s²`` over
  non-overlapping pairs; regulariser = mean ``relu(cos)`` over pairs of base crops of a sample.

* **crop augmentation** (``crop_augment``): nnssl's ``VocoTransform`` list, built from the same
  batchgenerators transforms with the same parameters, applied to every base and target crop: Gaussian noise
  (p 0.1), Gaussian blur (σ 0.5-1, p 0.2, per channel 0.5), multiplicative brightness (0.75-1.25, p 0.15),
  contrast (p 0.15), low-resolution simulation (zoom 0.5-1, p 0.1), gamma with inversion (0.7-1.5, p 0.1)
  and without (p 0.3), mirroring of each axis, 90° rotation in (X, Y) (p 0.3). They draw from numpy's global
  generator, so they run seeded from the task's generator with the global state restored
  (:func:`nnpre_trainers.pretext.rng.seeded_global_rngs`).

Deviations (README table): the head's norm is ``LayerNorm`` without affine — what nnssl's
``InstanceNorm1d(affine=False)`` computes on a (N, features) input (normalises each row over its features);
the 90° rotation is left out when the crop is not square in (X, Y) (nnssl's crops are cubes);
nnssl does not clip gradients for VoCo, nnpre's trainer clips at 12 for every task.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nnpre.errors import fail
from nnpre_trainers.pretext.base import (
    CONDITIONING_ATTR,
    PretextSample,
    PretextTask,
    check_image,
    unwrap_network,
)
from nnpre_trainers.pretext.registry import register_pretext
from nnpre_trainers.pretext.rng import seeded_global_rngs


@dataclass(frozen=True)
class VoCoConfig:
    """VoCo hyperparameters (defaults: nnssl ``VoCoTrainer`` / ``VoCoLoss`` / ``VocoProjectionHead``).

    Attributes:
        region_size: (X, Y, Z) voxels the loader crops per sample. nnssl (256, 256, 64); ``None`` = the plans'
            patch size.
        base_crops: base-crop grid per axis. nnssl (4, 4, 1) (official VoCo 4×4×1 as well).
        num_target_crops: random crops per sample. nnssl 4.
        pred_weight, reg_weight: loss weights. nnssl 1, 1.
        hidden_dim, embed_dim: projection head widths. nnssl 2048, 2048.
        crop_augment: nnssl's per-crop augmentation (see module docstring).
    """

    region_size: Optional[Tuple[int, int, int]] = (256, 256, 64)
    base_crops: Tuple[int, int, int] = (4, 4, 1)
    num_target_crops: int = 4
    pred_weight: float = 1.0
    reg_weight: float = 1.0
    hidden_dim: int = 2048
    embed_dim: int = 2048
    crop_augment: bool = True

    def __post_init__(self):
        if len(tuple(self.base_crops)) != 3 or min(int(b) for b in self.base_crops) < 1:
            raise ValueError(f"base_crops must be 3 positive integers, got {self.base_crops}")
        if int(np_prod(self.base_crops)) < 2:
            raise ValueError(f"base_crops must give at least 2 base crops, got {self.base_crops}")
        if self.region_size is not None:
            if len(tuple(self.region_size)) != 3 or any(int(r) % int(b) for r, b in zip(self.region_size,
                                                                                       self.base_crops)):
                raise ValueError(f"region_size {self.region_size} must be divisible by base_crops {self.base_crops}")
        if int(self.num_target_crops) < 1:
            raise ValueError(f"num_target_crops must be >= 1, got {self.num_target_crops}")
        for k in ("hidden_dim", "embed_dim"):
            if int(getattr(self, k)) < 1:
                raise ValueError(f"{k} must be >= 1, got {getattr(self, k)}")


def np_prod(xs: Sequence[int]) -> int:
    out = 1
    for x in xs:
        out *= int(x)
    return out


# ----------------------------------------------------------------------------------------------------------
# crops and overlap targets
# ----------------------------------------------------------------------------------------------------------
def base_crop_boxes(region: Sequence[int], grid: Sequence[int]) -> Tensor:
    """(N_b, 3, 2) start/stop of the base crops tiling ``region`` by ``grid`` (X slowest, Z fastest, as nnssl)."""
    size = [int(r) // int(g) for r, g in zip(region, grid)]
    boxes = [[[i * s, (i + 1) * s] for i, s in zip(idx, size)]
             for idx in itertools.product(*[range(int(g)) for g in grid])]
    return torch.tensor(boxes, dtype=torch.long)


def overlap_ratios(target_starts: Tensor, crop_size: Sequence[int], boxes: Tensor) -> Tensor:
    """Overlap volume of each target crop with each base box, divided by the crop volume.

    Args:
        target_starts: (..., N_t, 3) long crop origins.
        crop_size: (3,) crop size (targets and base crops have the same size).
        boxes: (N_b, 3, 2) base boxes.

    Returns:
        (..., N_t, N_b) float32 in [0, 1] (nnssl ``VocoTransform.get_target_crops``).
    """
    size = torch.tensor([int(c) for c in crop_size], dtype=torch.long)
    lo = torch.maximum(target_starts[..., :, None, :], boxes[:, :, 0])
    hi = torch.minimum(target_starts[..., :, None, :] + size, boxes[:, :, 1])
    inter = (hi - lo).clamp_min(0).prod(dim=-1)
    return inter.float() / float(size.prod())


def crop_augmentation(crop_size: Sequence[int]):
    """nnssl ``VocoTransform``'s training augmentation (``aug="train"``) as a batchgenerators ``Compose``.

    Applied to a (N, C, x, y, z) numpy batch of crops as ``compose(data=crops, seg=None)["data"]``; draws
    from numpy's global generator (wrap in :func:`seeded_global_rngs`).
    """
    from batchgenerators.transforms.abstract_transforms import Compose
    from batchgenerators.transforms.color_transforms import (
        BrightnessMultiplicativeTransform,
        ContrastAugmentationTransform,
        GammaTransform,
    )
    from batchgenerators.transforms.noise_transforms import GaussianBlurTransform, GaussianNoiseTransform
    from batchgenerators.transforms.resample_transforms import SimulateLowResolutionTransform
    from batchgenerators.transforms.spatial_transforms import MirrorTransform, Rot90Transform

    ts = [GaussianNoiseTransform(p_per_sample=0.1),
          GaussianBlurTransform((0.5, 1.0), different_sigma_per_channel=True, p_per_sample=0.2, p_per_channel=0.5),
          BrightnessMultiplicativeTransform(multiplier_range=(0.75, 1.25), p_per_sample=0.15),
          ContrastAugmentationTransform(p_per_sample=0.15),
          SimulateLowResolutionTransform(zoom_range=(0.5, 1), per_channel=True, p_per_channel=0.5,
                                         order_downsample=0, order_upsample=3, p_per_sample=0.1, ignore_axes=None),
          GammaTransform((0.7, 1.5), True, True, retain_stats=True, p_per_sample=0.1),
          GammaTransform((0.7, 1.5), False, True, retain_stats=True, p_per_sample=0.3),
          MirrorTransform(axes=(0,)), MirrorTransform(axes=(1,)), MirrorTransform(axes=(2,))]
    if int(crop_size[0]) == int(crop_size[1]):
        ts.append(Rot90Transform(axes=(0, 1)))
    return Compose(ts)


# ----------------------------------------------------------------------------------------------------------
# head and loss
# ----------------------------------------------------------------------------------------------------------
class VoCoHead(nn.Module):
    """Pooled multi-stage encoder features -> embedding (nnssl ``VoCoArchitecture`` + ``VocoProjectionHead``).

    Args:
        stage_channels: encoder output channels per stage; the head input is their sum.
        hidden_dim, embed_dim: widths (nnssl 2048, 2048).
    """

    def __init__(self, stage_channels: Sequence[int], hidden_dim: int = 2048, embed_dim: int = 2048) -> None:
        super().__init__()
        total = int(sum(int(c) for c in stage_channels))
        self.layers = nn.Sequential(
            nn.Linear(total, hidden_dim), nn.LayerNorm(hidden_dim, elementwise_affine=False), nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, hidden_dim), nn.LayerNorm(hidden_dim, elementwise_affine=False),
            nn.ReLU(inplace=True), nn.Linear(hidden_dim, embed_dim))

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        """Stage outputs [(N, C_s, x_s, y_s, z_s)] -> (N, embed_dim)."""
        pooled = torch.cat([f.mean(dim=(2, 3, 4)) for f in feats], dim=1)
        return self.layers(pooled)


def _cos01(a: Tensor, b: Tensor) -> Tensor:
    """``relu(cos(a, b))`` over the last dim, clamped to at most 1 (float32 inputs: see :func:`voco_loss`)."""
    return F.cosine_similarity(a, b, dim=-1).clamp(0.0, 1.0)


def voco_loss(base: Tensor, target: Tensor, overlaps: Tensor, pred_weight: float = 1.0,
              reg_weight: float = 1.0) -> Tuple[Tensor, Tensor, Tensor]:
    """VoCo loss (nnssl ``VoCoLoss``; paper eq. 3, 5, 7 as the official code computes them).

    Args:
        base: (B, N_b, D) base-crop embeddings.
        target: (B, N_t, D) target-crop embeddings.
        overlaps: (B, N_t, N_b) overlap ratios in [0, 1].

    Returns:
        (total, prediction loss, regularisation loss), float32 scalars.

    Numerics: everything is computed in float32 and the cosine similarities are clamped to [0, 1] (nnssl only
    applies ``relu``). In exact arithmetic ``cos <= 1`` and the clamp changes nothing, but a bfloat16 cosine of
    nearly parallel embeddings rounds to 1.0078; with a small positive overlap ``1 - |overlap - s|`` then drops
    below 0 and the log gives NaN (seen under bf16 autocast).
    """
    base, target, overlaps = base.float(), target.float(), overlaps.float()
    sim = _cos01(base.detach()[:, None, :, :], target[:, :, None, :])  # (B, Nt, Nb)
    pos = (overlaps > 0).to(sim.dtype)
    pos_loss = (-torch.log(1 - (overlaps - sim).abs() + 1e-6) * overlaps).sum() / overlaps.sum().clamp_min(1e-6)
    neg_loss = (sim ** 2 * (1 - pos)).sum() / (1 - pos + 1e-6).sum()
    pred = pos_loss + neg_loss
    inter = _cos01(base[:, None, :, :], base[:, :, None, :])  # (B, Nb, Nb)
    n = inter.shape[-1]
    upper = torch.ones(n, n, device=inter.device, dtype=inter.dtype).triu(diagonal=1)
    reg = torch.mean((inter * upper).sum(dim=(-2, -1)) * 2 / (n * (n - 1)))
    return pred_weight * pred + reg_weight * reg, pred, reg


# ----------------------------------------------------------------------------------------------------------
# the task
# ----------------------------------------------------------------------------------------------------------
@register_pretext("voco")
class VoCoTask(PretextTask):
    """Volume contrast (see module docstring).

    ``corrupt(image)``: ``image`` (B, C, RX, RY, RZ) is the region (RX divisible by ``base_crops[0]`` etc.);
    input = (B · (N_b + N_t), C, cx, cy, cz) crops, sample-major, the N_b base crops of a sample first;
    target = (B, N_t, N_b) overlap ratios; ``extras = {"target_starts": (B, N_t, 3) long}``.
    ``forward`` returns (B, N_b + N_t, embed_dim) embeddings; ``loss`` is :func:`voco_loss`.
    """

    config_class = VoCoConfig

    def loader_patch_size(self, patch_size: Sequence[int]) -> List[int]:
        return [int(r) for r in (self.config.region_size or patch_size)]

    def loader_augmentation(self) -> str:
        return "none"  # nnssl VoCoTrainer: the only augmentations act on the crops (see corrupt)

    def network_patch_size(self, patch_size: Sequence[int]) -> List[int]:
        region = self.loader_patch_size(patch_size)
        return [r // int(b) for r, b in zip(region, self.config.base_crops)]

    def num_output_channels(self, num_input_channels: int) -> int:
        return int(num_input_channels)  # the decoder is built (plain U-Net keys) but not used

    def corrupt(self, image: Tensor, generator: torch.Generator,
                context: Optional[dict] = None) -> PretextSample:
        check_image(image, self.name)
        cfg = self.config
        region = [int(s) for s in image.shape[2:]]
        if any(r % int(b) for r, b in zip(region, cfg.base_crops)):
            fail(f"VoCo region {region} is not divisible by base_crops {tuple(cfg.base_crops)}; set region_size "
                 f"to a multiple of the base-crop grid")
        B = image.shape[0]
        crop = [r // int(b) for r, b in zip(region, cfg.base_crops)]
        boxes = base_crop_boxes(region, cfg.base_crops)
        nt = int(cfg.num_target_crops)
        span = torch.tensor([r - c + 1 for r, c in zip(region, crop)], dtype=torch.float64)
        starts = (torch.rand(B, nt, 3, generator=generator, dtype=torch.float64) * span).long()
        overlaps = overlap_ratios(starts, crop, boxes)
        crops = []
        for b in range(B):
            for box in boxes.tolist():
                crops.append(image[b, :, box[0][0]:box[0][1], box[1][0]:box[1][1], box[2][0]:box[2][1]])
            for s in starts[b].tolist():
                crops.append(image[b, :, s[0]:s[0] + crop[0], s[1]:s[1] + crop[1], s[2]:s[2] + crop[2]])
        inp = torch.stack(crops).contiguous()
        if cfg.crop_augment:
            seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator))
            arr = inp.detach().to("cpu", torch.float32).numpy().copy()
            with seeded_global_rngs(seed):
                arr = crop_augmentation(crop)(data=arr, seg=None)["data"]
            inp = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).to(image.device, image.dtype)
        return PretextSample(input=inp, target=overlaps.to(image.device), loss_mask=None,
                             extras={"target_starts": starts})

    def build_conditioning(self, network: nn.Module) -> nn.Module:
        enc = getattr(unwrap_network(network), "encoder", None)
        if enc is None or not hasattr(enc, "output_channels"):
            fail(f"VoCo needs an nnU-Net U-Net with an 'encoder' (ResidualEncoderUNet/PlainConvUNet), "
                 f"got {type(unwrap_network(network)).__name__}")
        return VoCoHead(list(enc.output_channels), int(self.config.hidden_dim), int(self.config.embed_dim))

    def _head(self, network: nn.Module) -> VoCoHead:
        head = getattr(unwrap_network(network), CONDITIONING_ATTR, None)
        if not isinstance(head, VoCoHead):
            fail(f"the voco pretext needs its projection head on the network: register task.build_conditioning("
                 f"network) as network.{CONDITIONING_ATTR} (or call nnpre_trainers.pretext.attach_conditioning("
                 f"network, task)) before training")
        return head

    def forward(self, network: nn.Module, sample: PretextSample) -> Tensor:
        """Encoder + head on all crops -> (B, N_b + N_t, embed_dim)."""
        head = self._head(network)
        B, nt, nb = sample.target.shape
        feats = unwrap_network(network).encoder(sample.input)
        emb = head(list(feats) if isinstance(feats, (list, tuple)) else [feats])
        return emb.view(B, nb + nt, -1)

    def loss(self, prediction: Tensor, sample: PretextSample) -> Tensor:
        nb = sample.target.shape[2]
        total, _, _ = voco_loss(prediction[:, :nb], prediction[:, nb:], sample.target,
                                float(self.config.pred_weight), float(self.config.reg_weight))
        return total

    def preview(self, sample: PretextSample, prediction: Tensor) -> Dict[str, Tensor]:
        """Base crop 0 and target crop 0 of sample 0 (channel 0)."""
        nb = sample.target.shape[2]
        return {"base_crop": sample.input[0, 0].detach().float().cpu(),
                "target_crop": sample.input[nb, 0].detach().float().cpu()}
