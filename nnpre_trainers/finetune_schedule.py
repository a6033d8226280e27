"""The fine-tuning schedule as data: stages, the parameter groups they train, and their LR rules.

Default (:func:`default_schedule`, the DKFZ recipe; nnU-Net master
``nnunetv2/training/nnUNetTrainer/pretraining/pretrainedTrainer.py``
``PretrainedTrainer`` and ``PretrainedTrainer_sawtooth``; Eckstein et al., arXiv 2509.15947):

========  ===========================  ===============================================  ======================
stage     iterations                   trains                                           LR (peak 1e-3)
========  ===========================  ===============================================  ======================
warmup    first 5 % of all iterations  decoder + seg heads (+ the stem if remapped)     linear warm-up over the
                                                                                        first half, poly decay
                                                                                        over the second half
finetune  the remaining 95 %           the whole network                                linear warm-up over 5 %
                                                                                        of all iterations, then
                                                                                        poly decay (exp. 0.9)
========  ===========================  ===============================================  ======================

SGD, momentum 0.99, Nesterov, weight decay 3e-5 (nnU-Net defaults). From scratch: one stage, the whole
network, lr 1e-2, poly decay from the first iteration (nnU-Net's default schedule).

Everything is per **iteration** (nnU-Net steps its LR per epoch; 5 % of 1000 epochs × 250 iterations
is the same 12 500 iterations). Linear warm-up over W iterations is ``lr(t) = peak · (t + 1) / W``
(nnU-Net ``Lin_incr_LRScheduler``); poly decay after an offset W in a stage of length L is
``peak · (1 − (t − W) / (L − W))^0.9`` (``PolyLRScheduler_offset``), t counted from the stage start.

Parameter groups are selected **by name** (:func:`parameter_groups`), never with
``network.decoder.parameters()``, which in dynamic-network-architectures includes the whole encoder
through ``decoder.encoder``. Frozen parameters must be kept out of the optimizer and have
``requires_grad=False`` (:func:`apply_stage`), so weight decay and momentum cannot move them.

Beyond the DKFZ recipe, a schedule can express nnDetection's v001 training (:mod:`nnpre_detection.recipe`):
a warm-up that starts from a small LR instead of 0 (:attr:`LRRule.warmup_start_lr`), the torch-scheduler step
convention (:attr:`LRRule.step_offset`), a cyclic LR (``decay="cyclic"``), a stage that keeps the previous
stage's optimizer (:attr:`Stage.keep_optimizer`, as nnDetection's SWA phase swaps only the LR scheduler), an
equal-weight average of the weights taken during a stage (:attr:`Stage.average_every`, stochastic weight
averaging), no weight decay on normalisation layers and no gradient clipping
(:attr:`FinetuneSchedule.no_weight_decay_on_norm`, :attr:`FinetuneSchedule.grad_clip`).

This module holds no trainer code; :class:`nnpre_trainers.stage_controller.StageController` applies a
schedule during training (:meth:`FinetuneSchedule.stage_at`, :meth:`FinetuneSchedule.lr_at`, :func:`apply_stage`).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Union

from torch import nn

from nnpre.architecture import unwrap
from nnpre_trainers.train_step import GRAD_CLIP

#: Parameter group names produced by :func:`parameter_groups`.
GROUPS = ("encoder", "stem", "decoder", "heads", "other")
#: Optimizers a schedule can name.
OPTIMIZERS = ("sgd", "adamw")
ALL_GROUPS = GROUPS
Span = Union[int, float, None]  # int = iteration count, float = fraction of all iterations, None = the rest
#: LR decays a stage can use (:class:`LRRule`).
DECAYS = ("poly", "constant", "cyclic")
#: Module types whose parameters get no weight decay when a schedule asks for it (nnDetection
#: ``nndet/training/optimizer/utils.py`` ``NORM_TYPES``: batch / instance / group / layer norm).
NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.InstanceNorm1d, nn.InstanceNorm2d,
              nn.InstanceNorm3d, nn.LayerNorm, nn.GroupNorm, nn.SyncBatchNorm, nn.LocalResponseNorm)


def norm_parameter_ids(network: nn.Module) -> set:
    """``id()`` of every parameter that belongs directly to a normalisation layer (:data:`NORM_TYPES`)."""
    return {id(p) for m in unwrap(network).modules() if isinstance(m, NORM_TYPES) for p in m.parameters(recurse=False)}


def resolve_span(span: Span, total_iterations: int, what: str) -> Optional[int]:
    """An iteration count for ``span`` (float → round-half-up of fraction × total; int → itself)."""
    if span is None:
        return None
    if isinstance(span, bool):
        raise ValueError(f"{what}: expected a fraction (float) or an iteration count (int), got {span!r}")
    if isinstance(span, float):
        if not 0.0 <= span <= 1.0:
            raise ValueError(f"{what}: a fraction must lie in [0, 1], got {span}")
        return int(math.floor(span * total_iterations + 0.5))
    if isinstance(span, int):
        if span < 0:
            raise ValueError(f"{what}: an iteration count must be >= 0, got {span}")
        return span
    raise ValueError(f"{what}: expected a fraction (float) or an iteration count (int), got {span!r}")


@dataclass(frozen=True)
class LRRule:
    """LR inside one stage (t = iteration counted from the stage start, L = stage length, W = warm-up length).

    Attributes:
        peak_lr: LR reached after the warm-up; None → the schedule's ``base_lr``.
        warmup: warm-up length: float = fraction of *all* training iterations, int = iterations, 0 = none.
            Capped at the stage length. LR ``start + (peak − start) · (t + 1) / W`` for t < W.
        decay: after the warm-up: ``"poly"`` (``peak · (1 − k / (L − W))^exponent``, k = t − W + step_offset),
            ``"constant"``, or ``"cyclic"`` (repeating linear ramps of ``cycle_length`` iterations from
            ``cycle_start_lr`` towards ``peak``: ``start + (peak − start) · c / cycle_length``, c = (t − W) mod
            cycle_length; nnDetection ``CycleLinear``).
        exponent: poly exponent (nnU-Net: 0.9).
        warmup_start_lr: LR the warm-up starts from (nnU-Net: 0; nnDetection ``warm_lr`` 1e-6).
        step_offset: 0 = nnU-Net's poly (the first post-warm-up iteration runs at the peak); 1 = the torch
            scheduler convention of nnDetection's ``LinearWarmupPolyLR`` (a scheduler steps once when built, so
            iteration t sees step count t + 1; k is clamped at the stage's last iteration, L − W − 1).
        cycle_length / cycle_start_lr: the cyclic decay's period (iterations) and start LR.
    """

    peak_lr: Optional[float] = None
    warmup: Span = 0
    decay: str = "poly"
    exponent: float = 0.9
    warmup_start_lr: float = 0.0
    step_offset: int = 0
    cycle_length: Optional[int] = None
    cycle_start_lr: float = 0.0

    def __post_init__(self):
        if self.decay not in DECAYS:
            raise ValueError(f"LRRule.decay must be one of {DECAYS}, got {self.decay!r}")
        if self.peak_lr is not None and self.peak_lr <= 0:
            raise ValueError(f"LRRule.peak_lr must be > 0, got {self.peak_lr}")
        if self.decay == "cyclic" and (self.cycle_length is None or int(self.cycle_length) < 1):
            raise ValueError(f"LRRule: a cyclic decay needs cycle_length >= 1, got {self.cycle_length}")
        if self.step_offset not in (0, 1):
            raise ValueError(f"LRRule.step_offset must be 0 or 1, got {self.step_offset}")

    def at(self, t: int, length: int, warmup: int, peak: float) -> float:
        """LR at iteration ``t`` of a stage of ``length`` iterations with ``warmup`` warm-up iterations."""
        if t < warmup:
            return self.warmup_start_lr + (peak - self.warmup_start_lr) * (t + 1) / warmup
        if self.decay == "constant":
            return peak
        if self.decay == "cyclic":
            c = (t - warmup) % int(self.cycle_length)
            return self.cycle_start_lr + (peak - self.cycle_start_lr) * c / float(self.cycle_length)
        span = max(length - warmup, 1)
        k = t - warmup + self.step_offset
        if self.step_offset:
            k = min(k, span - 1)
        progress = min(max(k / span, 0.0), 1.0)
        return peak * (1.0 - progress) ** self.exponent


@dataclass(frozen=True)
class Stage:
    """One stage of fine-tuning.

    Attributes:
        name: label (logged; used to rebuild the optimizer on resume).
        length: float = fraction of all iterations, int = iteration count, None = all remaining
            iterations (only the last stage).
        trains: parameter group names (see :data:`GROUPS`) whose parameters are trainable.
        lr: the stage's :class:`LRRule`.
        keep_optimizer: continue with the previous stage's optimizer and its state (momentum) instead of
            building a new one; needs the previous stage's ``trains`` (nnDetection's SWA phase swaps only the
            LR scheduler). Default False: a new optimizer per stage (the DKFZ "sawtooth").
        average_every: keep an equal-weight average of the weights taken at the stage's first iteration and
            every ``average_every`` iterations after it, *before* that iteration's step; the average becomes the
            final weights when training ends (stochastic weight averaging; nnDetection: every epoch start of its
            SWA epochs). None = no averaging.
    """

    name: str
    length: Span
    trains: Tuple[str, ...]
    lr: LRRule = field(default_factory=LRRule)
    keep_optimizer: bool = False
    average_every: Optional[int] = None

    def __post_init__(self):
        unknown = [g for g in self.trains if g not in GROUPS]
        if unknown:
            raise ValueError(f"stage {self.name!r}: unknown parameter groups {unknown}; known: {list(GROUPS)}")
        object.__setattr__(self, "trains", tuple(self.trains))
        if self.average_every is not None and int(self.average_every) < 1:
            raise ValueError(f"stage {self.name!r}: average_every must be >= 1, got {self.average_every}")


@dataclass(frozen=True)
class FinetuneSchedule:
    """Stages over ``total_iterations`` plus the SGD settings (pure data; no state).

    Attributes:
        stages: the stages in order.
        total_iterations: all training iterations (epochs × iterations per epoch).
        base_lr: peak LR of rules with ``peak_lr=None`` (1e-3 with pretrained weights, 1e-2 from scratch).
        momentum / nesterov / weight_decay: SGD settings (nnU-Net: 0.99, True, 3e-5).
        optimizer: ``"sgd"`` (nnU-Net, the default) or ``"adamw"`` (betas 0.9/0.999, same weight decay;
            used by the ``cpu-tiny`` preset, whose runs of a few hundred iterations are too short for SGD
            to leave the all-background solution on small lesions).
        lr_step: the LR is recomputed every ``lr_step`` iterations (at multiples of it): 1 = every iteration
            (fine-tuning); iterations per epoch = nnU-Net's ``PolyLRScheduler``, stepped once per epoch
            (pretraining, :func:`pretrain_schedule`).
        no_weight_decay_on_norm: weight decay 0 for parameters of normalisation layers (:data:`NORM_TYPES`;
            nnDetection). Default False (nnU-Net decays every parameter).
        grad_clip: gradient 2-norm clip of every step; None = no clipping (nnDetection). Default 12 (nnU-Net).
    """

    stages: Tuple[Stage, ...]
    total_iterations: int
    base_lr: float = 1e-3
    momentum: float = 0.99
    nesterov: bool = True
    weight_decay: float = 3e-5
    optimizer: str = "sgd"
    lr_step: int = 1
    no_weight_decay_on_norm: bool = False
    grad_clip: Optional[float] = GRAD_CLIP

    def __post_init__(self):
        object.__setattr__(self, "stages", tuple(self.stages))
        if int(self.lr_step) < 1:
            raise ValueError(f"lr_step must be >= 1, got {self.lr_step}")
        if self.total_iterations < 1:
            raise ValueError(f"total_iterations must be >= 1, got {self.total_iterations}")
        if not self.stages:
            raise ValueError("a schedule needs at least one stage")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if any(s.length is None for s in self.stages[:-1]):
            raise ValueError("only the last stage may have length None (the remaining iterations)")
        if self.stages[0].keep_optimizer:
            raise ValueError(f"stage {self.stages[0].name!r} is the first stage: there is no optimizer to keep")
        for prev, s in zip(self.stages, self.stages[1:]):
            if s.keep_optimizer and set(s.trains) != set(prev.trains):
                raise ValueError(f"stage {s.name!r} keeps the optimizer of {prev.name!r}, so it must train the same "
                                 f"groups ({list(prev.trains)}), not {list(s.trains)}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0 or None (no clipping), got {self.grad_clip}")
        self.boundaries()  # validates the lengths

    # ------------------------------------------------------------------ stage bookkeeping
    def boundaries(self) -> List[Tuple[int, int]]:
        """[start, end) iteration of every stage. Fractions are rounded half up; the last stage ends at
        ``total_iterations`` when its length is None."""
        out, start = [], 0
        for i, s in enumerate(self.stages):
            n = resolve_span(s.length, self.total_iterations, f"stage {s.name!r} length")
            end = self.total_iterations if n is None else start + n
            if end > self.total_iterations:
                raise ValueError(f"stages exceed total_iterations ({end} > {self.total_iterations})")
            out.append((start, end))
            start = end
        if start != self.total_iterations:
            raise ValueError(f"stages cover {start} of {self.total_iterations} iterations; give the last stage "
                             f"length=None to take the rest")
        return out

    def stage_at(self, iteration: int) -> Tuple[int, Stage]:
        """(index, stage) active at 0-based ``iteration``; iterations past the end belong to the last stage."""
        if iteration < 0:
            raise ValueError(f"iteration must be >= 0, got {iteration}")
        bounds = self.boundaries()
        for i, (a, b) in enumerate(bounds):
            if a <= iteration < b:
                return i, self.stages[i]
        return len(self.stages) - 1, self.stages[-1]

    def lr_at(self, iteration: int) -> float:
        """LR at 0-based ``iteration`` (see the module docstring for the formulas; ``lr_step`` > 1 holds the LR
        of the last multiple of ``lr_step``)."""
        iteration = (iteration // int(self.lr_step)) * int(self.lr_step)
        idx, stage = self.stage_at(iteration)
        start, end = self.boundaries()[idx]
        length = max(end - start, 1)
        peak = stage.lr.peak_lr if stage.lr.peak_lr is not None else self.base_lr
        w = min(resolve_span(stage.lr.warmup, self.total_iterations, f"stage {stage.name!r} warmup") or 0, length)
        return stage.lr.at(iteration - start, length, w, peak)

    def stage_names(self) -> List[str]:
        return [s.name for s in self.stages]

    def trainable_names(self, stage: Stage | int, groups: Dict[str, List[Tuple[str, nn.Parameter]]]) -> List[str]:
        """Names of the parameters ``stage`` trains, given :func:`parameter_groups` output."""
        stage = self.stages[stage] if isinstance(stage, int) else stage
        return [n for g in stage.trains for n, _ in groups.get(g, [])]

    def optimizer_kwargs(self, iteration: int = 0) -> Dict[str, Any]:
        """Keyword arguments for the optimizer (:meth:`build_optimizer`) at ``iteration``."""
        if self.optimizer == "adamw":
            return {"lr": self.lr_at(iteration), "weight_decay": self.weight_decay}
        return {"lr": self.lr_at(iteration), "momentum": self.momentum, "nesterov": self.nesterov,
                "weight_decay": self.weight_decay}

    def build_optimizer(self, params, iteration: int = 0, no_decay_ids: Optional[set] = None):
        """``torch.optim.SGD`` or ``AdamW`` over ``params`` with this schedule's settings at ``iteration``.

        With :attr:`no_weight_decay_on_norm`, two parameter groups: ``[decayed, not decayed]``, the second holding
        the parameters whose ``id()`` is in ``no_decay_ids`` (:func:`norm_parameter_ids`), weight decay 0; the
        group layout is the same in every run, so optimizer states of a checkpoint load back.
        """
        import torch

        cls = torch.optim.AdamW if self.optimizer == "adamw" else torch.optim.SGD
        params = list(params)
        if self.no_weight_decay_on_norm:
            skip = no_decay_ids or set()
            params = [{"params": [p for p in params if id(p) not in skip]},
                      {"params": [p for p in params if id(p) in skip], "weight_decay": 0.0}]
        return cls(params, **self.optimizer_kwargs(iteration))

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["stages"] = [{**asdict(s), "trains": list(s.trains)} for s in self.stages]
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "FinetuneSchedule":
        stages = tuple(Stage(**{**s, "trains": tuple(s["trains"]), "lr": LRRule(**s["lr"])}) for s in d["stages"])
        return cls(stages=stages, **{k: v for k, v in d.items() if k != "stages"})


# ---------------------------------------------------------------------------------------------- recipes
#: Default recipe numbers (nnU-Net master ``pretraining/pretrainedTrainer.py``): 5 % decoder-first stage, lr 1e-3
#: pretrained / 1e-2 scratch.
DKFZ_WARMUP_FRACTION = 0.05
PRETRAINED_LR = 1e-3
SCRATCH_LR = 1e-2


def default_schedule(total_iterations: int, pretrained: bool = True, base_lr: Optional[float] = None,
                     warmup_fraction: float = DKFZ_WARMUP_FRACTION, optimizer: str = "sgd") -> FinetuneSchedule:
    """The DKFZ fine-tuning recipe (pretrained) or nnU-Net's from-scratch schedule.

    Args:
        total_iterations: epochs × iterations per epoch (nnU-Net: 1000 × 250).
        pretrained: two stages (decoder-first, then whole network) when True; one whole-network stage
            with poly decay otherwise.
        base_lr: peak LR; default 1e-3 pretrained, 1e-2 from scratch.
        warmup_fraction: length of the decoder-only stage and of the whole-network warm-up (0.05).
        optimizer: ``"sgd"`` (the recipe) or ``"adamw"`` (see :class:`FinetuneSchedule`).
    """
    if not pretrained:
        return FinetuneSchedule(stages=(Stage("scratch", None, ALL_GROUPS, LRRule(warmup=0)),),
                                total_iterations=total_iterations,
                                base_lr=SCRATCH_LR if base_lr is None else base_lr, optimizer=optimizer)
    return FinetuneSchedule(
        stages=(
            Stage("decoder_warmup", float(warmup_fraction), ("decoder", "heads", "stem"),
                  LRRule(warmup=float(warmup_fraction) / 2)),
            Stage("whole_network", None, ALL_GROUPS, LRRule(warmup=float(warmup_fraction))),
        ),
        total_iterations=total_iterations,
        base_lr=PRETRAINED_LR if base_lr is None else base_lr,
        optimizer=optimizer,
    )


def pretrain_schedule(total_iterations: int, iterations_per_epoch: int, base_lr: float = SCRATCH_LR,
                      optimizer: str = "sgd") -> FinetuneSchedule:
    """nnU-Net's default optimisation as a one-stage schedule (what pretraining uses).

    ``nnUNetTrainer.configure_optimizers``: SGD (momentum 0.99, Nesterov, weight decay 3e-5) over the whole
    network, ``PolyLRScheduler`` with lr ``base_lr · (1 − epoch / epochs)^0.9`` stepped at every epoch start:
    here a poly stage without warm-up whose LR is recomputed every ``iterations_per_epoch`` iterations
    (identical values at every epoch start).
    """
    return FinetuneSchedule(stages=(Stage("whole_network", None, ALL_GROUPS, LRRule(warmup=0)),),
                            total_iterations=total_iterations, base_lr=base_lr, optimizer=optimizer,
                            lr_step=max(1, int(iterations_per_epoch)))


# ---------------------------------------------------------------------------------------------- parameters
def parameter_groups(network: nn.Module, remapped_stem: bool) -> Dict[str, List[Tuple[str, nn.Parameter]]]:
    """Partition the network's parameters by name into :data:`GROUPS`.

    - ``encoder``: names under ``encoder.`` (the stem too, unless ``remapped_stem``);
    - ``stem``: the stem (``network.key_to_stem``, default ``encoder.stem``) if ``remapped_stem``, else empty;
    - ``decoder``: names starting ``decoder.`` but not ``decoder.encoder.`` and not ``decoder.seg_layers.``;
    - ``heads``: ``decoder.seg_layers.``;
    - ``other``: anything else (pretext-only modules).

    Each tensor appears once, under its first name outside ``decoder.encoder.*`` (shared tensors and
    ``all_modules`` aliases are deduplicated by identity).
    """
    net = unwrap(network)  # DDP / torch.compile wrappers
    stem = str(getattr(net, "key_to_stem", "encoder.stem")) + "."
    # detectors declare their heads (e.g. Retina U-Net: classifier., regressor., segmenter.)
    head_prefixes = tuple(getattr(net, "head_prefixes", ()) or ()) or ("decoder.seg_layers.",)
    names_by_id: Dict[int, List[str]] = {}
    params: Dict[int, nn.Parameter] = {}
    for name, p in net.named_parameters(remove_duplicate=False):
        names_by_id.setdefault(id(p), []).append(name)
        params[id(p)] = p
    groups: Dict[str, List[Tuple[str, nn.Parameter]]] = {g: [] for g in GROUPS}
    for pid, names in names_by_id.items():
        canonical = next((n for n in names if not n.startswith("decoder.encoder.")), None)
        if canonical is None:  # only reachable through the decoder's view: it is an encoder tensor
            canonical = names[0][len("decoder."):]
        if canonical.startswith("encoder."):
            group = "stem" if remapped_stem and canonical.startswith(stem) else "encoder"
        elif canonical.startswith("decoder.seg_layers.") or canonical.startswith(head_prefixes):
            group = "heads"
        elif canonical.startswith("decoder."):
            group = "decoder"
        else:
            group = "other"
        groups[group].append((canonical, params[pid]))
    return groups


def apply_stage(groups: Dict[str, List[Tuple[str, nn.Parameter]]], stage: Stage,
                keep_requires_grad: bool = False) -> List[nn.Parameter]:
    """Set ``requires_grad`` for ``stage`` (True for its groups, False elsewhere) and return the trainable
    parameters — pass exactly these to the optimizer so frozen tensors see no weight decay or momentum.

    ``keep_requires_grad`` (DDP): leave every parameter's ``requires_grad`` True (DDP fixes its parameter set at
    wrap time); frozen parameters are then only kept out of the optimizer, so neither the step, momentum nor
    weight decay touches them.
    """
    trainable: List[nn.Parameter] = []
    for g, items in groups.items():
        on = g in stage.trains
        for _, p in items:
            p.requires_grad_(on or keep_requires_grad)
            if on:
                trainable.append(p)
            else:
                p.grad = None
    return trainable
