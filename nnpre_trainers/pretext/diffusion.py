"""Denoising-diffusion pretraining of a U-Net encoder (seed design: arXiv 2501.19265, Li et al. 2025).

The paper pretrains a DDPM-style denoiser on 3-D CT patches (ε-prediction), optionally conditioned on
body-part coordinates concatenated to the input, and probes frozen encoder features taken at small
timesteps t = 10, 30, 60. It does not state T, the noise schedule or how t enters the network, so nnpre
chooses (all configurable):

* **T = 1000** and the **linear** β schedule 1e-4 → 0.02 of DDPM (Ho et al., NeurIPS 2020). Linear is the
  default because the paper's useful feature range (t ≈ 10-60, degrading above ~100) is only a small amount
  of noise under it (ᾱ_60 ≈ 0.958, ᾱ_999 ≈ 4.04e-5); ``schedule="cosine"`` gives Nichol & Dhariwal's
  (ICML 2021) cosine schedule (s = 0.008, β clipped at 0.999). Timesteps are 0-based: t = 0 is the first noising step.
* ε-prediction with a plain MSE loss (Ho et al.'s L_simple); t ~ U{0..T-1} per sample.
* **timestep conditioning, transferred as trained** (:class:`TimestepConditioning`): sinusoidal embedding →
  2-layer SiLU MLP → SiLU + linear layer giving a channel-wise FiLM ``h * (1 + scale) + shift`` of the output
  of every instance norm of the encoder (the scale/shift time conditioning of the ADM U-Net, Dhariwal & Nichol
  2021, placed at the norms so that stock ResEnc/PlainConv U-Nets need no change). The modulation is
  ``f(t) - f(t*)``: the identity at the transfer timestep ``t*`` (``transfer_timestep``, default 10, the
  smallest feature timestep of the paper). So the network's own weights *are* the encoder as it computes at
  t*: what ``nnPre_export`` / fine-tuning load from ``encoder.*`` equals the pretraining encoder at t*, with
  nothing dropped. :func:`fold_timestep` bakes any other t into the norm affines instead.
  No hooks: :meth:`DiffusionTask.build_conditioning` switches the encoder's ``InstanceNorm3d`` layers to
  :class:`FiLMInstanceNorm3d` (class swap, same parameters and state-dict keys), which read the modulation
  from a per-network :class:`FiLMContext` that only :meth:`DiffusionTask.forward` fills (and clears). This
  runs under ``torch.compile`` (tested on CPU). The conditioning's own keys are ``nnpre_conditioning.*``.
* optional **anatomical (coordinate) guidance** (``coord_channels=True``): three extra input channels holding
  each voxel's normalised position in its volume, concatenated to the noisy patch as the paper concatenates
  its body-part-regression coordinates (which it found to help little: 75.6 vs 77.5 Dice on FLARE). The stem
  then has C + 3 input channels; ``nnpre.weight_transfer`` drops the 3 coordinate input channels of the stem
  at transfer (``drop_pretext_input_channels``), so the downstream network takes images only.

Input range: z-scored patches (≈ zero mean, unit variance, the scale of the N(0, I) noise).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from nnpre.errors import fail
from nnpre_trainers.pretext.base import CONDITIONING_ATTR, PretextSample, PretextTask, _vol, check_image, unwrap_network
from nnpre_trainers.pretext.registry import register_pretext

SCHEDULES = ("linear", "cosine")


@dataclass(frozen=True)
class DiffusionConfig:
    """Diffusion hyperparameters (sources in the module docstring).

    Attributes:
        num_timesteps: T. DDPM default 1000.
        schedule: ``"linear"`` (Ho et al. 2020) or ``"cosine"`` (Nichol & Dhariwal 2021).
        beta_start, beta_end: linear schedule end points. Ho et al.: 1e-4, 0.02.
        cosine_s: cosine schedule offset. Nichol & Dhariwal: 0.008.
        time_embed_dim: width of the sinusoidal embedding; the MLP width is twice this.
        coord_channels: append 3 normalised-position channels to the input.
        feature_timesteps: timesteps at which :meth:`DiffusionTask.extract_features` probes the encoder.
            arXiv 2501.19265: 10, 30, 60.
        transfer_timestep: t*, the timestep at which the conditioning is the identity, i.e. the encoder that
            is transferred. Default 10, the smallest of the paper's feature timesteps.
    """

    num_timesteps: int = 1000
    schedule: str = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    cosine_s: float = 0.008
    time_embed_dim: int = 128
    coord_channels: bool = False
    feature_timesteps: Tuple[int, ...] = (10, 30, 60)
    transfer_timestep: int = 10

    def __post_init__(self):
        if not 0 <= int(self.transfer_timestep) < int(self.num_timesteps):
            raise ValueError(f"transfer_timestep {self.transfer_timestep} outside [0, {self.num_timesteps})")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if int(self.num_timesteps) < 1:
            raise ValueError(f"num_timesteps must be >= 1, got {self.num_timesteps}")
        if not 0.0 < float(self.beta_start) <= float(self.beta_end) < 1.0:
            raise ValueError(f"need 0 < beta_start <= beta_end < 1, got {self.beta_start}, {self.beta_end}")
        if int(self.time_embed_dim) < 2:
            raise ValueError(f"time_embed_dim must be >= 2, got {self.time_embed_dim}")
        for t in self.feature_timesteps:
            if not 0 <= int(t) < int(self.num_timesteps):
                raise ValueError(f"feature timestep {t} outside [0, {self.num_timesteps})")


# ----------------------------------------------------------------------------------------------------------
# noise schedule and closed-form forward process
# ----------------------------------------------------------------------------------------------------------
def beta_schedule(kind: str = "linear", num_timesteps: int = 1000, beta_start: float = 1e-4,
                  beta_end: float = 0.02, cosine_s: float = 0.008) -> Tensor:
    """β_1..β_T as a (T,) float64 tensor.

    ``linear``: evenly spaced from ``beta_start`` to ``beta_end`` (Ho et al. 2020).
    ``cosine``: ᾱ(t) = f(t)/f(0), f(t) = cos²(((t/T) + s)/(1 + s) · π/2), β_t = min(1 - ᾱ_t/ᾱ_{t-1}, 0.999)
    (Nichol & Dhariwal 2021).
    """
    if kind == "linear":
        return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
    if kind == "cosine":
        steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
        f = torch.cos((steps + cosine_s) / (1 + cosine_s) * math.pi / 2) ** 2
        abar = f / f[0]
        return (1 - abar[1:] / abar[:-1]).clamp(max=0.999)
    fail(f"unknown noise schedule '{kind}'; choose one of {SCHEDULES}")


def q_sample(x0: Tensor, t: Tensor, noise: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """Closed-form forward process x_t = sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) ε (Ho et al. 2020, eq. 4).

    Args:
        x0: (B, C, X, Y, Z) clean patches.
        t: (B,) long timesteps in [0, T).
        noise: ε, same shape as ``x0``.
        alphas_cumprod: (T,) ᾱ.

    Returns:
        x_t with ``x0``'s shape and dtype.
    """
    a = alphas_cumprod.to(x0.device)[t.to(x0.device)].view(-1, *([1] * (x0.ndim - 1)))
    return (a.sqrt() * x0 + (1 - a).sqrt() * noise).to(x0.dtype)


def predict_x0(x_t: Tensor, t: Tensor, eps: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """Invert :func:`q_sample` for x0 given (predicted) noise: (x_t - sqrt(1 - ᾱ_t) ε) / sqrt(ᾱ_t)."""
    a = alphas_cumprod.to(x_t.device)[t.to(x_t.device)].view(-1, *([1] * (x_t.ndim - 1)))
    return ((x_t - (1 - a).sqrt() * eps) / a.sqrt()).to(x_t.dtype)


# ----------------------------------------------------------------------------------------------------------
# conditioning
# ----------------------------------------------------------------------------------------------------------
def sinusoidal_embedding(t: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """Transformer/DDPM sinusoidal embedding of (B,) timesteps -> (B, dim) float32 (sin half, cos half)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return nn.functional.pad(emb, (0, dim % 2))


