"""Re-exports nnpre's named trainers for nnU-Net's ``nnUNet_extTrainer`` lookup (absolute imports only).

``nnUNetv2_train ... -tr NAME`` finds any class below: the pretraining aliases (``nnPreTrainer_MAE``,
``nnPreTrainer_MG``, ``nnPreTrainer_Diffusion``), ``nnPreFineTuneTrainer`` (pretrained checkpoint from the
``nnPre_pretrained`` environment variable) and ``nnPreDetectionTrainer``.
"""
from nnpre_detection.trainer import nnPreDetectionTrainer  # noqa: F401
from nnpre_trainers.aliases import *  # noqa: F401,F403
from nnpre_trainers.aliases import nnPreTrainer_Diffusion, nnPreTrainer_MAE, nnPreTrainer_MG  # noqa: F401
from nnpre_trainers.finetune_trainer import nnPreFineTuneTrainer  # noqa: F401
