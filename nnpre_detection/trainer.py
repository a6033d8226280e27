"""Retina U-Net training on an nnU-Net planned dataset (``nnPre_train detect``).

``nnPreDetectionTrainer`` reuses the fine-tuning trainer's machinery (data-driven schedule, encoder-only
transfer from a pretrained checkpoint, few-label subsets, stage-aware resume) and swaps:

* the network: :func:`nnpre_detection.retina_unet.build_retina_unet` from the plans' architecture entry, one
  detection class per nnU-Net foreground label (label ``v`` -> class ``v - 1``); anchor sizes are fitted to the
  fold's training boxes with :func:`nnpre_detection.anchors.plan_anchors` (as nnDetection's planner does);
* the step: nnU-Net's data loader / augmentation with deep supervision off; each sample's (X, Y, Z) seg patch
  becomes instances (26-connected components, :func:`semantic_to_instances`) and boxes
  (:func:`boxes_from_instances`, nnDetection ``min - 1`` / ``max + 1``); the loss is the detector's ``loss``;
* validation: mean validation loss per epoch (no Dice); ``checkpoint_best`` = lowest validation loss;
  no sliding-window segmentation validation at the end.

With pretrained weights the DKFZ schedule applies (5 % decoder + heads only, then the whole network; lr 1e-3);
without, nnU-Net's SGD poly schedule (lr 1e-2). Checkpoints carry ``nnpre_detection`` (number of classes,
anchor sizes, detector config, plans, dataset.json, configuration name) so :mod:`nnpre_detection.inference`
can rebuild the model from the checkpoint alone.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from nnunetv2.utilities.helpers import dummy_context
from torch import autocast

from nnpre.errors import fail
from nnpre.presets import preset_from_plans
from nnpre_detection.instances import boxes_from_instances, semantic_to_instances
from nnpre_detection.retina_unet import build_retina_unet
from nnpre_trainers.base import to_plain
from nnpre_trainers.finetune_trainer import nnPreFineTuneTrainer

#: Gradient-norm clip (nnU-Net / nnDetection use 12).
GRAD_CLIP = 12.0


def targets_from_seg(seg: torch.Tensor) -> List[dict]:
    """Detection targets of a batch of semantic seg patches.

    Args:
        seg: (B, 1, X, Y, Z) or (B, X, Y, Z) semantic labels (0 = background, ``v > 0`` = class ``v - 1``;
            negative values, nnU-Net's padding marker, count as background).

    Returns:
        list of B dicts ``{"boxes": (N, 6) float32 (nnDetection layout, patch voxel coords), "labels": (N,)
        long, "seg": (X, Y, Z) long}``.
    """
    seg = seg.detach().cpu()
    if seg.ndim == 5:
        seg = seg[:, 0]
    out = []
    for s in seg:
        s_np = np.clip(s.numpy().round().astype(np.int64), 0, None)
        inst, mapping = semantic_to_instances(s_np)
        boxes, ids = boxes_from_instances(inst)
        labels = np.array([mapping[int(i)] for i in ids], dtype=np.int64)
        out.append({"boxes": torch.from_numpy(boxes).reshape(-1, 6), "labels": torch.from_numpy(labels),
                    "seg": torch.from_numpy(s_np)})
    return out


class nnPreDetectionTrainer(nnPreFineTuneTrainer):
    """Train a Retina U-Net detector (see the module doc). Same constructor as nnU-Net's trainers."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.enable_deep_supervision = False
        self.num_detection_classes = max(1, len(self.label_manager.foreground_labels))
        self.anchor_sizes = None  # None: planned from the training boxes (or nnDetection's initial sizes)
        self.plan_anchors = True
        self.detector_overrides: Dict[str, Any] = {}
        self.grad_clip = GRAD_CLIP
        self._configured = False

    def configure_detection(self, pretrained: Optional[str] = None, num_train_cases: Optional[int] = None,
                            tag: Optional[str] = None, plan_anchors: bool = True, **detector_overrides) -> None:
        """Choose the encoder source and the labelled subset; call before training.

        Args:
            pretrained: checkpoint whose encoder is transferred (nnpre, nnssl or nnU-Net); ``None`` = scratch.
            num_train_cases: use only this many training cases of the fold (deterministic subset).
            tag: run-folder suffix (default ``scratch`` / ``pt_<source>`` [+ ``_n<N>``]).
            plan_anchors: fit anchor sizes to the training cases' boxes (nnDetection does); False = nnDetection's
                initial sizes (4, 8, 16) per axis scaled per level.
            **detector_overrides: :class:`~nnpre_detection.retina_unet.RetinaUNetConfig` fields.
        """
        self.detector_overrides = dict(detector_overrides)
        self.plan_anchors = bool(plan_anchors)
        self.configure_finetuning(pretrained=pretrained, from_scratch=pretrained is None,
                                  num_train_cases=num_train_cases, tag=tag)
        self._configured = True

    # -- network -------------------------------------------------------------------------------------------
    def training_boxes(self) -> np.ndarray:
        """(N, 6) boxes of every instance in the fold's training cases (preprocessed voxel space)."""
        tr_keys, _ = self.do_split()
        ds = self.dataset_class(self.preprocessed_dataset_folder, tr_keys)
        boxes = [targets_from_seg(torch.as_tensor(np.asarray(ds.load_case(k)[1]))[None])[0]["boxes"].numpy()
                 for k in tr_keys]
        return np.concatenate(boxes) if boxes else np.zeros((0, 6), dtype=np.float32)

    def _planned_anchor_sizes(self, net):
        from nnpre_detection.anchors import plan_anchors, relative_level_factors

        boxes = self.training_boxes()
        if boxes.shape[0] == 0:
            self.print_to_log_file("no training boxes: using nnDetection's default anchor sizes")
            return None
        strides = [tuple(s) for s in net.encoder.strides]
        plan = plan_anchors(boxes, relative_level_factors(strides, net.decoder_levels))
        self.print_to_log_file(f"anchor sizes planned from {boxes.shape[0]} training boxes: {plan.sizes_per_level()[0]}")
        return plan

    def build_network(self):
        if self.dataset_class is None:
            from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

            self.dataset_class = infer_dataset_class(self.preprocessed_dataset_folder)
        cm = self.configuration_manager
        head = preset_from_plans(self.plans_manager.plans).detector_head_channels
        if head is not None and "head_channels" not in self.detector_overrides:
            self.detector_overrides["head_channels"] = int(head)  # preset-scaled towers (see nnpre.presets)
        if self.anchor_sizes is None and self.plan_anchors:
            probe = build_retina_unet(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                      self.num_input_channels, self.num_detection_classes,
                                      arch_kwargs_req_import=cm.network_arch_init_kwargs_req_import,
                                      **self.detector_overrides)
            self.anchor_sizes = self._planned_anchor_sizes(probe)
        net = build_retina_unet(cm.network_arch_class_name, cm.network_arch_init_kwargs, self.num_input_channels,
                                self.num_detection_classes, anchor_sizes=self.anchor_sizes,
                                arch_kwargs_req_import=cm.network_arch_init_kwargs_req_import,
                                **self.detector_overrides)
        if not self.from_scratch:
            self.load_pretrained_encoder(net)
        return net

    def set_deep_supervision_enabled(self, enabled: bool):
        """The detector has no deep supervision (nnU-Net would poke ``decoder.deep_supervision``)."""

    # -- steps ---------------------------------------------------------------------------------------------
    def _autocast(self):
        return autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context()

    def _batch(self, batch: dict):
        data = batch["data"].to(self.device, non_blocking=self.device.type == "cuda")
        target = batch["target"]
        if isinstance(target, (list, tuple)):
            target = target[0]
        targets = targets_from_seg(target)
        targets = [{k: v.to(self.device) for k, v in t.items()} for t in targets]
        return data, targets

    def train_step(self, batch: dict) -> dict:
        self._enter_iteration(self.global_iteration)
        data, targets = self._batch(batch)
        self.network.train()
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            loss = self.network(data, targets)["loss"]
        if not torch.isfinite(loss):
            fail(f"non-finite detection loss at epoch {self.current_epoch} (cases {batch.get('keys')}); check the "
                 f"images for NaNs or lower the learning rate")
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
        data, targets = self._batch(batch)
        # the loss needs training mode (matching/sampling); no_grad is set by the caller, and with
        # nnU-Net's InstanceNorm there are no running statistics that training mode would change.
        self.network.train()
        with self._autocast():
            loss = self.network(data, targets)["loss"]
        return {"loss": loss.detach().cpu().numpy()}

    def on_validation_epoch_end(self, val_outputs):
        self.log_mean_val_loss(val_outputs)

    def on_epoch_end(self):
        self.end_loss_epoch()
        self.current_epoch += 1

    def perform_actual_validation(self, save_probabilities: bool = False):
        self.print_to_log_file("detection: no segmentation validation; run nnPre_predict + nnPre_evaluate")

    # -- checkpoints ---------------------------------------------------------------------------------------
    def checkpoint_extras(self) -> Dict[str, Any]:
        extras = super().checkpoint_extras()
        net = self.unwrapped_network
        extras["nnpre_detection"] = to_plain({
            "num_classes": int(net.num_classes),
            "num_input_channels": int(self.num_input_channels),
            "anchor_sizes": [[list(map(float, axis)) for axis in lvl]
                             for lvl in net.anchor_generator.sizes_per_level],
            "config": dataclasses.asdict(net.config),
            "arch_class_name": self.configuration_manager.network_arch_class_name,
            "arch_kwargs": self.configuration_manager.network_arch_init_kwargs,
            "arch_kwargs_req_import": list(self.configuration_manager.network_arch_init_kwargs_req_import),
            "configuration": self.configuration_name,
            "plans": self.plans_manager.plans,
            "dataset_json": self.dataset_json,
        })
        return extras
