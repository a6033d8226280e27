"""Plumbing shared by every nnpre trainer (pretraining, fine-tuning, detection).

:class:`nnPreTrainerBase` is an ``nnUNetTrainer`` with the exact nnU-Net constructor signature (so
``nnUNetv2_train -tr`` and checkpoints' ``init_args`` keep working) and these changes:

* training length comes from the preset recorded in the plans (``cpu-tiny`` → a few short epochs);
* ``build_network`` is an instance hook (pretext tasks need other output/input channels);
* DDP also runs on CPU with the gloo backend (nnU-Net hard-codes CUDA devices; nnunet_api.md §2.7);
* checkpoints are written atomically (temp file + rename), carry only plain values, and are read
  with :func:`nnpre.checkpoints.safe_load` (``weights_only=True``) — never unpickled unsafely;
* a tqdm progress bar per epoch and a per-iteration counter (``global_iteration``) that schedules
  can use.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Union

import numpy as np
import torch
import torch.distributed as dist
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
from torch import nn
from torch._dynamo import OptimizedModule
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from nnpre.checkpoints import safe_load, save_checkpoint_atomic
from nnpre.presets import preset_from_plans


def to_plain(obj: Any) -> Any:
    """numpy scalars/arrays → Python values, recursively (so checkpoints load with weights_only=True)."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_plain(v) for v in obj)
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    return obj