def encoder_stages(network: nn.Module) -> List[nn.Module]:
    """The encoder stage modules (``network.encoder.stages``) of a dynamic-network-architectures U-Net."""
    net = unwrap_network(network)
    stages = getattr(getattr(net, "encoder", None), "stages", None)
    if stages is None:
        fail(f"diffusion pretraining needs a U-Net with 'encoder.stages' (ResidualEncoderUNet/PlainConvUNet), "
             f"got {type(net).__name__}")
    return list(stages)


class FiLMContext:
    """The per-forward FiLM of one network (not a module-level global).

    Attributes:
        film: None (every :class:`FiLMInstanceNorm3d` is a plain instance norm) or one (scale, shift) pair of
            (B, C_i, 1, 1, 1) tensors per conditioned norm, in encoder module order.
    """

    def __init__(self) -> None:
        self.film: Optional[List[Tuple[Tensor, Tensor]]] = None


class FiLMInstanceNorm3d(nn.InstanceNorm3d):
    """``nn.InstanceNorm3d`` followed by ``y * (1 + scale) + shift`` from its :class:`FiLMContext` when set."""

    nnpre_film_ctx: FiLMContext
    nnpre_film_index: int

    def forward(self, x: Tensor) -> Tensor:
        y = super().forward(x)
        film = self.nnpre_film_ctx.film
        if film is None:
            return y
        scale, shift = film[self.nnpre_film_index]
        return y * (1 + scale.to(y.dtype)) + shift.to(y.dtype)


