"""Apply a :class:`~nnpre_trainers.finetune_schedule.FinetuneSchedule` while training.

:class:`StageController` owns the stage bookkeeping of a run: it builds the optimizer of a stage once, when
the first iteration of that stage is entered (or when a run starts / resumes inside it), sets
``requires_grad`` of the stage's parameter groups (:func:`~nnpre_trainers.finetune_schedule.apply_stage`) and
sets the learning rate of every iteration. The trainer calls :meth:`enter` with the 0-based index of the
iteration it is about to run — nothing else moves stages.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from nnpre_trainers.finetune_schedule import FinetuneSchedule, apply_stage

Groups = Dict[str, List[Tuple[str, nn.Parameter]]]


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

    Attributes:
        stage_index: index of the current stage (None before :meth:`start`).
        optimizer: the current stage's optimizer.
        switches: ``(iteration, stage index)`` of every optimizer built, in order (one per stage entered).
    """

    def __init__(self, schedule: FinetuneSchedule, groups: Callable[[], Groups], keep_requires_grad: bool = False,
                 log: Callable[[str], None] = print, may_train: Optional[Callable[[str], bool]] = None):
        self.schedule = schedule
        self.may_train = may_train
        self.groups = groups
        self.keep_requires_grad = bool(keep_requires_grad)
        self.log = log
        self.stage_index: Optional[int] = None
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.switches: List[Tuple[int, int]] = []

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
        idx, _ = self.schedule.stage_at(iteration)
        if self.optimizer is None or idx != self.stage_index:
            self._build(idx, iteration)  # a new optimizer per stage (the DKFZ "sawtooth" recipe)
        self.set_lr(iteration)
        return self.optimizer

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
        self.optimizer = self.schedule.build_optimizer(trainable, iteration)
        self.stage_index = index
        self.switches.append((int(iteration), int(index)))
        self.log(f"stage {index} '{stage.name}' from iteration {iteration}: trains {', '.join(stage.trains)} "
                 f"({sum(p.numel() for p in trainable)} parameters, {self.schedule.optimizer})")
