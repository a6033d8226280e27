"""The pretext-task contract shared by MAE, Model Genesis and diffusion pretraining.

A pretext task turns a batch of clean, z-scored patches into a :class:`PretextSample` (network input,
regression target, optional loss mask, extras), says how many channels the network needs, computes the
loss and, if it needs them, builds extra trainable modules (e.g. a timestep embedding) that live *outside*
the network's own ``encoder.*``/``decoder.*`` keys. Tasks are plain torch/numpy objects: they import no
trainer and work outside nnU-Net (see ``examples/`` and the tests).

Randomness: ``corrupt`` draws everything from the ``torch.Generator`` it is given (tasks that are faster in
numpy derive a ``numpy.random.Generator`` from it with :func:`numpy_rng`), so a batch is a pure function of
(image, generator state, context). No global RNG is touched.
"""
from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from nnpre.architecture import unwrap
from nnpre.errors import fail

#: attribute under which the trainer registers ``build_conditioning``'s module on the network
CONDITIONING_ATTR = "nnpre_conditioning"


@dataclass
class PretextSample:
    """One corrupted batch.

    Attributes:
        input: (B, C_in, X, Y, Z) float32 network input after corruption; C_in = C + extra channels.
        target: (B, C_out, X, Y, Z) float32 regression target.
        loss_mask: (B, 1, X, Y, Z) float32 in {0, 1}, 1 = voxel counts in the loss; ``None`` = all voxels.
        extras: task-specific tensors, e.g. ``{"t": (B,) long}`` timesteps for diffusion.
    """

    input: Tensor
    target: Tensor
    loss_mask: Optional[Tensor] = None
    extras: Dict[str, Any] = field(default_factory=dict)


class PretextTask(ABC):
    """Base class of all pretext tasks (see module docstring).

    Subclasses set ``name`` (via :func:`nnpre_trainers.pretext.registry.register_pretext`) and
    ``config_class`` (a frozen dataclass whose field defaults are the documented, sourced defaults) and
    implement :meth:`corrupt`. ``PretextTask(**overrides)`` validates the overrides against the dataclass.

    Attributes:
        config: the resolved config dataclass instance.
    """

    name: ClassVar[str] = ""
    config_class: ClassVar[type]

    def __init__(self, **config: Any) -> None:
        self.config = make_config(self.config_class, config, self.name or type(self).__name__)

    # -- shapes ----------------------------------------------------------------------------------------
    def num_output_channels(self, num_input_channels: int) -> int:
        """Network output channels for ``num_input_channels`` image channels (default: one per channel)."""
        return int(num_input_channels)

    def num_extra_input_channels(self) -> int:
        """Channels the task appends to the image at the network input (default 0)."""
        return 0

    def loader_patch_size(self, patch_size: Sequence[int]) -> List[int]:
        """(X, Y, Z) region the data loader crops per sample for a plans patch of ``patch_size`` (default: the
        patch itself; VoCo asks for a larger region that it splits into crops)."""
        return [int(p) for p in patch_size]

    def network_patch_size(self, patch_size: Sequence[int]) -> List[int]:
        """(X, Y, Z) patch the network actually sees (default: ``loader_patch_size``; VoCo: its crop size).
        What the adaptation plan should record as the pretraining patch size (nnssl ``VoCoTrainer`` does)."""
        return self.loader_patch_size(patch_size)

    def loader_augmentation(self) -> str:
        """Spatial augmentation the loader applies to each clean patch before :meth:`corrupt`.

        ``"mirror"`` (default): flip each axis with p 0.5; ``"none"``; ``"nnssl"``: nnssl's MAE augmentation
        (rotation ±30° per axis p 0.2, isotropic scaling 0.7-1.4 p 0.2, then mirroring; see
        :mod:`nnpre_trainers.pretext_data`). Tasks whose config has an ``augmentation`` field return it.
        """
        return str(getattr(self.config, "augmentation", "mirror"))

    # -- data ------------------------------------------------------------------------------------------
    @abstractmethod
    def corrupt(self, image: Tensor, generator: torch.Generator,
                context: Optional[dict] = None) -> PretextSample:
        """Corrupt a batch.

        Args:
            image: (B, C, X, Y, Z) float32 z-scored patches.
            generator: the only source of randomness.
            context: optional ``{"patch_bbox": (B, 3, 2) long start/stop voxel of each patch in its volume,
                "volume_shape": (B, 3) long}``.

        Returns:
            the :class:`PretextSample` for this batch.
        """

    # -- model -----------------------------------------------------------------------------------------
    def loss(self, prediction: Tensor, sample: PretextSample) -> Tensor:
        """Scalar loss; default: MSE over the voxels of ``sample.loss_mask`` (all voxels if ``None``)."""
        return masked_mse(prediction, sample.target, sample.loss_mask)

    def build_conditioning(self, network: nn.Module) -> Optional[nn.Module]:
        """Extra trainable module (registered by the trainer as ``network.nnpre_conditioning``) or None."""
        return None

    def forward(self, network: nn.Module, sample: PretextSample) -> Tensor:
        """Run the network on ``sample``; default ``network(sample.input)``. Returns (B, C_out, X, Y, Z)."""
        return network(sample.input)

    # -- pictures --------------------------------------------------------------------------------------
    def preview(self, sample: PretextSample, prediction: Tensor) -> Dict[str, Tensor]:
        """Named (X, Y, Z) CPU float volumes of sample 0, channel 0, for PNG previews.

        Default: ``corrupted`` = network input, ``prediction``, ``target``; subclasses add ``input``
        (the clean patch) where they can.
        """
        return {"corrupted": _vol(sample.input), "prediction": _vol(prediction), "target": _vol(sample.target)}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"


