"""The task contract of :class:`nnpre_trainers.trainer.nnPreTrainer`.

A task decides *what* is learnt; the trainer decides *how* a run goes (plans, run folder, DDP, checkpoints,
schedule, the optimisation step). A task

* builds the network from a :class:`TaskContext` (plans, dataset, channels — no trainer);
* provides the data loaders (nnU-Net's, or its own);
* turns a loader batch into device tensors (:meth:`TrainingTask.prepare_batch`) and computes the losses
  (:meth:`TrainingTask.compute_losses`, a dict with ``"loss"``; detection adds its parts);
* validates (default: the mean validation loss; ``checkpoint_best`` = lowest finite validation loss) and adds
  plain-valued entries to checkpoints (:meth:`TrainingTask.checkpoint_extras`).

Tasks register by name (:func:`register_task`; ``segmentation`` in :mod:`.segmentation`, ``detection`` in
:mod:`nnpre_detection.task`); pretext tasks keep their own registry (:mod:`nnpre_trainers.pretext.registry`)
and are wrapped by :class:`nnpre_trainers.tasks.pretext.PretextTrainingTask`.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Dict, Iterator, List, Tuple

import torch
from torch import Tensor, nn

from nnpre.registry import Registry
from nnpre_trainers.train_step import autocast_for

if TYPE_CHECKING:  # pragma: no cover
    from nnpre_trainers.trainer import nnPreTrainer


@dataclass
class TaskContext:
    """What a task needs to build its network (all from the plans and the preprocessed dataset).

    Attributes:
        plans_manager / configuration_manager / label_manager: nnU-Net's handlers of the run's plans.
        dataset_json: the dataset's ``dataset.json``.
        num_input_channels: image channels C.
        training_cases: yields ``(case id, seg)`` for the fold's training cases, ``seg`` (1, X, Y, Z) int
            semantic labels of the preprocessed case (used e.g. to plan anchors).
        log: writes one line to the run's log.
    """

    plans_manager: Any
    configuration_manager: Any
    label_manager: Any
    dataset_json: dict
    num_input_channels: int
    training_cases: Callable[[], Iterator[Tuple[str, Any]]]
    log: Callable[[str], None] = print


class TrainingTask:
    """Base class; subclasses implement :meth:`build_network`, :meth:`prepare_batch`, :meth:`compute_losses`.

    Attributes:
        name: registry name.
        recipe: ``"finetune"`` (default schedule: :func:`~nnpre_trainers.finetune_schedule.default_schedule`)
            or ``"pretrain"`` (:func:`~nnpre_trainers.finetune_schedule.pretrain_schedule`, nnU-Net's poly SGD).
        needs_labels: training reads ``labelsTr`` (False for pretext tasks).
    """

    name: ClassVar[str] = ""
    recipe: ClassVar[str] = "finetune"
    needs_labels: ClassVar[bool] = True

    # -- model -------------------------------------------------------------------------------------------
    def build_network(self, ctx: TaskContext) -> nn.Module:
        raise NotImplementedError

    def setup(self, trainer: "nnPreTrainer") -> None:
        """Called once the trainer's network exists (e.g. to build a loss from the trainer's label manager)."""

    def prepare_batch(self, batch: dict, device: torch.device) -> Any:
        """Loader batch → what :meth:`compute_losses` takes (tensors on ``device``)."""
        raise NotImplementedError

    def compute_losses(self, network: nn.Module, inputs: Any) -> Dict[str, Tensor]:
        """Forward + loss: ``{"loss": scalar, <part>: scalar, ...}`` (called under autocast)."""
        raise NotImplementedError

    # -- data ----------------------------------------------------------------------------------------------
    def get_dataloaders(self, trainer: "nnPreTrainer", train_keys: List[str], val_keys: List[str]):
        """(train, val) loaders; default: nnU-Net's loaders and augmentation (:meth:`nnPreTrainer.nnunet_loaders`)."""
        return trainer.nnunet_loaders(train_keys, val_keys)

    # -- validation ------------------------------------------------------------------------------------------
    def validation_step(self, trainer: "nnPreTrainer", batch: dict) -> dict:
        """Default: the training losses on a validation batch (no gradient; the caller set ``no_grad``)."""
        inputs = self.prepare_batch(batch, trainer.device)
        with autocast_for(trainer.device, trainer.amp):
            losses = self.compute_losses(trainer.network, inputs)
        return {"loss": float(losses["loss"].detach().float().cpu())}

    def on_validation_epoch_end(self, trainer: "nnPreTrainer", outputs: List[dict]) -> None:
        trainer.log_mean_val_loss(outputs)

    def on_epoch_end(self, trainer: "nnPreTrainer") -> None:
        """Default: log losses, save latest/best (lowest validation loss) checkpoints, advance the epoch."""
        trainer.end_loss_epoch()
        trainer.current_epoch += 1

    def final_validation(self, trainer: "nnPreTrainer", save_probabilities: bool = False) -> None:
        """What ``perform_actual_validation`` does at the end of training (default: nothing)."""
        trainer.print_to_log_file(f"{self.name}: no segmentation validation to perform")

    # -- checkpoints -----------------------------------------------------------------------------------------
    def checkpoint_extras(self, trainer: "nnPreTrainer") -> Dict[str, Any]:
        """Extra plain-valued entries of every checkpoint."""
        return {}


# ------------------------------------------------------------------------------------------------ registry
#: name -> "module:attribute" of the task class (imported on first use: detection lives in nnpre_detection).
_TASKS: Registry[str] = Registry("training task", choices="known tasks:")


def register_task(name: str, target: str) -> None:
    """Register a fine-tuning task class by import path (``"package.module:Class"``)."""
    _TASKS.add(name, target)


def list_tasks() -> List[str]:
    """Sorted names of the registered fine-tuning tasks."""
    return _TASKS.names()


def get_task(name: str, **options) -> TrainingTask:
    """Instantiate the fine-tuning task registered as ``name`` with ``options``."""
    module, attr = _TASKS.get(name).split(":")
    return getattr(importlib.import_module(module), attr)(**options)


register_task("segmentation", "nnpre_trainers.tasks.segmentation:SegmentationTask")
register_task("detection", "nnpre_detection.task:DetectionTask")
