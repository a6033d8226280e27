"""Supervised segmentation (nnU-Net's task) as a :class:`~nnpre_trainers.tasks.base.TrainingTask`.

The network is the plans' U-Net with one output per segmentation head and deep supervision off (as nnU-Net's
``PretrainedTrainer`` for fine-tuning); the loss is nnU-Net's Dice + CE (``nnUNetTrainer._build_loss``);
loaders, validation (pseudo-Dice, EMA ``checkpoint_best``) and the final sliding-window validation are
nnU-Net's own.
"""
from __future__ import annotations

from typing import Any, Dict, List

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from torch import Tensor, nn

from nnpre_trainers.tasks.base import TaskContext, TrainingTask


class SegmentationTask(TrainingTask):
    """nnU-Net segmentation: Dice + CE on the plans' U-Net (see module doc)."""

    name = "segmentation"
    recipe = "finetune"
    needs_labels = True

    def __init__(self):
        self.loss_fn = None

    def build_network(self, ctx: TaskContext) -> nn.Module:
        return nnUNetTrainer.build_network_architecture(ctx.plans_manager, ctx.configuration_manager,
                                                        ctx.num_input_channels,
                                                        ctx.label_manager.num_segmentation_heads, False)

    def setup(self, trainer) -> None:
        """nnU-Net's loss for the trainer's label manager (also set as ``trainer.loss`` for its validation)."""
        self.loss_fn = trainer.loss = nnUNetTrainer._build_loss(trainer)

    def prepare_batch(self, batch: dict, device: torch.device):
        nb = device.type == "cuda"
        target = batch["target"]
        target = [t.to(device, non_blocking=nb) for t in target] if isinstance(target, list) \
            else target.to(device, non_blocking=nb)
        return batch["data"].to(device, non_blocking=nb), target

    def compute_losses(self, network: nn.Module, inputs: Any) -> Dict[str, Tensor]:
        data, target = inputs
        return {"loss": self.loss_fn(network(data), target)}

    # nnU-Net's validation: pseudo-Dice per epoch, EMA-best checkpoint, sliding-window validation at the end
    def validation_step(self, trainer, batch: dict) -> dict:
        return nnUNetTrainer.validation_step(trainer, batch)

    def on_validation_epoch_end(self, trainer, outputs: List[dict]) -> None:
        nnUNetTrainer.on_validation_epoch_end(trainer, outputs)

    def on_epoch_end(self, trainer) -> None:
        nnUNetTrainer.on_epoch_end(trainer)

    def final_validation(self, trainer, save_probabilities: bool = False) -> None:
        nnUNetTrainer.perform_actual_validation(trainer, save_probabilities)
