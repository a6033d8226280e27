"""Self-supervised pretraining with any registered pretext task, as a :class:`TrainingTask`.

:class:`PretextTrainingTask` wraps a :class:`~nnpre_trainers.pretext.base.PretextTask`
(:func:`~nnpre_trainers.pretext.registry.get_pretext`):

* network: the plans' U-Net with ``pretext.num_output_channels(C)`` outputs and
  ``C + pretext.num_extra_input_channels()`` inputs, no deep supervision, plus the task's conditioning module
  (e.g. the diffusion timestep embedding) as ``nnpre_conditioning`` — outside ``encoder.*``, so encoder keys
  stay those of a plain U-Net;
* data: :class:`~nnpre_trainers.pretext_data.PretextPatchLoader` (random patches of the preprocessed images,
  corrupted in the loader workers; labels are never read);
* loss: ``pretext.loss(pretext.forward(network, sample), sample)``;
* checkpoints carry ``nnssl_adaptation_plan`` (architecture, encoder/stem keys, spacing, patch, normalisation,
  channels, pretext task and config); a loss curve ``progress_pretrain.png`` every epoch and middle-slice
  previews ``previews/epoch_XXXX.png`` every ``preview_every`` epochs (default: the checkpoint interval).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from torch import Tensor, nn

from nnpre.adaptation_plan import from_nnunet_plans
from nnpre_trainers.loaders import start_augmenters
from nnpre_trainers.pretext import PretextSample, get_pretext
from nnpre_trainers.pretext.base import CONDITIONING_ATTR, PretextTask
from nnpre_trainers.pretext_data import PretextPatchLoader
from nnpre_trainers.tasks.base import TaskContext, TrainingTask
from nnpre_trainers.train_step import autocast_for

#: Offset of the validation loader's seed (any fixed prime: a different stream than training).
VAL_SEED_OFFSET = 7919


class PretextTrainingTask(TrainingTask):
    """Pretrain with ``pretext`` (a :class:`PretextTask` or a registry name + config overrides)."""

    recipe = "pretrain"
    needs_labels = False

    def __init__(self, pretext: PretextTask | str = "mae", preview_every: Optional[int] = None, **config):
        self.pretext = get_pretext(pretext, **config) if isinstance(pretext, str) else pretext
        self.name = f"pretext:{self.pretext.name}"
        self.preview_every = preview_every
        self.last_val: Optional[tuple] = None

    # -- model -------------------------------------------------------------------------------------------
    def build_network(self, ctx: TaskContext) -> nn.Module:
        cm = ctx.configuration_manager
        c = ctx.num_input_channels
        net = get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                     cm.network_arch_init_kwargs_req_import,
                                     c + self.pretext.num_extra_input_channels(), self.pretext.num_output_channels(c),
                                     allow_init=True, deep_supervision=False)
        cond = self.pretext.build_conditioning(net)
        if cond is not None:
            setattr(net, CONDITIONING_ATTR, cond)
        return net

    def prepare_batch(self, batch: dict, device: torch.device) -> PretextSample:
        nb = device.type == "cuda"
        mask = batch.get("loss_mask")
        return PretextSample(input=batch["data"].to(device, non_blocking=nb),
                             target=batch["target"].to(device, non_blocking=nb),
                             loss_mask=None if mask is None else mask.to(device, non_blocking=nb),
                             extras={k: (v.to(device) if torch.is_tensor(v) else v)
                                     for k, v in (batch.get("extras") or {}).items()})

    def compute_losses(self, network: nn.Module, inputs: PretextSample) -> Dict[str, Tensor]:
        pred = self.pretext.forward(network, inputs)
        return {"loss": self.pretext.loss(pred.float(), inputs)}

    # -- data ----------------------------------------------------------------------------------------------
    def get_dataloaders(self, trainer, train_keys: List[str], val_keys: List[str]):
        from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA

        ds = trainer.dataset_class(trainer.preprocessed_dataset_folder, None,
                                   folder_with_segs_from_previous_stage=None)
        ps = trainer.configuration_manager.patch_size
        seed = trainer.seed + 1000 * trainer.local_rank
        dl_tr = PretextPatchLoader(ds, train_keys, trainer.batch_size, ps, self.pretext, seed=seed)
        dl_val = PretextPatchLoader(ds, val_keys, trainer.batch_size, ps, self.pretext, seed=seed + VAL_SEED_OFFSET,
                                    mirror=False)
        return start_augmenters(dl_tr, dl_val, seed, get_allowed_n_proc_DA(), trainer.device.type == "cuda")

    # -- validation and pictures -----------------------------------------------------------------------------
    def validation_step(self, trainer, batch: dict) -> dict:
        sample = self.prepare_batch(batch, trainer.device)
        with autocast_for(trainer.device, trainer.amp):
            pred = self.pretext.forward(trainer.network, sample)
            loss = self.pretext.loss(pred.float(), sample)
        self.last_val = (sample, pred)
        return {"loss": float(loss.detach().float().cpu())}

    def on_epoch_end(self, trainer) -> None:
        trainer.end_loss_epoch()  # best = lowest validation loss
        e = trainer.current_epoch
        every = self.preview_every or max(1, trainer.save_every)
        if trainer.local_rank == 0:
            self._plot_losses(trainer)
            if (e + 1) % every == 0 or e == trainer.num_epochs - 1:
                self._save_preview(trainer, e)
        trainer.current_epoch += 1

    def final_validation(self, trainer, save_probabilities: bool = False) -> None:
        trainer.print_to_log_file("pretraining: no segmentation validation to perform")

    # -- checkpoints -----------------------------------------------------------------------------------------
    def config_dict(self) -> Dict[str, Any]:
        """The pretext config as plain values (tuples → lists; non-plain fields dropped)."""
        cfg = getattr(self.pretext, "config", None)
        if cfg is None:
            return {}
        if dataclasses.is_dataclass(cfg):
            cfg = dataclasses.asdict(cfg)
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(cfg).items()
                if isinstance(v, (int, float, str, bool, list, tuple, type(None)))}

    def checkpoint_extras(self, trainer) -> Dict[str, Any]:
        plan = from_nnunet_plans(trainer.plans_manager.plans, trainer.configuration_name, trainer.num_input_channels,
                                 pretext=self.pretext.name, pretext_config=self.config_dict(),
                                 channel_names=trainer.dataset_json.get("channel_names"))
        d = plan.to_dict()
        patch = list(trainer.configuration_manager.patch_size)
        seen = self.pretext.network_patch_size(patch) if hasattr(self.pretext, "network_patch_size") else patch
        for cfg in (d.get("pretrain_plan") or {}).get("configurations", {}).values():
            if isinstance(cfg, dict) and "patch_size" in cfg:
                cfg["patch_size"] = [int(p) for p in seen]  # the patch the network saw (VoCo: its crops; nnssl)
        d.setdefault("nnpre", {})
        if isinstance(d.get("nnpre"), dict):
            d["nnpre"]["extra_input_channels"] = int(self.pretext.num_extra_input_channels())
        return {"nnssl_adaptation_plan": d}

    def _plot_losses(self, trainer) -> None:
        from matplotlib.ticker import MaxNLocator

        from nnpre.plotting import figure_style, legend_outside, new_figure, save_figure

        # nnU-Net's MetaLogger.get_value(key, None): every epoch's value, from its local logger
        train, val = (list(trainer.logger.get_value(k, None)) for k in ("train_losses", "val_losses"))
        with figure_style():  # own style: nnU-Net's progress plot sets seaborn's font_scale=2.5 globally
            fig = new_figure(6, 4)
            ax = fig.add_subplot(1, 1, 1)
            ep = np.arange(1, len(train) + 1)
            ax.plot(ep, train, "-o", label="train")
            ax.plot(ep, val[: len(ep)], "-o", label="validation")
            ax.set_xlabel("epoch")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
            ax.set_ylabel(f"{self.pretext.name} loss")
            ax.set_title(f"Pretraining ({self.pretext.name})")
            legend_outside(ax)
            save_figure(fig, os.path.join(trainer.output_folder, "progress_pretrain.png"), dpi=90)

    def _save_preview(self, trainer, epoch: int) -> None:
        if self.last_val is None:
            return
        from nnpre.plotting import figure_style, new_figure, save_figure

        sample, pred = self.last_val
        vols = self.pretext.preview(sample, pred.float())
        with figure_style():
            fig = new_figure(3 * len(vols), 3.2)
            for i, (name, v) in enumerate(vols.items()):
                ax = fig.add_subplot(1, len(vols), i + 1)
                v = v.detach().float().cpu().numpy()
                ax.imshow(v[v.shape[0] // 2], cmap="gray")
                ax.set_title(name)
                ax.axis("off")
            fig.suptitle(f"{self.pretext.name}, epoch {epoch + 1}")
            out = os.path.join(trainer.output_folder, "previews", f"epoch_{epoch + 1:04d}.png")
            save_figure(fig, out, dpi=80)