def conditioned_norms(encoder: nn.Module, ctx: Optional[FiLMContext] = None) -> List[FiLMInstanceNorm3d]:
    """The encoder's instance norms in module order, switched to :class:`FiLMInstanceNorm3d` (class swap:
    same parameters and state-dict keys) and bound to ``ctx`` (when given)."""
    norms = []
    for name, mod in encoder.named_modules():
        if type(mod) is nn.InstanceNorm3d:
            mod.__class__ = FiLMInstanceNorm3d
        elif isinstance(mod, nn.modules.batchnorm._NormBase) and not isinstance(mod, FiLMInstanceNorm3d):
            fail(f"diffusion timestep conditioning needs instance norms in the encoder, found "
                 f"{type(mod).__name__} at 'encoder.{name}'; use an nnU-Net plan with InstanceNorm3d")
        if isinstance(mod, FiLMInstanceNorm3d):
            if ctx is not None:
                mod.nnpre_film_ctx = ctx
                mod.nnpre_film_index = len(norms)
            norms.append(mod)
    return norms


class TimestepConditioning(nn.Module):
    """Timestep → channel-wise FiLM of every encoder instance norm, the identity at ``transfer_timestep``.

    ``(scale_i(t), shift_i(t)) = g_i(t) - g_i(t*)`` with ``g`` = sinusoidal embedding → Linear → SiLU → Linear →
    SiLU → Linear (last layer zero-initialised, so training starts from the unconditioned network).

    Args:
        norm_channels: channels of each conditioned norm (encoder module order).
        embed_dim: sinusoidal embedding width; hidden width is ``2 * embed_dim``.
        transfer_timestep: t*.
        ctx: the network's :class:`FiLMContext`.
    """

    def __init__(self, norm_channels: Sequence[int], embed_dim: int = 128, transfer_timestep: int = 10,
                 ctx: Optional[FiLMContext] = None) -> None:
        super().__init__()
        self.embed_dim = int(embed_dim)
        self.transfer_timestep = int(transfer_timestep)
        self.channels = [int(c) for c in norm_channels]
        self.ctx = ctx if ctx is not None else FiLMContext()
        hidden = 2 * self.embed_dim
        self.mlp = nn.Sequential(nn.Linear(self.embed_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.film = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * sum(self.channels)))
        nn.init.zeros_(self.film[1].weight)
        nn.init.zeros_(self.film[1].bias)

    def _raw(self, t: Tensor) -> Tensor:
        device = self.film[1].weight.device
        return self.film(self.mlp(sinusoidal_embedding(t.to(device), self.embed_dim)))

    def forward(self, t: Tensor) -> List[Tuple[Tensor, Tensor]]:
        """(B,) timesteps -> per norm (scale, shift), each (B, C_i, 1, 1, 1); exactly 0 where t == t*."""
        t_star = torch.full_like(t[:1], self.transfer_timestep)
        raw = self._raw(torch.cat([t.reshape(-1), t_star.reshape(-1)]))
        g = raw[:-1] - raw[-1:]
        out, pos = [], 0
        for c in self.channels:
            scale, shift = g[:, pos:pos + c], g[:, pos + c:pos + 2 * c]
            out.append((scale[..., None, None, None], shift[..., None, None, None]))
            pos += 2 * c
        return out


