"""nnpre detection: Retina U-Net parts (pure PyTorch) and nnDetection-identical metrics.

Public API (imported lazily, so that ``nnpre_detection.metrics`` and ``nnpre_detection.instances`` never pull
in model code):

* boxes: ``box_iou``, ``box_giou``, ``box_volume``, ``convert_boxes``, ``clip_boxes``
* ``batched_nms``, ``weighted_box_clustering`` (single-class NMS: ``from nnpre_detection.nms import nms``; the
  name ``nnpre_detection.nms`` is the module)
* ``BoxCoder``, ``AnchorGenerator``, ``AnchorPlan``, ``plan_anchors``, ``relative_level_factors``,
  ``ATSSMatcher``, ``HardNegativeSampler``
* ``RetinaUNet``, ``RetinaUNetConfig``, ``build_retina_unet``, ``default_decoder_levels``
* whole-case ensembling and post-processing (nnDetection ``BoxEnsemblerSelective`` / sweep):
  ``InferencePlan``, ``ensemble_case``, ``run_postprocessing_sweep``; training recipe ``DetectionRecipe``;
  ``BoxTargetsTransform`` (targets in the loader workers); ``validation_map``
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "box_iou": "boxes", "box_giou": "boxes", "box_volume": "boxes", "convert_boxes": "boxes",
    "clip_boxes": "boxes",
    "batched_nms": "nms",
    "weighted_box_clustering": "wbc",
    "BoxCoder": "coder",
    "AnchorGenerator": "anchors", "AnchorPlan": "anchors", "plan_anchors": "anchors",
    "relative_level_factors": "anchors",
    "ATSSMatcher": "atss",
    "HardNegativeSampler": "sampler",
    "RetinaUNet": "retina_unet", "RetinaUNetConfig": "retina_unet", "build_retina_unet": "retina_unet",
    "default_decoder_levels": "retina_unet",
    "InferencePlan": "ensemble", "ensemble_case": "ensemble",
    "run_postprocessing_sweep": "postprocess_sweep",
    "DetectionRecipe": "recipe",
    "BoxTargetsTransform": "targets",
    "validation_map": "validation",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
