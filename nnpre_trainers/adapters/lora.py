"""``lora``: low-rank updates on the encoder's convolutions (LoRA, Hu et al. 2021, arXiv 2106.09685).

Each selected convolution ``W`` (``nn.Conv3d``; Conv1d/2d work the same way) is wrapped as

    y = W * x + (alpha / rank) · B * (A * x)

with ``A`` a convolution with ``W``'s kernel, stride, padding and dilation mapping C_in → rank channels and
``B`` a 1×1×1 convolution rank → C_out, both without bias (the layout of Hugging Face ``peft``'s Conv3d LoRA,
``peft/tuners/lora/layer.py``). ``A`` starts as PyTorch's default conv init (Kaiming-uniform, a = √5), ``B``
at zero, so the adapted network starts exactly at the pretrained one. Defaults rank 8, alpha 8 are
``peft.LoraConfig``'s.

What trains: the ``A`` / ``B`` tensors of the wrapped encoder convolutions, plus everything outside the
encoder (decoder, segmentation / detection heads). Frozen and bit-identical: every pre-existing ``encoder.*``
tensor (conv weights and biases, norm affines, the stem).

Merging: ``W ← W + (alpha / rank) · reshape(B_(C_out×r) · A_(r×C_in·k³))`` is exact (B is 1×1×1 and A has
W's geometry, so ``B * (A * x)`` is one convolution with that weight); the wrapper is then replaced by the
plain convolution at every place it is referenced.
"""
from __future__ import annotations

import math
import re
from typing import Any, Dict, List, Tuple

import torch
from torch import nn

from nnpre.errors import fail
from nnpre_trainers.adapters.base import ENCODER_PREFIX, Adapter, replace_module, unique_named_modules, unwrap
from nnpre_trainers.adapters.registry import register_adapter

#: Default layer pattern: every convolution inside the transferred encoder (stem included).
DEFAULT_LAYERS = r"^encoder\."
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def low_rank_pair(base: nn.Module, rank: int) -> Tuple[nn.Module, nn.Module]:
    """(A, B) for ``base``: A has base's kernel / stride / padding / dilation (C_in → rank), B is 1×…×1
    (rank → C_out); no biases; A default-initialised, B zero."""
    if base.groups != 1 or base.padding_mode != "zeros":
        fail(f"low-rank adapters need plain convolutions (groups=1, zero padding); {base} is not one")
    conv = type(base)
    a = conv(base.in_channels, rank, base.kernel_size, base.stride, base.padding, base.dilation, bias=False)
    b = conv(rank, base.out_channels, 1, bias=False)
    a = a.to(device=base.weight.device, dtype=base.weight.dtype)
    b = b.to(device=base.weight.device, dtype=base.weight.dtype)
    nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
    nn.init.zeros_(b.weight)
    return a, b


def low_rank_delta(a_weight: torch.Tensor, b_weight: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Weight of the convolution ``B * (A * ·)``: (C_out, r) @ (r, C_in·k…) reshaped to ``shape``."""
    out_c, r = b_weight.shape[0], b_weight.shape[1]
    return (b_weight.reshape(out_c, r) @ a_weight.reshape(r, -1)).reshape(shape)


class LoRAConv(nn.Module):
    """A convolution plus a LoRA branch (see the module doc). Input/output shapes are ``base``'s:
    (B, C_in, X, Y, Z) → (B, C_out, X', Y', Z')."""

    def __init__(self, base: nn.Module, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.rank, self.alpha = int(rank), float(alpha)
        self.scaling = self.alpha / self.rank
        self.lora_A, self.lora_B = low_rank_pair(base, self.rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scaling * self.lora_B(self.lora_A(x))

    @torch.no_grad()
    def merged(self) -> nn.Module:
        """``base`` with the update folded into its weight (in place; returns ``base``)."""
        w = self.base.weight
        w.add_(self.scaling * low_rank_delta(self.lora_A.weight, self.lora_B.weight, w.shape).to(w.dtype))
        return self.base


def select_convs(network: nn.Module, pattern: str) -> List[Tuple[str, nn.Module]]:
    """(canonical name, conv) of every plain convolution in the encoder whose name matches ``pattern``
    (``re.search``). Stops with a one-line error when the pattern is invalid, matches outside the encoder,
    or matches nothing."""
    try:
        rx = re.compile(pattern)
    except re.error as e:
        fail(f"--adapter-layers {pattern!r} is not a valid regular expression ({e})")
    hits = [(n, m) for n, m in unique_named_modules(network)
            if type(m) in _CONVS and rx.search(n)]
    outside = [n for n, _ in hits if not n.startswith(ENCODER_PREFIX)]
    if outside:
        fail(f"--adapter-layers {pattern!r} matches layers outside the encoder ({outside[0]}, ...); "
             f"adapters adapt the pretrained encoder only, e.g. '^encoder\\.stages\\.[3-5]'")
    if not hits:
        fail(f"--adapter-layers {pattern!r} matches no convolution of the encoder; names look like "
             f"'encoder.stages.0.0.convs.0.conv' (default {DEFAULT_LAYERS!r})")
    return hits


class _LowRankAdapter(Adapter):
    """Shared by LoRA and MoLRE: wrap selected encoder convs, freeze the rest of the encoder."""

    wrapper_type: type = LoRAConv
    added_markers: Tuple[str, ...] = (".lora_A.", ".lora_B.")

    def __init__(self, rank: int, alpha: float, layers: str):
        if int(rank) < 1:
            fail(f"--lora-rank must be >= 1, got {rank}")
        if float(alpha) <= 0:
            fail(f"--lora-alpha must be > 0, got {alpha}")
        self.rank, self.alpha, self.layers = int(rank), float(alpha), str(layers)

    def options(self) -> Dict[str, Any]:
        return {"rank": self.rank, "alpha": self.alpha, "layers": self.layers}

    def is_added(self, name: str) -> bool:
        return any(m in "." + name for m in self.added_markers)

    def is_trainable(self, name: str) -> bool:
        return not name.startswith(ENCODER_PREFIX) or self.is_added(name)

    def wrap(self, conv: nn.Module) -> nn.Module:
        raise NotImplementedError

    def apply(self, network: nn.Module) -> None:
        if any(isinstance(m, self.wrapper_type) for m in unwrap(network).modules()):
            fail(f"the network already carries {self.name} adapters; apply once per network")
        for _, conv in select_convs(network, self.layers):
            replace_module(network, conv, self.wrap(conv))
        self.set_requires_grad(network)

    def merge(self, network: nn.Module) -> None:
        for _, m in unique_named_modules(network):
            if isinstance(m, self.wrapper_type):
                replace_module(network, m, m.merged())


@register_adapter("lora")
class LoRAAdapter(_LowRankAdapter):
    """LoRA on the encoder's convolutions.

    Trains: the LoRA ``A`` / ``B`` tensors of every encoder conv matching ``layers`` + all non-encoder
    parameters (decoder, heads). Frozen (bit-identical): all original ``encoder.*`` tensors.

    Args:
        rank: LoRA rank r (peft default 8).
        alpha: scaling numerator, update scaled by alpha / r (peft default 8).
        layers: regular expression (``re.search``) on canonical module names selecting the convolutions to
            adapt; default every encoder conv (``^encoder\\.``).
    """

    wrapper_type = LoRAConv

    def __init__(self, rank: int = 8, alpha: float = 8.0, layers: str = DEFAULT_LAYERS):
        super().__init__(rank, alpha, layers)

    def wrap(self, conv: nn.Module) -> nn.Module:
        return LoRAConv(conv, self.rank, self.alpha)