def fold_timestep(network: nn.Module, t: int) -> Dict[str, Tensor]:
    """The network's state dict with the FiLM of timestep ``t`` folded into the encoder's norm affines.

    ``IN(x) * w * (1 + s) + b * (1 + s) + shift`` = an instance norm with weight ``w (1 + s)`` and bias
    ``b (1 + s) + shift``. For ``t = transfer_timestep`` this is the plain state dict (s = shift = 0). The
    ``nnpre_conditioning.*`` keys are left out.
    """
    net = unwrap_network(network)
    cond = getattr(net, CONDITIONING_ATTR, None)
    if not isinstance(cond, TimestepConditioning):
        fail("fold_timestep needs a network with the diffusion timestep conditioning (network.nnpre_conditioning)")
    with torch.no_grad():
        film = cond(torch.tensor([int(t)]))
    sd = {k: v.detach().clone() for k, v in net.state_dict().items() if not k.startswith(CONDITIONING_ATTR + ".")}
    names: Dict[int, List[str]] = {}
    for n, m in net.named_modules(remove_duplicate=False):  # U-Net decoders alias the encoder (decoder.encoder.*)
        names.setdefault(id(m), []).append(n)
    for mod in conditioned_norms(net.encoder):
        if not mod.affine:
            fail(f"cannot fold the timestep into '{names[id(mod)][0]}': it has no affine parameters")
        scale, shift = (f[0, :, 0, 0, 0] for f in film[mod.nnpre_film_index])
        weight, bias = mod.weight.detach() * (1 + scale), mod.bias.detach() * (1 + scale) + shift
        for name in names[id(mod)]:
            sd[f"{name}.weight"], sd[f"{name}.bias"] = weight.clone(), bias.clone()
    return sd


def coordinate_channels(shape: Sequence[int], context: Optional[dict] = None,
                        device: Optional[torch.device] = None) -> Tensor:
    """Normalised voxel positions of each patch in its volume.

    Voxel index i of a volume with S voxels along an axis maps to ``2 i / (S - 1) - 1`` (-1 at the first
    voxel, +1 at the last; 0 if S = 1). Patch positions come from ``context["patch_bbox"]`` (B, 3, 2)
    start/stop and ``context["volume_shape"]`` (B, 3); voxels of patches that reach past the volume
    (nnU-Net pads such patches) get values beyond ±1. Without that context the patch's own grid is used
    (-1..1 across the patch), i.e. no information about the position in the volume.

    Args:
        shape: (B, C, X, Y, Z) of the batch.
        context: optional loader context.

    Returns:
        (B, 3, X, Y, Z) float32 channels (X, Y, Z coordinates).
    """
    B, spatial = int(shape[0]), [int(s) for s in shape[2:]]
    axes = []
    have = context is not None and "patch_bbox" in context and "volume_shape" in context
    if have:
        bbox = torch.as_tensor(context["patch_bbox"]).long().cpu()
        vol = torch.as_tensor(context["volume_shape"]).long().cpu()
        if tuple(bbox.shape) != (B, 3, 2) or tuple(vol.shape) != (B, 3):
            fail(f"coordinate conditioning needs context patch_bbox (B, 3, 2) and volume_shape (B, 3) with "
                 f"B={B}, got {tuple(bbox.shape)} and {tuple(vol.shape)}")
        if not torch.equal(bbox[:, :, 1] - bbox[:, :, 0], torch.tensor(spatial).expand(B, 3)):
            fail(f"context patch_bbox sizes {(bbox[:, :, 1] - bbox[:, :, 0]).tolist()} do not match the patch "
                 f"shape {spatial}; pass the bbox of the patch actually cropped")
    for a, n in enumerate(spatial):
        if have:
            idx = bbox[:, a, :1].double() + torch.arange(n, dtype=torch.float64)[None]  # (B, n)
            denom = (vol[:, a:a + 1].double() - 1).clamp(min=1)
            c = torch.where(vol[:, a:a + 1] > 1, 2 * idx / denom - 1, torch.zeros_like(idx))
        else:
            c = (torch.linspace(-1, 1, n, dtype=torch.float64) if n > 1 else torch.zeros(1, dtype=torch.float64))
            c = c[None].expand(B, n)
        view = [B, 1, 1, 1, 1]
        view[2 + a] = n
        axes.append(c.float().view(view).expand(B, 1, *spatial))
    return torch.cat(axes, dim=1).to(device if device is not None else "cpu")


