"""Segmentation fine-tuning from a pretrained encoder, with the schedule given as data.

``nnPreFineTuneTrainer`` is nnU-Net's trainer with:

* encoder-only loading (:func:`nnpre.weight_transfer.transfer_encoder`) from nnpre, nnssl/OpenMind or
  nnU-Net checkpoints, including stem remapping when input channels differ; the transfer report is
  printed and saved as ``pretrained_transfer.json`` in the run folder;
* a :class:`~nnpre_trainers.finetune_schedule.FinetuneSchedule` evaluated per iteration: by default
  the first 5 % of all iterations train decoder + seg heads (+ a remapped stem) only — the encoder stays
  bit-identical — then the whole network with a linear warm-up and poly decay (SGD, momentum 0.99,
  Nesterov; lr 1e-3 pretrained, 1e-2 from scratch; pretraining.md §2.3);
* deep supervision off (as nnU-Net's ``PretrainedTrainer``);
* ``--c`` resumes into the right stage: the stage's optimizer is rebuilt before its state is loaded;
* deterministic few-label subsets (``num_train_cases`` / ``fraction``) of the fold's training cases.

Stock ``nnUNetv2_train ... -tr nnPreFineTuneTrainer`` works too (``nnUNet_extTrainer`` pointing at
``nnpre_trainers.EXT_TRAINER_DIR``); the pretrained checkpoint then comes from the environment variable
``nnPre_pretrained`` (stock ``-pretrained_weights`` would load the whole network instead).
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from batchgenerators.utilities.file_and_folder_operations import join

from nnpre.atomic import write_json
from nnpre.errors import fail
from nnpre.presets import preset_from_plans
from nnpre.weight_transfer import TransferReport, transfer_encoder
from nnpre_trainers.base import nnPreTrainerBase
from nnpre_trainers.finetune_schedule import FinetuneSchedule, default_schedule, parameter_groups

#: Seed of the few-label subset permutation (nnU-Net's split seed).
SUBSET_SEED = 12345


def pretrained_tag(path: str) -> str:
    """Short run-folder name of a pretrained checkpoint.

    nnU-Net-style ``.../<Trainer>__<Plans>__<cfg>/fold_X/checkpoint_final.pth`` → ``<Trainer>``; any other file
    → its name without extension (``/data/openmind_mae.pth`` → ``openmind_mae``).
    """
    stem = os.path.basename(path)
    for ext in (".pth", ".pt", ".ckpt"):
        if stem.endswith(ext):
            stem = stem[: -len(ext)]
    parent = os.path.basename(os.path.dirname(os.path.abspath(path)))
    if stem.startswith("checkpoint_") and (parent.startswith("fold_") or parent == "fold_all"):
        return os.path.basename(os.path.dirname(os.path.dirname(os.path.abspath(path)))).split("__")[0] or stem
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in stem) or "pretrained"


class nnPreFineTuneTrainer(nnPreTrainerBase):
    """Fine-tune the plans' U-Net from a pretrained encoder (or from scratch); see the module doc."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.enable_deep_supervision = False
        self.pretrained_path: Optional[str] = os.environ.get("nnPre_pretrained") or None
        self.from_scratch = self.pretrained_path is None
        self.num_train_cases: Optional[int] = None
        self.fraction: Optional[float] = None
        self.schedule: Optional[FinetuneSchedule] = None
        self.transfer_report: Optional[TransferReport] = None
        self.stage_index: Optional[int] = None

    # -- configuration -------------------------------------------------------------------------------------
    def configure_finetuning(self, pretrained: Optional[str] = None, from_scratch: bool = False,
                             num_train_cases: Optional[int] = None, fraction: Optional[float] = None,
                             schedule: Optional[FinetuneSchedule] = None, tag: Optional[str] = None) -> None:
        """Choose the source and the labelled subset; call before training. Sets a distinct run folder
        ``<Trainer>__<Plans>__<config>__<tag>`` so pretrained / scratch / few-label runs don't collide."""
        if self.was_initialized:
            fail("configure_finetuning must be called before training starts")
        if pretrained and from_scratch:
            fail("--pretrained and --from-scratch exclude each other")
        if not pretrained and not from_scratch:
            fail("give a pretrained checkpoint (--pretrained CKPT) or --from-scratch")
        if pretrained and not os.path.isfile(pretrained):
            fail(f"pretrained checkpoint {pretrained} does not exist")
        if num_train_cases is not None and num_train_cases < 1:
            fail(f"--num-train-cases must be >= 1, got {num_train_cases}")
        if fraction is not None and not 0 < fraction <= 1:
            fail(f"--fraction must be in (0, 1], got {fraction}")
        self.pretrained_path = pretrained
        self.from_scratch = bool(from_scratch)
        self.num_train_cases, self.fraction = num_train_cases, fraction
        self.schedule = schedule
        if tag is None:
            tag = "scratch" if from_scratch else "pt_" + pretrained_tag(pretrained)
            if num_train_cases is not None:
                tag += f"_n{num_train_cases}"
            elif fraction is not None:
                tag += f"_f{fraction:g}"
        self._set_run_folder(tag)

    def _set_run_folder(self, tag: str) -> None:
        old_folder, old_log = self.output_folder, self.log_file
        base = os.path.dirname(old_folder)
        self.output_folder_base = base + "__" + tag
        self.output_folder = join(self.output_folder_base, os.path.basename(old_folder))
        os.makedirs(self.output_folder, exist_ok=True)
        self.log_file = join(self.output_folder, os.path.basename(old_log))
        # nnU-Net's __init__ created the untagged run folder and wrote its citation banner to the log there:
        # move that log along and drop the folder when nothing else is in it.
        try:  # (DDP ranks may race here: whoever comes second finds nothing to do)
            if os.listdir(old_folder) == [os.path.basename(old_log)] and not os.path.exists(self.log_file):
                os.replace(old_log, self.log_file)
        except OSError:
            pass
        for empty in (old_folder, base):
            try:
                os.rmdir(empty)
            except OSError:
                break
        self.logger.output_folder = self.output_folder if hasattr(self.logger, "output_folder") else None

    # -- network and optimizer -----------------------------------------------------------------------------
    def build_network(self):
        net = super().build_network()
        if not self.from_scratch:
            self.load_pretrained_encoder(net)
        return net

    def load_pretrained_encoder(self, net: torch.nn.Module) -> None:
        """Encoder-only transfer from ``pretrained_path`` into ``net``; the report is logged and saved as
        ``pretrained_transfer.json`` in the run folder (rank 0)."""
        self.transfer_report = transfer_encoder(self.pretrained_path, net, self.dataset_json.get("channel_names"))
        if self.local_rank == 0:
            self.print_to_log_file(self.transfer_report.summary())
            self.transfer_report.save(join(self.output_folder, "pretrained_transfer.json"))

    def _parameter_groups(self):
        remapped = bool(self.transfer_report is not None and self.transfer_report.stem_remapped)
        return parameter_groups(self.unwrapped_network if self.was_initialized else self.network, remapped)

    def _optimizer_for_stage(self, index: int, iteration: int) -> torch.optim.Optimizer:
        stage = self.schedule.stages[index]
        groups = self._parameter_groups()
        trainable: List[torch.nn.Parameter] = []
        for g, items in groups.items():
            on = g in stage.trains
            for _, p in items:
                # Under DDP every parameter keeps requires_grad (DDP fixes its set at wrap time); frozen ones
                # are simply not in the optimizer, so neither the step, momentum nor weight decay touches them.
                p.requires_grad_(on or self.is_ddp)
                if on:
                    trainable.append(p)
                else:
                    p.grad = None
        self.stage_index = index
        self.print_to_log_file(f"fine-tuning stage {index} '{stage.name}' from iteration {iteration}: trains "
                               f"{', '.join(stage.trains)} ({sum(p.numel() for p in trainable)} parameters)")
        return self.schedule.build_optimizer(trainable, iteration)

    def configure_optimizers(self):
        if self.schedule is None:
            preset = preset_from_plans(self.plans_manager.plans)
            kw = {} if preset.finetune_lr is None else {"base_lr": preset.finetune_lr[0 if self.from_scratch else 1]}
            self.schedule = default_schedule(self.total_iterations, pretrained=not self.from_scratch,
                                             optimizer=preset.finetune_optimizer, **kw)
        idx, _ = self.schedule.stage_at(self.global_iteration)
        return self._optimizer_for_stage(idx, self.global_iteration), None

    def _enter_iteration(self, iteration: int) -> None:
        idx, _ = self.schedule.stage_at(iteration)
        if idx != self.stage_index:
            self.optimizer = self._optimizer_for_stage(idx, iteration)  # new SGD per stage (sawtooth recipe)
        lr = self.schedule.lr_at(iteration)
        for g in self.optimizer.param_groups:
            g["lr"] = lr

    def on_train_epoch_start(self):
        self.network.train()
        self._enter_iteration(self.global_iteration)
        self.print_to_log_file("")
        self.print_to_log_file(f"Epoch {self.current_epoch}")
        self.print_to_log_file(f"Current learning rate: {np.round(self.optimizer.param_groups[0]['lr'], decimals=6)}")
        self.logger.log("lrs", self.optimizer.param_groups[0]["lr"], self.current_epoch)

    def train_step(self, batch: dict) -> dict:
        self._enter_iteration(self.global_iteration)
        return super().train_step(batch)

    # -- few-label subsets ---------------------------------------------------------------------------------
    def do_split(self):
        tr, val = super().do_split()
        n = None
        if self.num_train_cases is not None:
            n = self.num_train_cases
        elif self.fraction is not None:
            n = max(1, int(round(self.fraction * len(tr))))
        if n is not None:
            if n > len(tr):
                fail(f"--num-train-cases {n} exceeds the {len(tr)} training cases of fold {self.fold}")
            order = np.random.default_rng(SUBSET_SEED).permutation(sorted(tr))
            tr = sorted(order[:n].tolist())
            if self.local_rank == 0:
                write_json({"train": tr, "val": list(val)}, join(self.output_folder, "train_cases.json"))
        return tr, val

    # -- checkpoints ---------------------------------------------------------------------------------------
    def checkpoint_extras(self) -> Dict[str, Any]:
        return {"nnpre_finetune": {
            "schedule": self.schedule.to_dict() if self.schedule else None,
            "stage_index": self.stage_index,
            "pretrained": self.pretrained_path,
            "from_scratch": self.from_scratch,
            "num_train_cases": self.num_train_cases,
            "fraction": self.fraction,
            "stem_remapped": bool(self.transfer_report is not None and self.transfer_report.stem_remapped),
        }}

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        from nnpre.checkpoints import safe_load

        ck = safe_load(filename_or_checkpoint) if isinstance(filename_or_checkpoint, (str, os.PathLike)) \
            else filename_or_checkpoint
        info = ck.get("nnpre_finetune") or {}
        if not self.was_initialized:
            self.initialize()
        if info.get("schedule"):
            self.schedule = FinetuneSchedule.from_dict(info["schedule"])
        # Rebuild the optimizer of the stage the checkpoint was in *before* loading its state (--c).
        iteration = int(ck["current_epoch"]) * self.num_iterations_per_epoch
        idx, _ = self.schedule.stage_at(max(0, iteration - 1)) if info.get("stage_index") is None \
            else (int(info["stage_index"]), None)
        self.optimizer = self._optimizer_for_stage(idx, iteration)
        super().load_checkpoint(ck)
