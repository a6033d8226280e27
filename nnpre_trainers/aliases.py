"""Thin named trainer classes, only so nnU-Net can find them by name (``-tr NAME``).

nnU-Net locates trainers by class name (in its own package, then in the folders listed in
``nnUNet_extTrainer``). Point that variable at :data:`nnpre_trainers.EXT_TRAINER_DIR` and stock
``nnUNetv2_train DATASET 3d_fullres all -p nnPreResEncLPlans -tr nnPreTrainer_MAE`` works. These classes
only pick a pretext task; all behaviour lives in :class:`nnPrePretrainTrainer` and the task objects.
"""
from nnpre_trainers.pretrain_trainer import nnPrePretrainTrainer


class nnPreTrainer_MAE(nnPrePretrainTrainer):
    pretext_name = "mae"


class nnPreTrainer_MG(nnPrePretrainTrainer):
    pretext_name = "model_genesis"


class nnPreTrainer_Diffusion(nnPrePretrainTrainer):
    pretext_name = "diffusion"


PRETRAIN_TRAINERS = {"mae": nnPreTrainer_MAE, "mg": nnPreTrainer_MG, "model_genesis": nnPreTrainer_MG,
                     "diffusion": nnPreTrainer_Diffusion}