# ----------------------------------------------------------------------------------------------------------
# the task
# ----------------------------------------------------------------------------------------------------------
@register_pretext("diffusion")
class DiffusionTask(PretextTask):
    """DDPM ε-prediction pretext (see module docstring).

    ``corrupt``: t ~ U{0..T-1} per sample, ε ~ N(0, I), input = x_t (+ 3 coordinate channels), target = ε,
    ``extras = {"t": (B,) long}``. ``forward`` needs the module from :meth:`build_conditioning` registered as
    ``network.nnpre_conditioning`` (what the pretraining trainer and :func:`attach_conditioning` do); outside
    ``forward`` the network computes as at ``transfer_timestep``.

    Attributes:
        betas, alphas_cumprod: (T,) float64 schedule tensors.
    """

    config_class = DiffusionConfig

    def __init__(self, **config) -> None:
        super().__init__(**config)
        c = self.config
        self.betas = beta_schedule(c.schedule, int(c.num_timesteps), float(c.beta_start), float(c.beta_end),
                                   float(c.cosine_s))
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)

    def num_extra_input_channels(self) -> int:
        return 3 if self.config.coord_channels else 0

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """Closed-form x_t for this task's schedule (see :func:`q_sample`)."""
        return q_sample(x0, t, noise, self.alphas_cumprod)

    def _network_input(self, x_t: Tensor, context: Optional[dict]) -> Tensor:
        if not self.config.coord_channels:
            return x_t
        return torch.cat([x_t, coordinate_channels(x_t.shape, context, x_t.device).to(x_t.dtype)], dim=1)

    def corrupt(self, image: Tensor, generator: torch.Generator,
                context: Optional[dict] = None) -> PretextSample:
        check_image(image, self.name)
        B = image.shape[0]
        t = torch.randint(0, int(self.config.num_timesteps), (B,), generator=generator, device=generator.device)
        noise = torch.randn(image.shape, generator=generator, device=generator.device, dtype=image.dtype)
        t, noise = t.to(image.device), noise.to(image.device)
        x_t = self.q_sample(image, t, noise)
        return PretextSample(input=self._network_input(x_t, context), target=noise, loss_mask=None,
                             extras={"t": t})

    def build_conditioning(self, network: nn.Module) -> nn.Module:
        """Switch the encoder's instance norms to FiLM norms (same keys) and return the timestep module."""
        encoder_stages(network)  # fails clearly on networks without encoder stages
        ctx = FiLMContext()
        norms = conditioned_norms(unwrap_network(network).encoder, ctx)
        return TimestepConditioning([m.num_features for m in norms], int(self.config.time_embed_dim),
                                    int(self.config.transfer_timestep), ctx)

    def _conditioning(self, network: nn.Module) -> TimestepConditioning:
        cond = getattr(unwrap_network(network), CONDITIONING_ATTR, None)
        if not isinstance(cond, TimestepConditioning):
            fail(f"the diffusion pretext needs its timestep conditioning on the network: register "
                 f"task.build_conditioning(network) as network.{CONDITIONING_ATTR} (or call "
                 f"nnpre_trainers.pretext.attach_conditioning(network, task)) before training")
        return cond

    def forward(self, network: nn.Module, sample: PretextSample) -> Tensor:
        """ε prediction (B, C, X, Y, Z) of ``network`` with the timesteps ``sample.extras["t"]`` injected."""
        if "t" not in sample.extras:
            fail("diffusion sample has no timesteps in extras['t']; build samples with DiffusionTask.corrupt")
        cond = self._conditioning(network)
        cond.ctx.film = cond(sample.extras["t"])
        try:
            return network(sample.input)
        finally:
            cond.ctx.film = None

    @torch.no_grad()
    def extract_features(self, network: nn.Module, image: Tensor, timesteps: Optional[Sequence[int]] = None,
                         generator: Optional[torch.Generator] = None,
                         context: Optional[dict] = None) -> Dict[int, List[Tensor]]:
        """Multi-scale encoder features of noised copies of ``image`` for probing (arXiv 2501.19265).

        For each t, x_t = q_sample(image, t, ε) with fresh ε from ``generator`` (a generator seeded with 0
        if None), then the encoder (with timestep conditioning) runs on x_t (+ coordinates). Gradients are
        off; the caller chooses train/eval mode.

        Args:
            network: the pretrained U-Net with ``nnpre_conditioning`` registered.
            image: (B, C, X, Y, Z) clean z-scored patches.
            timesteps: defaults to ``config.feature_timesteps`` (10, 30, 60).
            generator: noise source.
            context: loader context for coordinate channels.

        Returns:
            {t: [stage_0, ..., stage_{S-1}]}, stage s of shape (B, C_s, X / stride_s, ...).
        """
        check_image(image, self.name)
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        ts = [int(t) for t in (timesteps if timesteps is not None else self.config.feature_timesteps)]
        cond = self._conditioning(network)
        encoder = unwrap_network(network).encoder
        out: Dict[int, List[Tensor]] = {}
        for t in ts:
            if not 0 <= t < int(self.config.num_timesteps):
                fail(f"feature timestep {t} outside [0, {self.config.num_timesteps})")
            tt = torch.full((image.shape[0],), t, dtype=torch.long, device=image.device)
            noise = torch.randn(image.shape, generator=gen, device=gen.device, dtype=image.dtype)
            x_t = self.q_sample(image, tt, noise.to(image.device))
            cond.ctx.film = cond(tt)
            try:
                feats = encoder(self._network_input(x_t, context))
            finally:
                cond.ctx.film = None
            out[t] = list(feats) if isinstance(feats, (list, tuple)) else [feats]
        return out

    def denoise_preview(self, sample: PretextSample, prediction: Tensor) -> Tensor:
        """One-step estimate of x0 (B, C, X, Y, Z) from x_t and the predicted ε, clamped to the clean range."""
        c = sample.target.shape[1]
        t = sample.extras["t"]
        x_t = sample.input[:, :c]
        x0 = predict_x0(x_t, t, sample.target, self.alphas_cumprod)
        x0_hat = predict_x0(x_t, t, prediction.detach().to(x_t.dtype), self.alphas_cumprod)
        return x0_hat.clamp(float(x0.min()), float(x0.max()))

    def preview(self, sample: PretextSample, prediction: Tensor) -> Dict[str, Tensor]:
        """input = clean x0, corrupted = x_t, prediction = estimated x0, target = x0, plus the noise maps."""
        c = sample.target.shape[1]
        x0 = predict_x0(sample.input[:, :c], sample.extras["t"], sample.target, self.alphas_cumprod)
        return {"input": _vol(x0), "corrupted": _vol(sample.input[:, :c]),
                "prediction": _vol(self.denoise_preview(sample, prediction)), "target": _vol(x0),
                "noise_target": _vol(sample.target), "noise_prediction": _vol(prediction)}
