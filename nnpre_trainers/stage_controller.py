"""Apply a :class:`~nnpre_trainers.finetune_schedule.FinetuneSchedule` while training.

:class:`StageController` owns the stage bookkeeping of a run: it builds the optimizer of a stage once, when
the first iteration of that stage is entered (or when a run starts / resumes inside it), sets
``requires_grad`` of the stage's parameter groups (:func:`~nnpre_trainers.finetune_schedule.apply_stage`) and
sets the learning rate of every iteration. The trainer calls :meth:`enter` with the 0-based index of the
iteration it is about to run — nothing else moves stages.

A stage with ``keep_optimizer`` continues with the previous stage's optimizer (and its momentum); a stage with
``average_every`` feeds the weights into a :class:`WeightAverage` at its first iteration and every
``average_every`` iterations after, and :meth:`StageController.finish` makes the average the final weights
(stochastic weight averaging as nnDetection's ``SWACycleLinear`` callback: PyTorch Lightning's
``StochasticWeightAveraging`` averages the parameters at every SWA epoch start and copies the average into the
model when training ends). The average is part of :meth:`StageController.state_dict`, which the trainer keeps in
its checkpoints so ``--c`` continues it.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from nnpre_trainers.finetune_schedule import FinetuneSchedule, apply_stage, norm_parameter_ids

Groups = Dict[str, List[Tuple[str, nn.Parameter]]]


class WeightAverage:
    """Equal-weight running average of a network's parameters (``torch.optim.swa_utils.AveragedModel``'s default
    average; parameters only, as PyTorch Lightning's ``StochasticWeightAveraging`` that nnDetection uses — no
    normalisation statistics are updated, nnDetection's ``BaseSWA`` does not support it either).

    Attributes:
        n: snapshots averaged so far. last_iteration: iteration of the last snapshot (-1: none).
        params: name → float32 average (on the parameters' device).
    """

    def __init__(self):
        self.n = 0
        self.last_iteration = -1
        self.params: Dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def update(self, network: nn.Module, iteration: int = -1) -> None:
        """Add the current parameters as one snapshot: ``avg += (p − avg) / n``."""
        self.n += 1
        self.last_iteration = int(iteration)
        for name, p in network.named_parameters():
            if self.n == 1 or name not in self.params:
                self.params[name] = p.detach().float().clone()
            else:
                self.params[name].add_((p.detach().float() - self.params[name]) / self.n)

    @torch.no_grad()
    def copy_to(self, network: nn.Module) -> None:
        """Write the average into ``network``'s parameters (their dtype and device kept)."""
        if self.n == 0:
            raise ValueError("no weights were averaged (the averaging stage was never entered)")
        for name, p in network.named_parameters():
            p.copy_(self.params[name].to(device=p.device, dtype=p.dtype))

    def state_dict(self) -> Dict[str, Any]:
        return {"n": self.n, "last_iteration": self.last_iteration,
                "params": {k: v.detach().cpu().clone() for k, v in self.params.items()}}

    def load_state_dict(self, state: Dict[str, Any], device: Optional[torch.device] = None) -> None:
        self.n = int(state["n"])
        self.last_iteration = int(state["last_iteration"])
        self.params = {k: v.float().to(device) if device is not None else v.float() for k, v in state["params"].items()}


class StageController:
    """Stage switches and per-iteration LR of one run.

    Args:
        schedule: the run's schedule (pure data).
        groups: returns the network's parameter groups (:func:`~nnpre_trainers.finetune_schedule.parameter_groups`);
            called at every stage switch.
        keep_requires_grad: DDP runs (see :func:`~nnpre_trainers.finetune_schedule.apply_stage`).
        log: receives one line per stage switch.
        may_train: optional rule on canonical parameter names (an adapter's ``is_trainable``): parameters it
            rejects never train, whatever the stage: ``requires_grad`` False (also with ``keep_requires_grad``)
            and kept out of every optimizer.
        network: returns the (unwrapped) network; needed by schedules with ``no_weight_decay_on_norm`` (which
            parameters are normalisation layers') or an averaging stage (``average_every``).

    Attributes:
        stage_index: index of the current stage (None before :meth:`start`).
        optimizer: the current stage's optimizer.
        switches: ``(iteration, stage index)`` of every optimizer built, in order (one per stage entered; a stage
            that keeps the previous optimizer adds none).
        average: the :class:`WeightAverage` of the averaging stage (None until that stage is entered).
    """

    def __init__(self, schedule: FinetuneSchedule, groups: Callable[[], Groups], keep_requires_grad: bool = False,
                 log: Callable[[str], None] = print, may_train: Optional[Callable[[str], bool]] = None,
                 network: Optional[Callable[[], nn.Module]] = None):
        self.schedule = schedule
        self.may_train = may_train
        self.groups = groups
        self.network = network
        self.keep_requires_grad = bool(keep_requires_grad)
        self.log = log
        self.stage_index: Optional[int] = None
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.switches: List[Tuple[int, int]] = []
        self.average: Optional[WeightAverage] = None
        needs_net = schedule.no_weight_decay_on_norm or any(s.average_every for s in schedule.stages)
        if needs_net and network is None:
            raise ValueError("this schedule needs the network (no weight decay on norm layers / weight averaging): "
                             "pass network=")

    def start(self, iteration: int, stage_index: Optional[int] = None) -> torch.optim.Optimizer:
        """Build the optimizer of stage ``stage_index`` (default: the stage that contains ``iteration``) for a run
        that continues at ``iteration`` (0 for a new run) and set the LR.

        A resumed run passes the stage its checkpointed optimizer state belongs to: when the checkpoint was
        written at a stage's last iteration, :meth:`enter` switches to the next stage at the next iteration.
        """
        self._build(self.schedule.stage_at(iteration)[0] if stage_index is None else int(stage_index), iteration)
        self.set_lr(iteration)
        return self.optimizer

    def enter(self, iteration: int) -> torch.optim.Optimizer:
        """Prepare iteration ``iteration``: switch stage (new optimizer) exactly when a stage begins, set the LR.

        Returns the optimizer to step (the same object until the next stage starts).
        """
        idx, stage = self.schedule.stage_at(iteration)
        if self.optimizer is None or idx != self.stage_index:
            self._build(idx, iteration)  # a new optimizer per stage (the DKFZ "sawtooth" recipe)
        if stage.average_every:
            self._maybe_average(idx, iteration)
        self.set_lr(iteration)
        return self.optimizer

    def _maybe_average(self, index: int, iteration: int) -> None:
        start, end = self.schedule.boundaries()[index]
        if iteration >= end or (iteration - start) % int(self.schedule.stages[index].average_every):
            return
        if self.average is None:
            self.average = WeightAverage()
        if self.average.last_iteration == iteration:  # a resumed run re-entering the same iteration
            return
        self.average.update(self.network(), iteration)

    def finish(self) -> bool:
        """End of training: copy the weight average into the network (True) if the schedule has an averaging
        stage and it was entered; False otherwise (the last weights stay)."""
        if self.average is None or self.average.n == 0:
            if any(s.average_every for s in self.schedule.stages):
                self.log("weight averaging: the averaging stage was never reached; the final weights are the last")
            return False
        self.average.copy_to(self.network())
        self.log(f"final weights = equal-weight average of {self.average.n} snapshots (iterations up to "
                 f"{self.average.last_iteration})")
        self.average = None  # consumed: checkpoint_final holds it as the weights
        return True

    def state_dict(self) -> Dict[str, Any]:
        """What a resumed run needs besides the optimizer: the weight average (None without one)."""
        return {"average": None if self.average is None else self.average.state_dict()}

    def load_state_dict(self, state: Optional[Dict[str, Any]]) -> None:
        avg = (state or {}).get("average")
        if avg is None:
            self.average = None
            return
        self.average = WeightAverage()
        device = next(iter(self.network().parameters())).device if self.network is not None else None
        self.average.load_state_dict(avg, device)

    def set_lr(self, iteration: int) -> float:
        lr = self.schedule.lr_at(iteration)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        return lr

    def _build(self, index: int, iteration: int) -> None:
        stage = self.schedule.stages[index]
        groups = self.groups()
        if self.may_train is not None:
            for items in groups.values():
                for n, p in items:
                    if not self.may_train(n):
                        # Frozen in every stage, also under DDP: the first stage is built before the network is
                        # wrapped, so DDP never registers these parameters and needs no gradient for them.
                        p.requires_grad_(False)
                        p.grad = None
            groups = {g: [(n, p) for n, p in items if self.may_train(n)] for g, items in groups.items()}
        trainable = apply_stage(groups, stage, keep_requires_grad=self.keep_requires_grad)
        keep = stage.keep_optimizer and self.optimizer is not None and self.stage_index == index - 1
        if not keep:
            no_decay = norm_parameter_ids(self.network()) if self.schedule.no_weight_decay_on_norm else None
            self.optimizer = self.schedule.build_optimizer(trainable, iteration, no_decay)
            self.switches.append((int(iteration), int(index)))
        self.stage_index = index
        self.log(f"stage {index} '{stage.name}' from iteration {iteration}: trains {', '.join(stage.trains)} "
                 f"({sum(p.numel() for p in trainable)} parameters, {self.schedule.optimizer}"
                 f"{', same optimizer' if keep else ''})")
