"""One thin nnU-Net trainer that pretrains with any registered pretext task.

``nnPrePretrainTrainer`` keeps everything nnU-Net gives (plans, logging, ``--c``, DDP, output folder
layout ``nnUNet_results/<Dataset>/<Trainer>__<Plans>__<config>/fold_<f>``) and swaps three things:

* the network: the plans' U-Net with ``pretext.num_output_channels(C)`` outputs, no deep supervision,
  plus the task's conditioning module (e.g. the diffusion timestep embedding) registered as
  ``nnpre_conditioning`` — outside ``encoder.*``, so encoder keys stay those of a plain U-Net;
* the data: :class:`nnpre_trainers.pretext_data.PretextPatchLoader` streams random patches from the
  preprocessed blosc2 files and corrupts them in background workers; labels are never read;
* the step: ``pretext.forward`` / ``pretext.loss``; gradient clipping at 12 as nnU-Net/nnssl.

Checkpoints additionally carry ``nnssl_adaptation_plan`` (architecture, keys to encoder/stem/in-proj,
pretraining spacing, patch, normalisation, input channels, pretext task and config) and load with
``torch.load(..., weights_only=True)``. A PNG loss curve (``progress_pretrain.png``) is updated every
epoch and a preview PNG of middle slices (``previews/epoch_XXXX.png``) is written every
``preview_every`` epochs.
"""
from __future__ import annotations

import os
from typing import Any, ClassVar, Dict

import numpy as np
import torch
from batchgenerators.dataloading.multi_threaded_augmenter import MultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA
from nnunetv2.utilities.helpers import dummy_context
from torch import autocast, nn

from nnpre.adaptation_plan import from_nnunet_plans
from nnpre.errors import fail
from nnpre_trainers.base import nnPreTrainerBase
from nnpre_trainers.pretext import PretextSample, get_pretext
from nnpre_trainers.pretext_data import PretextPatchLoader


