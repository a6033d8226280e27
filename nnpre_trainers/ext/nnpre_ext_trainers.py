"""Re-exports nnpre's named trainers for nnU-Net's ``nnUNet_extTrainer`` lookup (absolute imports only).

``nnUNetv2_train ... -tr NAME`` finds every class of :mod:`nnpre_trainers.aliases`: one pretraining alias per
registered pretext task (``nnPreTrainer_MAE``, ``nnPreTrainer_MG``, ``nnPreTrainer_Diffusion``, ...),
``nnPreFineTuneTrainer`` and ``nnPreDetectionTrainer`` (both from scratch under stock nnU-Net).
"""
from nnpre_trainers.aliases import *  # noqa: F401,F403
