"""nnDetection's Retina U-Net training recipe as data (``nndet/conf/train/v001.yaml``), with the schedule pieces a
detection trainer needs: SGD with no weight decay on normalisation layers, linear warm-up then poly decay, and
stochastic weight averaging (SWA) over extra epochs with a cyclic learning rate.

Sources (nnDetection, ``MIC-DKFZ/nnDetection``):

* ``nndet/conf/train/v001.yaml``: ``initial_lr`` 0.01, ``sgd_momentum`` 0.9, ``sgd_nesterov`` True,
  ``weight_decay`` 3e-5, ``warm_iterations`` 4000 from ``warm_lr`` 1e-6, ``poly_gamma`` 0.9,
  ``max_num_epochs`` 50 x ``num_train_batches_per_epoch`` 2500, ``num_val_batches_per_epoch`` 100,
  ``swa_epochs`` 10, ``oversample_foreground_percent`` 0.5, ``monitor_key``
  ``mAP_IoU_0.10_0.50_0.05_MaxDet_100`` (mode max) for the best checkpoint, mixed precision;
* ``nndet/training/learning_rate.py``: ``LinearWarmupPolyLR`` (warm-up ``warm_lr + (lr - warm_lr) * i / W`` for
  ``i < W``, then ``lr * (1 - (i - W) / (T - W)) ** 0.9`` with T = all poly-phase iterations) and ``CycleLinear``;
* ``nndet/ptmodule/base_module.py`` (``LightningBaseModuleSWA``) + ``nndet/training/swa.py``
  (``SWACycleLinear``): after the 50 epochs, 10 more epochs whose learning rate follows a linear cycle per
  epoch between ``lr / 1000`` and ``lr / 10``; the weights at the start of each SWA epoch are averaged with
  equal weights and the average becomes the final model. (``cyclic_linear_lr`` computes
  ``initial + (final - initial) * (1 - t / T)``, i.e. each cycle *rises* from ``lr / 1000`` to ``lr / 10``;
  reproduced as written.)
* ``nndet/training/optimizer/utils.py`` (``get_params_no_wd_on_norm``): weight decay 0 for parameters of
  normalisation layers (batch/instance/group/layer norm); biases of convolutions keep it.
* nnDetection trains without gradient clipping (Lightning's default ``gradient_clip_val=0``); nnU-Net clips at 12.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
from torch import nn

from nnpre.errors import fail

#: Module types whose parameters get no weight decay (nnDetection ``NORM_TYPES``).
NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.InstanceNorm1d, nn.InstanceNorm2d,
              nn.InstanceNorm3d, nn.LayerNorm, nn.GroupNorm, nn.SyncBatchNorm, nn.LocalResponseNorm)


@dataclass(frozen=True)
class DetectionRecipe:
    """Training recipe constants (defaults: nnDetection v001; see the module docstring for sources).

    Attributes:
        optimizer: ``"sgd"`` (nnDetection) or ``"adamw"`` (CPU presets).
        initial_lr / momentum / nesterov / weight_decay: optimizer (0.01 / 0.9 / True / 3e-5).
        no_weight_decay_on_norm: weight decay 0 on normalisation layers (True).
        warm_iterations / warm_lr: linear warm-up length and start (4000 / 1e-6).
        poly_gamma: exponent of the poly decay (0.9).
        num_epochs / iterations_per_epoch / val_iterations_per_epoch: 50 / 2500 / 100.
        swa_epochs: extra SWA epochs after ``num_epochs`` (10; 0 = no SWA).
        swa_initial_lr_factor / swa_final_lr_factor: the cycle's lr ends as fractions of ``initial_lr``
            (1/10 and 1/1000).
        oversample_foreground_percent: fraction of patches forced to contain foreground (0.5; nnU-Net: 0.33).
        monitor_key / monitor_mode: validation metric that selects ``checkpoint_best``
            (``mAP_IoU_0.10_0.50_0.05_MaxDet_100``, max).
        grad_clip: gradient-norm clip (``None``: none, as nnDetection).
        sweep_checkpoint: checkpoint the post-processing sweep uses (nnDetection: the last one).
    """

    optimizer: str = "sgd"
    initial_lr: float = 1e-2
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 3e-5
    no_weight_decay_on_norm: bool = True
    warm_iterations: int = 4000
    warm_lr: float = 1e-6
    poly_gamma: float = 0.9
    num_epochs: int = 50
    iterations_per_epoch: int = 2500
    val_iterations_per_epoch: int = 100
    swa_epochs: int = 10
    swa_initial_lr_factor: float = 0.1
    swa_final_lr_factor: float = 1e-3
    oversample_foreground_percent: float = 0.5
    monitor_key: str = "mAP_IoU_0.10_0.50_0.05_MaxDet_100"
    monitor_mode: str = "max"
    grad_clip: Optional[float] = None
    sweep_checkpoint: str = "checkpoint_final.pth"

    def __post_init__(self):
        if self.optimizer not in ("sgd", "adamw"):
            fail(f"detection recipe: optimizer must be 'sgd' or 'adamw', got {self.optimizer!r}")
        if self.monitor_mode not in ("max", "min"):
            fail(f"detection recipe: monitor_mode must be 'max' or 'min', got {self.monitor_mode!r}")
        if self.num_epochs < 1 or self.iterations_per_epoch < 1 or self.swa_epochs < 0:
            fail("detection recipe: num_epochs and iterations_per_epoch must be >= 1 and swa_epochs >= 0")

    def replace(self, **changes) -> "DetectionRecipe":
        """Copy with fields replaced; unknown names raise a one-line error."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            fail(f"unknown detection recipe field(s) {unknown}; valid: {sorted(known)}")
        return dataclasses.replace(self, **changes)

    # ---------------------------------------------------------------------------------------- schedule
    @property
    def main_iterations(self) -> int:
        """Iterations of warm-up + poly decay (``num_epochs * iterations_per_epoch``)."""
        return self.num_epochs * self.iterations_per_epoch

    @property
    def total_epochs(self) -> int:
        return self.num_epochs + self.swa_epochs

    @property
    def total_iterations(self) -> int:
        return self.total_epochs * self.iterations_per_epoch

    def lr_at(self, iteration: int) -> float:
        """Learning rate of optimizer step ``iteration`` (0-based) over the whole run including SWA.

        Warm-up (``i < W``): ``warm_lr + (lr - warm_lr) * (i + 1) / W`` (a torch scheduler steps once when it is
        built, so optimizer step i sees the scheduler's step count i + 1); poly: ``lr * (1 - (i + 1 - W) /
        (T - W)) ** gamma`` clamped at the last poly step; SWA epoch iterations: the linear cycle.
        """
        i = int(iteration)
        if i < 0:
            fail(f"iteration must be >= 0, got {iteration}")
        w, t = int(self.warm_iterations), self.main_iterations
        if i >= t:  # SWA phase: one cycle per epoch
            c = (i - t) % self.iterations_per_epoch
            lo = self.initial_lr * self.swa_final_lr_factor
            hi = self.initial_lr * self.swa_initial_lr_factor
            return hi + (lo - hi) * (1.0 - c / float(self.iterations_per_epoch))
        step = i + 1  # torch schedulers step once at construction: optimizer step i sees _step_count = i + 1
        if i < w:
            return self.warm_lr + (self.initial_lr - self.warm_lr) * step / float(w)
        poly_iters = max(1, t - w)
        k = min(step - w, poly_iters - 1)
        return self.initial_lr * (1.0 - k / float(poly_iters)) ** self.poly_gamma

    def swa_update_epochs(self) -> List[int]:
        """Epochs (0-based) at whose *start* the weights enter the SWA average (``num_epochs .. total - 1``)."""
        return list(range(self.num_epochs, self.total_epochs))

    # --------------------------------------------------------------------------------------- optimizer
    def param_groups(self, model: nn.Module) -> List[Dict]:
        """Parameter groups: weight decay on everything except normalisation layers (if enabled)."""
        if not self.no_weight_decay_on_norm:
            return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": self.weight_decay}]
        norm_ids = {id(p) for m in model.modules() if isinstance(m, NORM_TYPES) for p in m.parameters(recurse=False)}
        decay = [p for p in model.parameters() if p.requires_grad and id(p) not in norm_ids]
        no_decay = [p for p in model.parameters() if p.requires_grad and id(p) in norm_ids]
        return [{"params": decay, "weight_decay": self.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    def make_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """SGD (momentum, Nesterov) or AdamW over :meth:`param_groups`, at ``lr_at(0)``."""
        groups = self.param_groups(model)
        if self.optimizer == "sgd":
            return torch.optim.SGD(groups, lr=self.lr_at(0), momentum=self.momentum, nesterov=self.nesterov,
                                   weight_decay=self.weight_decay)
        return torch.optim.AdamW(groups, lr=self.lr_at(0), weight_decay=self.weight_decay)

    def set_lr(self, optimizer: torch.optim.Optimizer, iteration: int) -> float:
        lr = self.lr_at(iteration)
        for g in optimizer.param_groups:
            g["lr"] = lr
        return lr

    def is_better(self, value: float, best: Optional[float]) -> bool:
        """Whether a validation ``value`` of ``monitor_key`` beats ``best`` (NaN never does)."""
        if value != value:  # NaN
            return False
        if best is None or best != best:
            return True
        return value > best if self.monitor_mode == "max" else value < best


class SWAAverager:
    """Equal-weight running average of a model's parameters and buffers (``torch.optim.swa_utils`` semantics
    for the parameters; nnDetection keeps no batch-norm update, nor is one needed with instance norm).

    Usage: ``avg = SWAAverager(model)`` once, ``avg.update(model)`` at the start of each SWA epoch,
    ``avg.copy_to(model)`` at the end of training.
    """

    def __init__(self, model: nn.Module):
        self.n = 0
        self.state = {k: v.detach().clone().float() if v.is_floating_point() else v.detach().clone()
                      for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.n += 1
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                self.state[k].add_((v.detach().float() - self.state[k]) / self.n)
            else:
                self.state[k].copy_(v)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        if self.n == 0:
            fail("SWA: no weights were averaged (update() was never called); check swa_epochs and the epoch count")
        sd = model.state_dict()
        model.load_state_dict({k: self.state[k].to(dtype=sd[k].dtype, device=sd[k].device) for k in sd})


#: nnDetection v001 (the faithful preset).
NNDET_V001 = DetectionRecipe()


def preset_detector_overrides(preset_name: str, n_stages: Optional[int] = None) -> dict:
    """:class:`~nnpre_detection.retina_unet.RetinaUNetConfig` overrides of a preset (``{}`` = nnDetection's).

    ``cpu-tiny``: head towers 4 x the stage-0 width (32, as nnDetection's 128 for 32). Detection levels stay
    nnDetection's rule (``min(max(1, R - 4), 2) .. R - 1``, i.e. strides 2, 4, 8 for cpu-tiny's 4 stages).
    Starting at stride 4 instead (as nnDetection's usual 6-stage networks do) made a detection step 1.1-1.2x a
    segmentation step instead of about 2.5x (``benchmarks/bench_detection_step.py``), but the detector then
    hardly learned the small cpu-tiny lesions: AP@0.1 0.08 / 0.37 vs 0.24 / 0.61 (300 iterations, seeds 0 / 1,
    ``benchmarks/bench_detection_learning.py``) and a top-box IoU of 0.04 vs 0.8 after 24 iterations on the
    trainer test's data. ``n_stages`` is accepted for presets whose options depend on the depth.
    """
    if preset_name == "cpu-tiny":
        return {"head_channels": 32}
    return {}