class nnPreTrainerBase(nnUNetTrainer):
    """nnUNetTrainer with presets, CPU-DDP, safe atomic checkpoints and progress bars (see module doc)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.is_ddp and (device.type == "cpu" or not torch.cuda.is_available()):
            # nnU-Net forces cuda:<rank> under DDP; gloo on CPU needs the CPU device and no grad scaler.
            self.device = torch.device("cpu")
            self.grad_scaler = None
        preset = preset_from_plans(self.plans_manager.plans)
        self.num_epochs = preset.num_epochs
        self.num_iterations_per_epoch = preset.iterations_per_epoch
        self.num_val_iterations_per_epoch = preset.val_iterations_per_epoch
        self.save_every = preset.save_every
        self.show_progress = True
        self.iteration_in_epoch = 0

    # -- hooks ---------------------------------------------------------------------------------------------
    @property
    def global_iteration(self) -> int:
        """Index of the current training iteration over the whole run (0-based)."""
        return self.current_epoch * self.num_iterations_per_epoch + self.iteration_in_epoch

    @property
    def total_iterations(self) -> int:
        return self.num_epochs * self.num_iterations_per_epoch

    def build_network(self) -> nn.Module:
        """Build the network for this run (default: nnU-Net's plans architecture with seg heads)."""
        return self.build_network_architecture(self.plans_manager, self.configuration_manager, self.num_input_channels,
                                               self.label_manager.num_segmentation_heads, self.enable_deep_supervision)

    def build_plans_network(self, num_input_channels: int, num_output_channels: int,
                            deep_supervision: bool = False) -> nn.Module:
        cm = self.configuration_manager
        return get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                      cm.network_arch_init_kwargs_req_import, num_input_channels, num_output_channels,
                                      allow_init=True, deep_supervision=deep_supervision)

    def checkpoint_extras(self) -> Dict[str, Any]:
        """Extra entries stored in every checkpoint (plain values only)."""
        return {}

    @property
    def unwrapped_network(self) -> nn.Module:
        mod = self.network.module if isinstance(self.network, DDP) else self.network
        return mod._orig_mod if isinstance(mod, OptimizedModule) else mod

    # -- initialisation ------------------------------------------------------------------------------------
    def initialize(self):
        if self.was_initialized:
            raise RuntimeError("initialize() called twice")
        self._set_batch_size_and_oversample()
        self.num_input_channels = determine_num_input_channels(self.plans_manager, self.configuration_manager,
                                                               self.dataset_json)
        self.network = self.build_network().to(self.device)
        if self._do_i_compile():
            self.print_to_log_file("Using torch.compile...")
            self.network = torch.compile(self.network)
        self.optimizer, self.lr_scheduler = self.configure_optimizers()
        if self.is_ddp:
            # Without deep supervision the lower-resolution seg layers get no gradient: let DDP know.
            unused = not self.enable_deep_supervision
            if self.device.type == "cuda":
                self.network = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.network)
                self.network = DDP(self.network, device_ids=[self.local_rank], find_unused_parameters=unused)
            else:
                self.network = DDP(self.network, find_unused_parameters=unused)  # gloo on CPU: no device_ids
        self.loss = self._build_loss()
        self.dataset_class = infer_dataset_class(self.preprocessed_dataset_folder)
        self.was_initialized = True

    # -- checkpoints ---------------------------------------------------------------------------------------
    def save_checkpoint(self, filename: str) -> None:
        if self.local_rank != 0:
            return
        if self.disable_checkpointing:
            self.print_to_log_file("No checkpoint written, checkpointing is disabled")
            return
        checkpoint = {
            "network_weights": self.unwrapped_network.state_dict(),
            "optimizer_state": self.optimizer.state_dict(),
            "grad_scaler_state": self.grad_scaler.state_dict() if self.grad_scaler is not None else None,
            "logging": to_plain(self.logger.get_checkpoint()),
            "_best_ema": to_plain(self._best_ema),
            "current_epoch": self.current_epoch + 1,
            "init_args": to_plain(self.my_init_kwargs),
            "trainer_name": self.__class__.__name__,
            "inference_allowed_mirroring_axes": to_plain(self.inference_allowed_mirroring_axes),
        }
        checkpoint.update(self.checkpoint_extras())
        save_checkpoint_atomic(checkpoint, filename)

    def load_checkpoint(self, filename_or_checkpoint: Union[dict, str]) -> None:
        """Restore a checkpoint (path → :func:`safe_load`, or an already loaded dict).

        Same effect as nnU-Net's ``load_checkpoint`` (whose dict branch is broken in 2.8.1), without unsafe
        unpickling; ``module.`` / ``_orig_mod.`` key prefixes are stripped.
        """
        if not self.was_initialized:
            self.initialize()
        ck = safe_load(filename_or_checkpoint) if isinstance(filename_or_checkpoint, (str, os.PathLike)) \
            else filename_or_checkpoint
        from nnpre.checkpoints import strip_prefixes

        self.my_init_kwargs = ck.get("init_args", self.my_init_kwargs)
        self.current_epoch = int(ck["current_epoch"])
        self.logger.load_checkpoint(ck["logging"])
        self._best_ema = ck.get("_best_ema")
        self.inference_allowed_mirroring_axes = ck.get("inference_allowed_mirroring_axes",
                                                       self.inference_allowed_mirroring_axes)
        self.unwrapped_network.load_state_dict(strip_prefixes(ck["network_weights"]))
        self.optimizer.load_state_dict(ck["optimizer_state"])
        if self.grad_scaler is not None and ck.get("grad_scaler_state") is not None:
            self.grad_scaler.load_state_dict(ck["grad_scaler_state"])
        self.on_checkpoint_loaded(ck)

    def on_checkpoint_loaded(self, checkpoint: dict) -> None:
        """Called after a checkpoint was restored (e.g. to rebuild a stage-specific optimizer)."""

    # -- loss-only epochs (pretraining, detection: no pseudo-Dice) ------------------------------------------
    def log_mean_val_loss(self, val_outputs) -> None:
        """Log the mean of ``val_outputs[i]["loss"]`` (NaN if empty; averaged over DDP ranks) as ``val_losses``."""
        losses = [float(o["loss"]) for o in val_outputs]
        loss = float(np.mean(losses)) if losses else float("nan")
        if self.is_ddp:
            t = torch.tensor([loss], dtype=torch.float64)
            dist.all_reduce(t)
            loss = float(t.item()) / dist.get_world_size()
        self.logger.log("val_losses", loss, self.current_epoch)

    def end_loss_epoch(self) -> None:
        """Log the epoch's losses and time; save ``checkpoint_latest`` every ``save_every`` epochs and
        ``checkpoint_best`` on the lowest finite validation loss. Does not advance ``current_epoch``."""
        from time import time

        self.logger.log("epoch_end_timestamps", time(), self.current_epoch)
        log = self.logger.local_logger.my_fantastic_logging
        tr, va = float(log["train_losses"][-1]), float(log["val_losses"][-1])
        self.print_to_log_file(f"train_loss {tr:.4f}  val_loss {va:.4f}  epoch time "
                               f"{log['epoch_end_timestamps'][-1] - log['epoch_start_timestamps'][-1]:.1f} s")
        e = self.current_epoch
        if (e + 1) % self.save_every == 0 and e != self.num_epochs - 1:
            self.save_checkpoint(os.path.join(self.output_folder, "checkpoint_latest.pth"))
        if np.isfinite(va) and (self._best_ema is None or va < self._best_ema):
            self._best_ema = va
            self.save_checkpoint(os.path.join(self.output_folder, "checkpoint_best.pth"))

    # -- loop ----------------------------------------------------------------------------------------------
    def run_training(self):
        self.on_train_start()
        for epoch in range(self.current_epoch, self.num_epochs):
            self.on_epoch_start()
            self.on_train_epoch_start()
            outputs = []
            bar = tqdm(range(self.num_iterations_per_epoch), desc=f"epoch {epoch + 1}/{self.num_epochs}",
                       disable=self.local_rank != 0 or not self.show_progress, leave=False)
            for it in bar:
                self.iteration_in_epoch = it
                outputs.append(self.train_step(next(self.dataloader_train)))
                if "loss" in outputs[-1]:
                    bar.set_postfix(loss=f"{float(outputs[-1]['loss']):.4f}")
            self.iteration_in_epoch = self.num_iterations_per_epoch
            self.on_train_epoch_end(outputs)
            with torch.no_grad():
                self.on_validation_epoch_start()
                val_outputs = [self.validation_step(next(self.dataloader_val))
                               for _ in range(self.num_val_iterations_per_epoch)]
                self.on_validation_epoch_end(val_outputs)
            self.on_epoch_end()
        self.on_train_end()


def ddp_setup_from_env() -> bool:
    """Initialise torch.distributed from torchrun's environment (gloo on CPU, nccl on GPU).

    Returns True when running distributed. Must be called before constructing a trainer.
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) < 2:
        return False
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return True