class nnPrePretrainTrainer(nnPreTrainerBase):
    """Pretrain the plans' U-Net with the pretext task named by ``pretext_name`` (see module doc)."""

    #: registry name of the pretext task; thin aliases (nnPreTrainer_MAE, ...) set it.
    pretext_name: ClassVar[str] = "mae"
    #: gradient-norm clip (nnU-Net and nnssl: 12).
    grad_clip: ClassVar[float] = 12.0

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.enable_deep_supervision = False
        self.pretext = get_pretext(self.pretext_name)
        self.seed = 12345
        self.preview_every = max(1, self.save_every)
        self.output_folder_pretrain = self.output_folder

    def set_pretext(self, name: str, **config) -> None:
        """Replace the pretext task (before ``initialize``), e.g. with overridden hyperparameters."""
        if self.was_initialized:
            fail("the pretext task must be chosen before training starts")
        self.pretext = get_pretext(name, **config)

    # -- network / loss ------------------------------------------------------------------------------------
    def build_network(self) -> nn.Module:
        n_in = self.num_input_channels + self.pretext.num_extra_input_channels()
        net = self.build_plans_network(n_in, self.pretext.num_output_channels(self.num_input_channels), False)
        cond = self.pretext.build_conditioning(net)
        if cond is not None:
            net.nnpre_conditioning = cond
        return net

    def _build_loss(self):
        return self.pretext.loss

    def set_deep_supervision_enabled(self, enabled: bool):
        mod = self.unwrapped_network
        if hasattr(mod, "decoder") and hasattr(mod.decoder, "deep_supervision"):
            mod.decoder.deep_supervision = False

    # -- data ----------------------------------------------------------------------------------------------
    def get_dataloaders(self):
        tr_keys, val_keys = self.do_split()
        ds = self.dataset_class(self.preprocessed_dataset_folder, None,
                                folder_with_segs_from_previous_stage=None)
        ps = self.configuration_manager.patch_size
        seed = self.seed + 1000 * self.local_rank
        dl_tr = PretextPatchLoader(ds, tr_keys, self.batch_size, ps, self.pretext, seed=seed)
        dl_val = PretextPatchLoader(ds, val_keys, self.batch_size, ps, self.pretext, seed=seed + 7919, mirror=False)
        n = get_allowed_n_proc_DA()
        if n == 0:
            return SingleThreadedAugmenter(dl_tr, None), SingleThreadedAugmenter(dl_val, None)
        # batchgenerators' MultiThreadedAugmenter returns batches round-robin: reproducible for a fixed seed.
        loaders = (MultiThreadedAugmenter(dl_tr, None, n, 6, None, pin_memory=self.device.type == "cuda"),
                   MultiThreadedAugmenter(dl_val, None, max(1, n // 2), 3, None, pin_memory=self.device.type == "cuda"))
        # Fork the workers now, before this process runs any multi-threaded torch op: a worker forked later
        # (the validation one, lazily at the end of epoch 1) can deadlock in OpenMP. nnU-Net does the same by
        # drawing one batch from each augmenter in its get_dataloaders.
        for loader in loaders:
            loader._start()
        return loaders

    def _to_sample(self, batch: dict) -> PretextSample:
        dev = self.device
        nb = dev.type == "cuda"
        mask = batch.get("loss_mask")
        return PretextSample(input=batch["data"].to(dev, non_blocking=nb), target=batch["target"].to(dev, non_blocking=nb),
                             loss_mask=None if mask is None else mask.to(dev, non_blocking=nb),
                             extras={k: (v.to(dev) if torch.is_tensor(v) else v)
                                     for k, v in (batch.get("extras") or {}).items()})

    # -- steps ---------------------------------------------------------------------------------------------
    def _autocast(self):
        return autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context()

    def train_step(self, batch: dict) -> dict:
        sample = self._to_sample(batch)
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            pred = self.pretext.forward(self.network, sample)
            loss = self.pretext.loss(pred.float(), sample)
        if not torch.isfinite(loss):
            fail(f"non-finite pretraining loss at epoch {self.current_epoch} (cases {batch.get('keys')}); check the "
                 f"images for NaNs/constant volumes or lower the learning rate")
        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
            self.grad_scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), self.grad_clip)
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), self.grad_clip)
            self.optimizer.step()
        return {"loss": loss.detach().cpu().numpy()}

    def validation_step(self, batch: dict) -> dict:
        sample = self._to_sample(batch)
        with self._autocast():
            pred = self.pretext.forward(self.network, sample)
            loss = self.pretext.loss(pred.float(), sample)
        self._last_val = (sample, pred)
        return {"loss": loss.detach().cpu().numpy()}

    def on_validation_epoch_end(self, val_outputs):
        self.log_mean_val_loss(val_outputs)

    def on_epoch_end(self):
        self.end_loss_epoch()  # best = lowest validation loss for pretraining
        e = self.current_epoch
        if self.local_rank == 0:
            self._plot_losses()
            if (e + 1) % self.preview_every == 0 or e == self.num_epochs - 1:
                self._save_preview(e)
        self.current_epoch += 1

    def perform_actual_validation(self, save_probabilities: bool = False):
        self.print_to_log_file("pretraining: no segmentation validation to perform")

    # -- checkpoints ---------------------------------------------------------------------------------------
    def checkpoint_extras(self) -> Dict[str, Any]:
        plan = from_nnunet_plans(self.plans_manager.plans, self.configuration_name, self.num_input_channels,
                                 pretext=self.pretext.name, pretext_config=self.pretext_config(),
                                 channel_names=self.dataset_json.get("channel_names"))
        d = plan.to_dict()
        d.setdefault("nnpre", {})
        if isinstance(d.get("nnpre"), dict):
            d["nnpre"]["extra_input_channels"] = int(self.pretext.num_extra_input_channels())
        return {"nnssl_adaptation_plan": d}

    def pretext_config(self) -> dict:
        cfg = getattr(self.pretext, "config", None)
        if cfg is None:
            return {}
        if hasattr(cfg, "__dataclass_fields__"):
            from dataclasses import asdict

            cfg = asdict(cfg)
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(cfg).items()
                if isinstance(v, (int, float, str, bool, list, tuple, type(None)))}

    # -- pictures ------------------------------------------------------------------------------------------
    def _plot_losses(self) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from nnpre.atomic import write_with

        log = self.logger.local_logger.my_fantastic_logging
        fig, ax = plt.subplots(figsize=(6, 4))
        ep = np.arange(1, len(log["train_losses"]) + 1)
        ax.plot(ep, log["train_losses"], "-o", label="train")
        ax.plot(ep, log["val_losses"][: len(ep)], "-o", label="validation")
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"{self.pretext.name} loss")
        ax.set_title(f"Pretraining ({self.pretext.name})")
        ax.legend()
        fig.tight_layout()
        write_with(lambda p: fig.savefig(p, dpi=90), os.path.join(self.output_folder, "progress_pretrain.png"))
        plt.close(fig)

    def _save_preview(self, epoch: int) -> None:
        last = getattr(self, "_last_val", None)
        if last is None:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from nnpre.atomic import write_with

        sample, pred = last
        vols = self.pretext.preview(sample, pred.float())
        fig, axes = plt.subplots(1, len(vols), figsize=(3 * len(vols), 3.2))
        axes = np.atleast_1d(axes)
        for ax, (name, v) in zip(axes, vols.items()):
            v = v.detach().float().cpu().numpy()
            ax.imshow(v[v.shape[0] // 2], cmap="gray")
            ax.set_title(name)
            ax.axis("off")
        fig.suptitle(f"{self.pretext.name}, epoch {epoch + 1}")
        fig.tight_layout()
        out = os.path.join(self.output_folder, "previews", f"epoch_{epoch + 1:04d}.png")
        write_with(lambda p: fig.savefig(p, dpi=80), out)
        plt.close(fig)
