"""nnDetection's Retina U-Net training recipe as data (``nndet/conf/train/v001.yaml``), and the stage schedule that
trains it (:meth:`DetectionRecipe.schedule`, applied by :class:`~nnpre_trainers.stage_controller.StageController`).

Sources (nnDetection, ``MIC-DKFZ/nnDetection``):

* ``nndet/conf/train/v001.yaml``: ``initial_lr`` 0.01, ``sgd_momentum`` 0.9, ``sgd_nesterov`` True,
  ``weight_decay`` 3e-5, ``warm_iterations`` 4000 from ``warm_lr`` 1e-6, ``poly_gamma`` 0.9,
  ``max_num_epochs`` 50 x ``num_train_batches_per_epoch`` 2500, ``num_val_batches_per_epoch`` 100,
  ``swa_epochs`` 10, ``oversample_foreground_percent`` 0.5, ``monitor_key``
  ``mAP_IoU_0.10_0.50_0.05_MaxDet_100`` (mode max) for the best checkpoint, mixed precision;
* ``nndet/training/learning_rate.py``: ``LinearWarmupPolyLR`` (torch scheduler; optimizer step i sees
  ``_step_count = i + 1``: warm-up ``warm_lr + (lr - warm_lr) * (i + 1) / W`` for ``i < W``, then
  ``lr * (1 - k / (T - W)) ** 0.9`` with ``k = i + 1 - W`` clamped at ``T - W - 1``) and ``CycleLinear``
  (``cyclic_linear_lr``: ``initial + (final - initial) * (1 - c / C)``, c = iteration in the cycle);
* ``nndet/ptmodule/base_module.py`` (``LightningBaseModuleSWA``) + ``nndet/training/swa.py``
  (``SWACycleLinear``): after the 50 epochs, 10 more epochs with the *same* optimizer whose learning rate
  follows a linear cycle per epoch with ``initial`` = lr / 10 and ``final`` = lr / 1000 (so each cycle *rises*
  from lr / 1000 towards lr / 10; reproduced as written); PyTorch Lightning's ``StochasticWeightAveraging``
  averages the parameters with equal weights at the start of each SWA epoch and copies the average into the
  model when training ends: the final model is the average;
* ``nndet/training/optimizer/utils.py`` (``get_params_no_wd_on_norm``): weight decay 0 for parameters of
  normalisation layers; biases of convolutions keep it;
* nnDetection trains without gradient clipping (Lightning's default ``gradient_clip_val=0``); nnU-Net clips at 12.

With a pretrained encoder (which nnDetection does not have) the main phase takes the structure of the DKFZ
fine-tuning recipe (nnU-Net master ``pretraining/pretrainedTrainer.py``, :func:`~nnpre_trainers.finetune_schedule.
default_schedule`): the first 5 % train only the decoder and heads (warm-up over its first half from ``warm_lr``,
poly over the second), then the whole network with a new optimizer, re-warmed over 5 % (in place of the recipe's
4000-iteration warm-up, 3.2 % of 125 000), then poly; the SWA epochs follow unchanged. The peak LR stays the
recipe's 1e-2: with momentum 0.9 its effective step ``lr / (1 - momentum)`` = 0.1 equals the DKFZ pretrained
recipe's 1e-3 at momentum 0.99.

A run of another length (``--epochs`` / ``--iterations``) uses :meth:`DetectionRecipe.fitted`: SWA keeps its share
of the epochs (10 of 60) and the warm-up its share of the main phase (3.2 %).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import List, Optional

from nnpre.errors import fail
from nnpre_trainers.finetune_schedule import (
    ALL_GROUPS,
    DKFZ_WARMUP_FRACTION,
    NORM_TYPES,
    FinetuneSchedule,
    LRRule,
    Stage,
)

__all__ = ["NNDET_V001", "NORM_TYPES", "DetectionRecipe", "preset_detector_overrides", "recipe_for_preset"]


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


@dataclass(frozen=True)
class DetectionRecipe:
    """Training recipe constants (defaults: nnDetection v001; see the module docstring for sources).

    Attributes:
        optimizer: ``"sgd"`` (nnDetection) or ``"adamw"`` (CPU presets).
        initial_lr / momentum / nesterov / weight_decay: optimizer (0.01 / 0.9 / True / 3e-5).
        no_weight_decay_on_norm: weight decay 0 on normalisation layers (True).
        warm_iterations / warm_lr: linear warm-up length and start (4000 / 1e-6).
        poly_gamma: exponent of the poly decay (0.9).
        num_epochs / iterations_per_epoch / val_iterations_per_epoch: 50 / 2500 / 100 (``num_epochs`` excludes
            the SWA epochs).
        swa_epochs: extra SWA epochs after ``num_epochs`` (10; 0 = no SWA).
        swa_initial_lr_factor / swa_final_lr_factor: nnDetection's ``cycle_initial_lr`` / ``cycle_final_lr`` as
            fractions of ``initial_lr`` (1/10 and 1/1000; each cycle runs from the final towards the initial one).
        oversample_foreground_percent: fraction of patches forced to contain foreground (0.5; nnU-Net: 0.33).
        monitor_key / monitor_mode: validation metric that selects ``checkpoint_best``
            (``mAP_IoU_0.10_0.50_0.05_MaxDet_100``, max).
        grad_clip: gradient-norm clip (``None``: none, as nnDetection).
        pretrained_decoder_fraction: with a pretrained encoder, the decoder-only first stage and the whole
            network's re-warm-up as a fraction of the main phase (0.05, the DKFZ recipe; see the module doc).
        sweep_checkpoint: checkpoint the post-processing sweep uses (nnDetection: the last one, i.e. the SWA
            average).
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
    pretrained_decoder_fraction: float = DKFZ_WARMUP_FRACTION
    sweep_checkpoint: str = "checkpoint_final.pth"

    def __post_init__(self):
        if self.optimizer not in ("sgd", "adamw"):
            fail(f"detection recipe: optimizer must be 'sgd' or 'adamw', got {self.optimizer!r}")
        if self.monitor_mode not in ("max", "min"):
            fail(f"detection recipe: monitor_mode must be 'max' or 'min', got {self.monitor_mode!r}")
        if self.num_epochs < 1 or self.iterations_per_epoch < 1 or self.swa_epochs < 0 or self.warm_iterations < 0:
            fail("detection recipe: num_epochs and iterations_per_epoch must be >= 1, swa_epochs and "
                 "warm_iterations >= 0")
        if not 0.0 <= self.oversample_foreground_percent <= 1.0:
            fail(f"detection recipe: oversample_foreground_percent must lie in [0, 1], got "
                 f"{self.oversample_foreground_percent}")

    def replace(self, **changes) -> "DetectionRecipe":
        """Copy with fields replaced; unknown names raise a one-line error."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            fail(f"unknown detection recipe field(s) {unknown}; valid: {sorted(known)}")
        return dataclasses.replace(self, **changes)

    # ---------------------------------------------------------------------------------------- length
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

    def fitted(self, epochs: int, iterations_per_epoch: int) -> "DetectionRecipe":
        """This recipe for a run of ``epochs`` epochs (SWA included) of ``iterations_per_epoch`` iterations.

        Unchanged when the length is the recipe's own. Otherwise SWA keeps its share of the epochs
        (``round(epochs * swa_epochs / total_epochs)``, at least 1 when the recipe has SWA and ``epochs >= 2``,
        always leaving >= 1 main epoch) and the warm-up keeps its share of the main phase (nnDetection 4000 of
        125 000 iterations = 3.2 %; shorter than the main phase).
        """
        e, i = int(epochs), int(iterations_per_epoch)
        if e < 1 or i < 1:
            fail(f"a detection run needs >= 1 epoch of >= 1 iteration, got {e} x {i}")
        if (e, i) == (self.total_epochs, self.iterations_per_epoch):
            return self
        swa = 0
        if self.swa_epochs and e >= 2:
            swa = min(e - 1, max(1, _round_half_up(e * self.swa_epochs / self.total_epochs)))
        main = e - swa
        warm = min(_round_half_up(self.warm_iterations * main * i / self.main_iterations), main * i - 1)
        return self.replace(num_epochs=main, iterations_per_epoch=i, swa_epochs=swa, warm_iterations=max(0, warm))

    # ---------------------------------------------------------------------------------------- schedule
    def lr_at(self, iteration: int) -> float:
        """nnDetection's learning rate of optimizer step ``iteration`` (0-based) of a run from scratch, SWA
        included: the reference the schedule (:meth:`schedule`) reproduces. Formulas: see the module doc."""
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

    def schedule(self, pretrained: bool = False) -> FinetuneSchedule:
        """The stages that train this recipe (see the module doc).

        From scratch: ``main`` (whole network; warm-up from ``warm_lr`` over ``warm_iterations``, then poly with
        nnDetection's step convention) and, with SWA, ``swa`` (same optimizer, one LR cycle per epoch, weights
        averaged at every epoch start). Pretrained: ``decoder_warmup`` + ``whole_network`` (the DKFZ structure)
        in place of ``main`` when the 5 % stage has >= 2 iterations, then ``swa``.
        """
        main = self.main_iterations
        poly = dict(exponent=self.poly_gamma, warmup_start_lr=self.warm_lr, step_offset=1)
        d = _round_half_up(self.pretrained_decoder_fraction * main) if pretrained else 0
        if 2 <= d < main:
            stages = [Stage("decoder_warmup", d, ("decoder", "heads", "stem"),
                            LRRule(warmup=max(1, _round_half_up(d / 2)), exponent=self.poly_gamma,
                                   warmup_start_lr=self.warm_lr)),
                      Stage("whole_network", main - d, ALL_GROUPS, LRRule(warmup=d, **poly))]
        else:
            stages = [Stage("main", main, ALL_GROUPS, LRRule(warmup=min(int(self.warm_iterations), main), **poly))]
        if self.swa_epochs:
            stages.append(Stage("swa", None, ALL_GROUPS,
                                LRRule(peak_lr=self.initial_lr * self.swa_initial_lr_factor, decay="cyclic",
                                       cycle_length=self.iterations_per_epoch,
                                       cycle_start_lr=self.initial_lr * self.swa_final_lr_factor),
                                keep_optimizer=True, average_every=self.iterations_per_epoch))
        else:
            stages[-1] = dataclasses.replace(stages[-1], length=None)
        return FinetuneSchedule(stages=tuple(stages), total_iterations=self.total_iterations,
                                base_lr=self.initial_lr, momentum=self.momentum, nesterov=self.nesterov,
                                weight_decay=self.weight_decay, optimizer=self.optimizer,
                                no_weight_decay_on_norm=self.no_weight_decay_on_norm, grad_clip=self.grad_clip)


#: nnDetection v001 (the faithful preset).
NNDET_V001 = DetectionRecipe()


def recipe_for_preset(preset) -> DetectionRecipe:
    """:data:`NNDET_V001` with the fields the preset overrides (:attr:`nnpre.presets.Preset.detection_recipe`;
    ``{}`` for ``gpu``)."""
    return NNDET_V001.replace(**dict(getattr(preset, "detection_recipe", {}) or {}))


def preset_detector_overrides(preset_name: str, n_stages: Optional[int] = None) -> dict:
    """:class:`~nnpre_detection.retina_unet.RetinaUNetConfig` overrides of a preset (``{}`` = nnDetection's).

    ``cpu-tiny``: head towers 4 x the stage-0 width (32, as nnDetection's 128 for 32). Detection levels stay
    nnDetection's rule (``min(max(1, R - 4), 2) .. R - 1``, i.e. strides 2, 4, 8 for cpu-tiny's 4 stages).
    Starting at stride 4 instead (as nnDetection's usual 6-stage networks do) made a detection step 1.1-1.2x a
    segmentation step instead of about 2.5x (``benchmarks/bench_detection_step.py``, before the same-math
    speedups of the heads), but the detector then hardly learned the small cpu-tiny lesions: AP@0.1 0.08 / 0.37
    vs 0.24 / 0.61 (300 iterations, seeds 0 / 1, ``benchmarks/bench_detection_learning.py``) and a top-box IoU of
    0.04 vs 0.8 after 24 iterations on the trainer test's data. With the same-math speedups these options cost
    1.67x a segmentation step. Narrower options measured and not adopted because they learn less (AP@0.1 seeds
    0 / 1 / 2 at 300 iterations, defaults 0.33 / 0.67 / 0.80, segmentation 0.19 / 0.53 / 0.71):
    ``fpn_channels=16, head_channels=16`` 1.13-1.24x, AP 0.06 / 0.57 / 0.78; ``fpn_channels=16, head_convs=1``
    1.14x, AP 0.03 / 0.51 / 0.76; ``head_convs=0`` 1.28x, AP 0.01 / 0.03 / 0.07; ``head_channels=16`` 1.41x,
    AP 0.06 / 0.51 / 0.73. ``n_stages`` is accepted for presets whose options depend on the depth.
    """
    if preset_name == "cpu-tiny":
        return {"head_channels": 32}
    return {}
