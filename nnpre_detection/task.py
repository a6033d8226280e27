"""Retina U-Net detection as a :class:`~nnpre_trainers.tasks.base.TrainingTask` (``nnPre_train detect``).

* network: :func:`nnpre_detection.retina_unet.build_retina_unet` from the plans' architecture entry, one
  detection class per nnU-Net foreground label (label ``v`` → class ``v - 1``); anchor sizes are fitted to the
  fold's training boxes with :func:`nnpre_detection.anchors.plan_anchors` (as nnDetection's planner does),
  with the level strides read from the plans' ``arch_kwargs['strides']`` (no network is built to find them);
* data: nnU-Net's loaders and augmentation with deep supervision off, plus
  :class:`~nnpre_detection.targets.BoxTargetsTransform` as the last transform: each (X, Y, Z) seg patch becomes
  instances (26-connected components) and boxes (nnDetection ``min - 1`` / ``max + 1``) in the loader workers;
* loss: the detector's loss dict (``loss`` = classification + regression + segmentation parts);
* training recipe: nnDetection's v001 (:mod:`nnpre_detection.recipe`) with the preset's overrides
  (:func:`~nnpre_detection.recipe.recipe_for_preset`), fitted to the run's length
  (:meth:`~nnpre_detection.recipe.DetectionRecipe.fitted`): the run's default length
  (:meth:`DetectionTask.training_length`), its stage schedule (:meth:`DetectionTask.default_schedule`: SGD 0.9
  Nesterov, no weight decay on norms, warm-up + poly, SWA epochs whose average becomes ``checkpoint_final``; no
  gradient clipping) and the loaders' foreground oversampling (0.5) are all read from it;
* validation: mean validation loss per epoch and nnDetection's box metrics of the validation patches
  (:class:`~nnpre_detection.validation.PatchEvaluator`); ``checkpoint_best`` = the recipe's ``monitor_key``
  (highest ``mAP_IoU_0.10_0.50_0.05_MaxDet_100``), through the trainer's ``end_loss_epoch(monitor=...)``;
* end of training: nnDetection's post-processing sweep on the validation cases (with the final, i.e. SWA-averaged,
  weights) -> ``inference_plan.json``.

Checkpoints carry ``nnpre_detection`` (number of classes, anchor sizes, detector config, plans, dataset.json,
configuration name) so :mod:`nnpre_detection.inference` rebuilds the model from the checkpoint alone.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from nnpre.presets import preset_from_plans
from nnpre_detection.anchors import AnchorPlan, plan_anchors, relative_level_factors
from nnpre_detection.recipe import DetectionRecipe, recipe_for_preset
from nnpre_detection.retina_unet import RetinaUNetConfig, build_retina_unet, default_decoder_levels
from nnpre_detection.targets import BoxTargetsTransform, targets_from_batch, targets_from_seg
from nnpre_trainers.tasks.base import TaskContext, TrainingTask
from nnpre_trainers.train_step import autocast_for


def detection_level_strides(arch_kwargs: dict, decoder_levels: Optional[Sequence[int]] = None
                            ) -> Tuple[List[Tuple[int, ...]], Tuple[int, ...]]:
    """Per-stage strides and the detection levels of the Retina U-Net built from ``arch_kwargs``.

    Args:
        arch_kwargs: the plans' ``network_arch_init_kwargs`` (``strides``: per stage an int or per-axis list;
            ``n_stages``).
        decoder_levels: explicit levels (:class:`RetinaUNetConfig`), or None for nnDetection's rule.

    Returns:
        (strides as per-axis tuples, detection levels) — what :func:`build_retina_unet` uses.
    """
    n = int(arch_kwargs["n_stages"])
    strides = [tuple(int(v) for v in s) if isinstance(s, (list, tuple)) else (int(s),) * 3
               for s in arch_kwargs["strides"]][:n]
    levels = tuple(int(v) for v in decoder_levels) if decoder_levels is not None else default_decoder_levels(n)
    return strides, levels


class DetectionTask(TrainingTask):
    """Train a Retina U-Net (see the module doc).

    Args:
        plan_anchors: fit anchor sizes to the training boxes (nnDetection does); False = nnDetection's initial
            sizes (4, 8, 16) per axis scaled per level.
        anchor_sizes: explicit :class:`AnchorPlan` (skips planning).
        training_recipe: explicit :class:`~nnpre_detection.recipe.DetectionRecipe` (default: the preset's,
            :func:`~nnpre_detection.recipe.recipe_for_preset`); fitted to the trainer's length either way.
        **detector_overrides: :class:`~nnpre_detection.retina_unet.RetinaUNetConfig` fields; ``head_channels``
            defaults to the preset's ``detector_head_channels`` when it sets one.
    """

    name = "detection"
    recipe = "finetune"
    needs_labels = True

    def __init__(self, plan_anchors: bool = True, anchor_sizes: Optional[AnchorPlan] = None,
                 training_recipe: Optional[DetectionRecipe] = None, **detector_overrides):
        RetinaUNetConfig().with_overrides(**detector_overrides)  # unknown options: one-line error now
        self.plan_anchors = bool(plan_anchors)
        self.anchor_sizes = anchor_sizes
        self.training_recipe = training_recipe
        self.detector_overrides: Dict[str, Any] = dict(detector_overrides)

    # -- training recipe (nnpre_detection.recipe) ------------------------------------------------------------
    def base_recipe(self, preset) -> DetectionRecipe:
        """The explicit recipe, else nnDetection's v001 with ``preset``'s overrides (not yet fitted)."""
        return self.training_recipe if self.training_recipe is not None else recipe_for_preset(preset)

    def recipe_for(self, trainer) -> DetectionRecipe:
        """The recipe of ``trainer``'s run: :meth:`base_recipe` fitted to its epochs x iterations."""
        return self.base_recipe(trainer.preset).fitted(trainer.num_epochs, trainer.num_iterations_per_epoch)

    def training_length(self, preset) -> Tuple[int, int, int, int]:
        """Default run length (epochs incl. SWA, iterations, validation iterations, ``save_every``): the recipe's
        (``gpu``: 60 x 2500, 100), ``checkpoint_latest`` at the preset's interval in iterations (``gpu``: 50 x
        250 = every 5 epochs of 2500)."""
        r = self.base_recipe(preset)
        save = max(1, round(preset.save_every * preset.iterations_per_epoch / r.iterations_per_epoch))
        return r.total_epochs, r.iterations_per_epoch, r.val_iterations_per_epoch, save

    def default_schedule(self, trainer):
        """The recipe's stage schedule (:meth:`~nnpre_detection.recipe.DetectionRecipe.schedule`)."""
        return self.recipe_for(trainer).schedule(pretrained=not trainer.from_scratch)

    def foreground_oversampling(self, trainer) -> float:
        """Fraction of foreground-forced patches of the loaders (nnDetection 0.5)."""
        return self.recipe_for(trainer).oversample_foreground_percent

    # -- model -------------------------------------------------------------------------------------------
    def training_boxes(self, ctx: TaskContext) -> np.ndarray:
        """(N, 6) boxes of every instance in the fold's training cases (preprocessed voxel space)."""
        boxes = [targets_from_seg(torch.as_tensor(np.asarray(seg))[None])[0]["boxes"].numpy().reshape(-1, 6)
                 for _, seg in ctx.training_cases()]
        return np.concatenate(boxes) if boxes else np.zeros((0, 6), dtype=np.float32)

    def planned_anchor_sizes(self, ctx: TaskContext) -> Optional[AnchorPlan]:
        boxes = self.training_boxes(ctx)
        if boxes.shape[0] == 0:
            ctx.log("no training boxes: using nnDetection's default anchor sizes")
            return None
        strides, levels = detection_level_strides(ctx.configuration_manager.network_arch_init_kwargs,
                                                  self.detector_overrides.get("decoder_levels"))
        plan = plan_anchors(boxes, relative_level_factors(strides, levels))
        ctx.log(f"anchor sizes planned from {boxes.shape[0]} training boxes: {plan.sizes_per_level()[0]}")
        return plan

    def build_network(self, ctx: TaskContext) -> nn.Module:
        cm = ctx.configuration_manager
        head = preset_from_plans(ctx.plans_manager.plans).detector_head_channels
        if head is not None and "head_channels" not in self.detector_overrides:
            self.detector_overrides["head_channels"] = int(head)  # preset-scaled towers (see nnpre.presets)
        from nnpre_detection.recipe import preset_detector_overrides

        for k, v in preset_detector_overrides(preset_from_plans(ctx.plans_manager.plans).name,
                                              int(cm.network_arch_init_kwargs["n_stages"])).items():
            self.detector_overrides.setdefault(k, v)  # the preset's detector options (nnpre_detection.recipe)
        if self.anchor_sizes is None and self.plan_anchors:
            self.anchor_sizes = self.planned_anchor_sizes(ctx)
        return build_retina_unet(cm.network_arch_class_name, cm.network_arch_init_kwargs, ctx.num_input_channels,
                                 max(1, len(ctx.label_manager.foreground_labels)), anchor_sizes=self.anchor_sizes,
                                 arch_kwargs_req_import=cm.network_arch_init_kwargs_req_import,
                                 **self.detector_overrides)

    def get_dataloaders(self, trainer, train_keys: List[str], val_keys: List[str]):
        """nnU-Net's loaders with the box targets computed in the workers (:class:`BoxTargetsTransform`)."""
        return trainer.nnunet_loaders(train_keys, val_keys, extra_transforms=[BoxTargetsTransform()])

    def prepare_batch(self, batch: dict, device: torch.device):
        data = batch["data"].to(device, non_blocking=device.type == "cuda")
        targets = [{k: v.to(device) for k, v in t.items()} for t in targets_from_batch(batch["target"])]
        return data, targets

    def compute_losses(self, network: nn.Module, inputs) -> Dict[str, Tensor]:
        data, targets = inputs
        network.train()  # matching and sampling need training mode
        return dict(network(data, targets))

    def validation_step(self, trainer, batch: dict) -> dict:
        """Validation loss and the per-patch detections (one forward pass) for nnDetection's validation mAP.

        The loss needs training mode (matching/sampling); no_grad is set by the caller, and nnU-Net's
        InstanceNorm keeps no running statistics that training mode would change."""
        data, targets = self.prepare_batch(batch, trainer.device)
        net = trainer.unwrapped_network
        net.train()
        with autocast_for(trainer.device, trainer.amp):
            out = net.head_outputs(data)
            losses = net.compute_loss(out, targets)
            preds = net.postprocess(out)
        return {"loss": float(losses["loss"].detach().float().cpu()),
                "det": ([{k: v.detach().cpu() for k, v in p.items()} for p in preds],
                        [{"boxes": t["boxes"].cpu(), "labels": t["labels"].cpu()} for t in targets])}

    def on_validation_epoch_end(self, trainer, outputs: List[dict]) -> None:
        """Mean validation loss, and box metrics of the epoch's validation patches (each patch one image, fast
        evaluator) as nnDetection logs them; the recipe's ``monitor_key`` (mAP@0.1:0.5) selects ``checkpoint_best``."""
        from nnpre_detection.validation import PatchEvaluator

        key = self.recipe_for(trainer).monitor_key

        trainer.log_mean_val_loss(outputs)
        ev = PatchEvaluator(trainer.unwrapped_network.num_classes)
        for o in outputs:
            if "det" in o:
                ev.add(*o["det"])
        metrics = ev.finish()
        self.val_metric = float(metrics.get(key, float("nan")))
        if metrics:
            trainer.print_to_log_file("validation patches: " + ", ".join(
                f"{k} {metrics[k]:.3f}" for k in ("AP_IoU_0.10_MaxDet_100", key) if k in metrics))

    def on_epoch_end(self, trainer) -> None:
        """Latest checkpoint and epoch log as every task, with ``checkpoint_best`` by the recipe's validation metric
        (nnDetection ``monitor_key``, mode max) instead of the lowest validation loss."""
        r = self.recipe_for(trainer)
        trainer.end_loss_epoch(monitor=(r.monitor_key, getattr(self, "val_metric", float("nan")), r.monitor_mode))
        trainer.current_epoch += 1

    def final_validation(self, trainer, save_probabilities: bool = False) -> None:
        """nnDetection's empirical post-processing sweep on the fold's validation cases with the last weights
        (:func:`nnpre_detection.postprocess_sweep.run_postprocessing_sweep`) -> ``inference_plan.json`` in the
        run folder, read by ``nnPre_predict``. Mirror TTA as nnDetection (8 variants) except for the cpu-tiny
        preset, whose runs predict without mirroring."""
        from nnpre_detection.postprocess_sweep import run_postprocessing_sweep

        if getattr(trainer, "local_rank", 0) != 0:
            return
        _, val_keys = trainer.do_split()
        if not val_keys:
            trainer.print_to_log_file("detection: no validation cases, post-processing sweep skipped")
            return
        mirror = preset_from_plans(trainer.plans_manager.plans).name != "cpu-tiny"
        plan = run_postprocessing_sweep(trainer.output_folder, trainer.preprocessed_dataset_folder, list(val_keys),
                                        mirror=mirror, device=trainer.device, network=trainer.unwrapped_network,
                                        patch_size=trainer.configuration_manager.patch_size)
        trainer.print_to_log_file(f"detection: post-processing sweep on {len(val_keys)} validation cases -> "
                                  f"inference_plan.json {plan.to_dict()}")

    # -- checkpoints -----------------------------------------------------------------------------------------
    def checkpoint_extras(self, trainer) -> Dict[str, Any]:
        from nnpre_trainers.trainer import to_plain

        net = trainer.unwrapped_network
        cm = trainer.configuration_manager
        return {"nnpre_detection": to_plain({
            "num_classes": int(net.num_classes),
            "num_input_channels": int(trainer.num_input_channels),
            "anchor_sizes": [[list(map(float, axis)) for axis in lvl] for lvl in net.anchor_generator.sizes_per_level],
            "config": dataclasses.asdict(net.config),
            "arch_class_name": cm.network_arch_class_name,
            "arch_kwargs": cm.network_arch_init_kwargs,
            "arch_kwargs_req_import": list(cm.network_arch_init_kwargs_req_import),
            "configuration": trainer.configuration_name,
            "plans": trainer.plans_manager.plans,
            "dataset_json": trainer.dataset_json,
        })}


__all__ = ["DetectionTask", "detection_level_strides", "targets_from_seg"]
