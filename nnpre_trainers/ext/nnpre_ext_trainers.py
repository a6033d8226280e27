"""Re-exports nnpre's named trainers for nnU-Net's ``nnUNet_extTrainer`` lookup (absolute imports only)."""
from nnpre_trainers.aliases import *  # noqa: F401,F403
from nnpre_trainers.aliases import nnPreTrainer_Diffusion, nnPreTrainer_MAE, nnPreTrainer_MG  # noqa: F401
