"""The one optimisation step shared by every nnpre task (pretraining, segmentation, detection).

nnU-Net's ``nnUNetTrainer.train_step`` does: ``zero_grad`` → forward under CUDA autocast → backward through
the AMP grad scaler → unscale → clip the gradient norm at 12 → step. nnssl and nnDetection use the same
sequence and clip value. This module holds that sequence once; the task only supplies the loss.

Mixed precision is decided here only (:func:`amp_dtype`): ``"auto"`` is nnU-Net's behaviour (autocast with
``torch.autocast``'s CUDA default float16 + a ``GradScaler`` on CUDA, full fp32 on CPU); ``"fp16"`` (CUDA only,
with the scaler), ``"bf16"`` (CUDA or CPU, no scaler: bfloat16 has float32's exponent range) and ``"off"`` choose
explicitly. Parameters, optimizer state and gradients stay float32 in every mode (autocast only casts op inputs).

With fp16 the ``GradScaler`` skips a step whose gradients are not finite. bf16 has no scaler, so
:func:`train_step` does the same check itself under bf16: a step whose gradient norm is NaN/inf is skipped with a
``RuntimeWarning`` instead of writing NaN into the weights. Measured cause on CPU: torch 2.14.1's bf16 ``Conv3d``
backward (oneDNN 3.12) sometimes returns a NaN weight gradient from finite inputs on tiny maps (e.g. 189 of 13,255
calls on a (16, 64, 2, 2, 4) input with 2 threads, none in fp32). fp32 and fp16 paths are unchanged.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from typing import Callable, Dict, Optional, Union

import torch
from torch import Tensor, nn

from nnpre.errors import fail

#: Gradient-norm clip of nnU-Net (``nnUNetTrainer.train_step``), nnssl and nnDetection.
GRAD_CLIP = 12.0


#: ``nnPre_train --amp`` choices (see the module doc).
AMP_CHOICES = ("auto", "off", "fp16", "bf16")
_AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}

#: What :func:`autocast_for` / :func:`train_step` accept: an ``AMP_CHOICES`` name, a dtype, or None (= off).
Amp = Union[str, torch.dtype, None]


def amp_dtype(amp: Amp, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype of mode ``amp`` on ``device`` (None = no autocast, plain fp32).

    ``"auto"`` → on CUDA ``torch.autocast("cuda")``'s default dtype (float16 unless changed process-wide with
    ``torch.set_autocast_dtype``, exactly as nnU-Net's ``train_step``), None on CPU/MPS (nnU-Net autocasts on
    CUDA only); ``"off"`` / None → None; ``"fp16"`` → float16 (CUDA only: a one-line
    error elsewhere); ``"bf16"`` → bfloat16 (CUDA or CPU); a ``torch.dtype`` is returned as given.
    """
    device = torch.device(device)
    if amp is None or isinstance(amp, torch.dtype):
        return amp
    if amp not in AMP_CHOICES:
        fail(f"unknown mixed-precision mode '{amp}'; choose one of {', '.join(AMP_CHOICES)}")
    if amp == "auto":
        return torch.get_autocast_dtype("cuda") if device.type == "cuda" else None
    if amp == "fp16" and device.type != "cuda":
        fail(f"--amp fp16 needs a CUDA device (this run is on {device.type}); use --amp bf16 or --amp off")
    return _AMP_DTYPES.get(amp)


def autocast_for(device: torch.device, amp: Amp = "auto"):
    """Autocast context of mode ``amp`` on ``device`` (:func:`amp_dtype`); a no-op context when it is off.

    The default ``"auto"`` is nnU-Net's: float16 autocast on CUDA, nothing on CPU."""
    device = torch.device(device)
    dtype = amp_dtype(amp, device)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype, enabled=True)


def make_grad_scaler(device: torch.device, amp: Amp = "auto") -> Optional[torch.amp.GradScaler]:
    """nnU-Net's loss scaler where it is needed: float16 autocast on CUDA; None otherwise (bf16, fp32, CPU)."""
    device = torch.device(device)
    if device.type == "cuda" and amp_dtype(amp, device) == torch.float16:
        return torch.amp.GradScaler("cuda")
    return None


def train_step(network: nn.Module, optimizer: torch.optim.Optimizer, compute_losses: Callable[[], Dict[str, Tensor]],
               device: torch.device, grad_scaler: Optional[torch.amp.GradScaler] = None,
               grad_clip: Optional[float] = GRAD_CLIP, where: str = "", amp: Amp = "auto") -> Dict[str, float]:
    """One optimisation step.

    Args:
        network: the (possibly DDP/compiled) model; its parameters are clipped.
        optimizer: the stage's optimizer (only trainable parameters).
        compute_losses: runs the forward pass and returns ``{"loss": scalar tensor, <part>: scalar, ...}``;
            called under autocast.
        device: where the batch lives (with ``amp``, decides autocast).
        grad_scaler: AMP scaler (fp16 on CUDA, :func:`make_grad_scaler`) or None.
        grad_clip: maximum gradient 2-norm (default 12, nnU-Net); None = no clipping (nnDetection).
        where: text naming the step in the non-finite-loss error (e.g. ``"epoch 3, cases [...]"``).
        amp: mixed-precision mode (:func:`amp_dtype`; default ``"auto"``, nnU-Net's: fp16 on CUDA, off on CPU).

    Returns:
        ``{"loss": float, <part>: float}`` (detached Python floats).

    Raises:
        NnPreError: the loss is NaN or infinite (one line naming ``where`` and the usual fixes).
    """
    optimizer.zero_grad(set_to_none=True)
    with autocast_for(device, amp):
        losses = compute_losses()
    loss = losses["loss"]
    if not torch.isfinite(loss):
        fail(f"non-finite training loss ({where}); check the images for NaNs/constant volumes or lower the "
             f"learning rate")
    if grad_scaler is not None:
        grad_scaler.scale(loss).backward()
        grad_scaler.unscale_(optimizer)
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(network.parameters(), grad_clip)
        grad_scaler.step(optimizer)
        grad_scaler.update()
    else:
        loss.backward()
        if amp_dtype(amp, device) == torch.bfloat16:
            # bf16 has no loss scaler to skip a bad step; do what the scaler does for fp16 (see module doc).
            norm = torch.nn.utils.clip_grad_norm_(network.parameters(), math.inf if grad_clip is None else grad_clip)
            if not torch.isfinite(norm):
                optimizer.zero_grad(set_to_none=True)
                warnings.warn(f"bf16: non-finite gradient, optimizer step skipped ({where})", RuntimeWarning,
                              stacklevel=2)
                return _floats(losses)
        elif grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(network.parameters(), grad_clip)
        optimizer.step()
    return _floats(losses)


def _floats(losses: Dict[str, Tensor]) -> Dict[str, float]:
    return {k: float(v.detach().float().cpu()) if torch.is_tensor(v) else float(v) for k, v in losses.items()}
