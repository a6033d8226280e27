"""Retina U-Net training (``nnPre_train detect``): kept as an import path.

The detection task (network, targets, loss, checkpoint entries) is :class:`nnpre_detection.task.DetectionTask`;
``nnPreDetectionTrainer`` (:mod:`nnpre_trainers.aliases`) is the one nnpre trainer with that task.
"""
from nnpre_detection.task import DetectionTask, targets_from_seg
from nnpre_trainers.aliases import nnPreDetectionTrainer

__all__ = ["DetectionTask", "nnPreDetectionTrainer", "targets_from_seg"]
