"""Segmentation fine-tuning: kept as an import path; everything lives in :mod:`nnpre_trainers.trainer`.

``nnPreFineTuneTrainer`` (:mod:`nnpre_trainers.aliases`) is :class:`~nnpre_trainers.trainer.nnPreTrainer` with
the ``segmentation`` task; :meth:`~nnpre_trainers.trainer.nnPreTrainer.configure_finetuning` chooses the
pretrained checkpoint (encoder transfer), the few-label subset and the schedule.
"""
from nnpre_trainers.aliases import nnPreFineTuneTrainer
from nnpre_trainers.trainer import SUBSET_SEED, pretrained_tag

__all__ = ["nnPreFineTuneTrainer", "SUBSET_SEED", "pretrained_tag"]
