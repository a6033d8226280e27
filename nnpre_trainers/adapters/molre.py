"""``molre``: a mixture of low-rank experts per adapted convolution, softly routed per input.

MoLRE (Mixture of Low-Rank Experts; the head-CT foundation-model study in this project's issue 17) extends
LoRA with K low-rank adapters per layer and unsupervised soft routing between them. Our convolutional form,
for a selected encoder convolution ``W`` and input x of shape (B, C_in, X, Y, Z):

    g(x) = softmax(R · mean_xyz(x) + c)                     (B, K), routing weights, sum 1 per sample
    y    = W * x + (alpha / rank) · Σ_k g_k(x) · B_k * (A_k * x)

``A_k`` (C_in → rank, W's kernel / stride / padding) and ``B_k`` (rank → C_out, 1×1×1) as in LoRA
(:mod:`.lora`); ``R`` (K × C_in) and ``c`` (K) form the router, a linear map of the globally average-pooled
input of that layer. No routing supervision and no load-balancing loss: the router learns from the task loss
only. Implementation: the K experts' ``A`` are one conv to K·rank channels, the gated K·rank channels go
through one 1×1×1 conv to C_out (= Σ_k B_k h_k). Initialisation: A default conv init, B zero (the adapted
network starts at the pretrained one), router weight zero / bias zero (uniform routing at the start; the
experts differ through their A). Defaults K = 4 experts of rank 2, alpha 2 — the same A/B parameter count as
LoRA rank 8 plus K·(C_in + 1) router parameters per layer (our choice; the study gives no per-layer numbers).

What trains: the experts' ``A`` / ``B`` and the routers of the adapted encoder convs + everything outside
the encoder (decoder, heads). Frozen (bit-identical): all original ``encoder.*`` tensors.

Merging is **not exact**: the update depends on each input through g(x), so no single plain weight
reproduces it. :meth:`MoLREAdapter.merge` therefore refuses unless ``approximate=True``, which folds the
experts with fixed routing weights (the running mean of g over training batches, tracked like batch-norm
statistics with momentum 0.1; uniform before any training step). Predict with the unmerged network (the
trainer's own validation / in-memory prediction) for exact MoLRE outputs.
"""
from __future__ import annotations

from typing import Any, Dict

import torch
from torch import nn

from nnpre.errors import fail
from nnpre_trainers.adapters.base import Adapter, replace_module, unique_named_modules
from nnpre_trainers.adapters.lora import DEFAULT_LAYERS, _LowRankAdapter, low_rank_delta, low_rank_pair
from nnpre_trainers.adapters.registry import register_adapter

#: Momentum of the running mean routing weights used by an approximate merge (batch-norm's default).
GATE_MOMENTUM = 0.1


class MoLREConv(nn.Module):
    """A convolution plus K softly routed low-rank experts (see the module doc).

    Shapes: (B, C_in, X, Y, Z) → (B, C_out, X', Y', Z') as ``base``. Attributes ``last_gates`` (B, K) hold the
    routing weights of the latest forward (for inspection; not saved).
    """

    def __init__(self, base: nn.Module, rank: int, alpha: float, experts: int):
        super().__init__()
        self.base = base
        self.rank, self.alpha, self.experts = int(rank), float(alpha), int(experts)
        self.scaling = self.alpha / self.rank
        self.lora_A, self.lora_B = low_rank_pair(base, self.rank * self.experts)
        self.router = nn.Linear(base.in_channels, self.experts).to(device=base.weight.device,
                                                                    dtype=base.weight.dtype)
        nn.init.zeros_(self.router.weight)
        nn.init.zeros_(self.router.bias)
        self.register_buffer("gate_mean", torch.full((self.experts,), 1.0 / self.experts,
                                                     device=base.weight.device, dtype=base.weight.dtype))
        self.last_gates = None

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        """Routing weights (B, K) ≥ 0, summing to 1, from the spatially averaged input (B, C_in)."""
        pooled = x.flatten(2).mean(-1)
        return torch.softmax(self.router(pooled).float(), dim=1).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.gates(x)
        self.last_gates = g.detach()
        if self.training:
            with torch.no_grad():
                self.gate_mean.mul_(1 - GATE_MOMENTUM).add_(GATE_MOMENTUM * g.detach().float().mean(0)
                                                           .to(self.gate_mean.dtype))
        h = self.lora_A(x)  # (B, K·r, ...)
        shape = h.shape
        h = (h.view(shape[0], self.experts, self.rank, *shape[2:])
             * g.view(shape[0], self.experts, 1, *([1] * (len(shape) - 2)))).view(shape)
        return self.base(x) + self.scaling * self.lora_B(h)

    @torch.no_grad()
    def merged(self) -> nn.Module:
        """``base`` with the experts folded in at the fixed routing weights ``gate_mean`` (approximation)."""
        w = self.base.weight
        g = self.gate_mean.to(self.lora_A.weight.dtype).repeat_interleave(self.rank)  # (K·r,)
        a = self.lora_A.weight * g.view(-1, *([1] * (self.lora_A.weight.dim() - 1)))
        w.add_(self.scaling * low_rank_delta(a, self.lora_B.weight, w.shape).to(w.dtype))
        return self.base


@register_adapter("molre")
class MoLREAdapter(_LowRankAdapter):
    """Mixture of low-rank experts on the encoder's convolutions.

    Trains: per adapted encoder conv, K experts' ``A`` / ``B`` and the router (K × C_in weight + K bias) +
    all non-encoder parameters (decoder, heads). Frozen (bit-identical): all original ``encoder.*`` tensors.
    ``describe(network)["added_share"]`` is the extra-parameter share.

    Args:
        rank: rank of each expert (default 2).
        alpha: scaling numerator, each expert scaled by alpha / rank (default 2, i.e. 1.0).
        experts: K (default 4).
        layers: conv selection pattern, as for ``lora``.
    """

    wrapper_type = MoLREConv
    added_markers = (".lora_A.", ".lora_B.", ".router.")
    exact_merge = False

    def __init__(self, rank: int = 2, alpha: float = 2.0, experts: int = 4, layers: str = DEFAULT_LAYERS):
        super().__init__(rank, alpha, layers)
        if int(experts) < 1:
            fail(f"MoLRE needs at least one expert, got {experts}")
        self.experts = int(experts)

    def options(self) -> Dict[str, Any]:
        return {**super().options(), "experts": self.experts}

    def wrap(self, conv: nn.Module) -> nn.Module:
        return MoLREConv(conv, self.rank, self.alpha, self.experts)

    def merge(self, network: nn.Module, approximate: bool = False) -> None:
        """Refuses (one-line error) unless ``approximate``: routing depends on the input (module doc)."""
        if not approximate:
            fail("MoLRE routing depends on each input, so its experts cannot be folded exactly into plain "
                 "weights; predict with the unmerged network, or merge with approximate=True "
                 "(experts fixed at their mean training routing)")
        Adapter.merge(self, network)
        for _, m in unique_named_modules(network):
            if isinstance(m, MoLREConv):
                replace_module(network, m, m.merged())
