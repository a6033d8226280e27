"""The one optimisation step shared by every nnpre task (pretraining, segmentation, detection).

nnU-Net's ``nnUNetTrainer.train_step`` does: ``zero_grad`` → forward under CUDA autocast → backward through
the AMP grad scaler → unscale → clip the gradient norm at 12 → step. nnssl and nnDetection use the same
sequence and clip value. This module holds that sequence once; the task only supplies the loss.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Dict, Optional

import torch
from torch import Tensor, nn

from nnpre.errors import fail

#: Gradient-norm clip of nnU-Net (``nnUNetTrainer.train_step``), nnssl and nnDetection.
GRAD_CLIP = 12.0


def autocast_for(device: torch.device):
    """CUDA autocast (mixed precision) on GPU, a no-op context on CPU (as nnU-Net)."""
    if device.type == "cuda":
        return torch.autocast(device.type, enabled=True)
    return contextlib.nullcontext()


def train_step(network: nn.Module, optimizer: torch.optim.Optimizer, compute_losses: Callable[[], Dict[str, Tensor]],
               device: torch.device, grad_scaler: Optional[torch.amp.GradScaler] = None,
               grad_clip: float = GRAD_CLIP, where: str = "") -> Dict[str, float]:
    """One optimisation step.

    Args:
        network: the (possibly DDP/compiled) model; its parameters are clipped.
        optimizer: the stage's optimizer (only trainable parameters).
        compute_losses: runs the forward pass and returns ``{"loss": scalar tensor, <part>: scalar, ...}``;
            called under autocast.
        device: where the batch lives (decides autocast).
        grad_scaler: AMP scaler (CUDA only) or None.
        grad_clip: maximum gradient 2-norm (default 12, nnU-Net).
        where: text naming the step in the non-finite-loss error (e.g. ``"epoch 3, cases [...]"``).

    Returns:
        ``{"loss": float, <part>: float}`` (detached Python floats).

    Raises:
        NnPreError: the loss is NaN or infinite (one line naming ``where`` and the usual fixes).
    """
    optimizer.zero_grad(set_to_none=True)
    with autocast_for(device):
        losses = compute_losses()
    loss = losses["loss"]
    if not torch.isfinite(loss):
        fail(f"non-finite training loss ({where}); check the images for NaNs/constant volumes or lower the "
             f"learning rate")
    if grad_scaler is not None:
        grad_scaler.scale(loss).backward()
        grad_scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(network.parameters(), grad_clip)
        grad_scaler.step(optimizer)
        grad_scaler.update()
    else:
        loss.backward()
        torch.nn.utils.clip_grad_norm_(network.parameters(), grad_clip)
        optimizer.step()
    return {k: float(v.detach().float().cpu()) if torch.is_tensor(v) else float(v) for k, v in losses.items()}