# ----------------------------------------------------------------------------------------------------------
# helpers shared by the tasks
# ----------------------------------------------------------------------------------------------------------
def make_config(config_class: type, overrides: dict, task_name: str):
    """Instantiate ``config_class`` with ``overrides``; unknown keys raise a one-line :class:`NnPreError`.

    Lists given for tuple fields (e.g. from JSON) are converted to tuples.
    """
    names = [f.name for f in dataclasses.fields(config_class)]
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        fail(f"unknown option(s) {unknown} for pretext task '{task_name}'; valid options: {names}")
    fixed = {k: (tuple(v) if isinstance(v, list) else v) for k, v in overrides.items()}
    try:
        return config_class(**fixed)
    except (TypeError, ValueError) as e:
        fail(f"invalid option for pretext task '{task_name}': {e}")


def check_image(image: Tensor, task_name: str) -> None:
    """Fail with a one-line error unless ``image`` is a floating (B, C, X, Y, Z) tensor."""
    if not torch.is_tensor(image) or image.ndim != 5 or not image.is_floating_point():
        shape = tuple(image.shape) if torch.is_tensor(image) else type(image).__name__
        fail(f"pretext task '{task_name}' expects a float tensor of shape (B, C, X, Y, Z), got {shape}; "
             f"pass a batch of 3-D patches with a channel axis")


def masked_mse(prediction: Tensor, target: Tensor, loss_mask: Optional[Tensor] = None) -> Tensor:
    """Mean squared error, optionally restricted to a voxel mask.

    Args:
        prediction, target: (B, C, X, Y, Z).
        loss_mask: (B, 1, X, Y, Z) in {0, 1} or None (= plain ``F.mse_loss``, i.e. the whole volume).

    Returns:
        scalar ``sum((p - t)^2 * m) / (C * sum(m))``: the mean over masked voxels and channels. For C = 1
        this equals nnssl's ``MAEMSELoss`` (``sum((out - x)^2 * (1 - mask)) / sum(1 - mask)``). An empty mask
        gives 0 (with a gradient of 0) instead of NaN.
    """
    if prediction.shape != target.shape:
        fail(f"prediction shape {tuple(prediction.shape)} does not match target shape {tuple(target.shape)}; "
             f"build the network with task.num_output_channels(C) outputs")
    if loss_mask is None:
        return torch.mean((prediction - target) ** 2)
    sq = (prediction - target) ** 2 * loss_mask
    denom = loss_mask.sum() * prediction.shape[1]
    return sq.sum() / denom.clamp_min(1.0)


def numpy_rng(generator: torch.Generator) -> np.random.Generator:
    """A ``numpy.random.Generator`` seeded from (and advancing) ``generator``: pure, no global state.

    Numpy's PCG64 draws bulk uniforms/normals several times faster than torch's CPU generator, which
    matters in data-loader workers.
    """
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator).item())
    return np.random.default_rng(seed)


#: Strip DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers (one implementation for all of nnpre).
unwrap_network = unwrap


def attach_conditioning(network: nn.Module, task: PretextTask) -> Optional[nn.Module]:
    """Build the task's conditioning module and register it as ``network.nnpre_conditioning``.

    What the pretraining trainer does; handy outside nnU-Net. Returns the module (or None).
    """
    module = task.build_conditioning(unwrap_network(network))
    if module is not None:
        setattr(unwrap_network(network), CONDITIONING_ATTR, module)
    return module


def _vol(t: Tensor) -> Tensor:
    """(B, C, X, Y, Z) -> detached CPU float (X, Y, Z) of sample 0, channel 0."""
    return t[0, 0].detach().float().cpu()
