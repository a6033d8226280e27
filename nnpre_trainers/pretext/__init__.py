"""Pretext tasks for self-supervised pretraining (pure torch/numpy; usable outside nnU-Net).

Registered tasks: ``mae`` (:mod:`.mae`), ``model_genesis`` (:mod:`.model_genesis`), ``diffusion``
(:mod:`.diffusion`), ``s3d`` (:mod:`.s3d`), ``voco``
(:mod:`.voco`). Use :func:`get_pretext` with config overrides; see
:class:`PretextTask` for the contract.
"""
from nnpre_trainers.pretext.base import (
                                         CONDITIONING_ATTR,
                                         PretextSample,
                                         PretextTask,
                                         attach_conditioning,
                                         masked_mse,
                                         numpy_rng,
)
from nnpre_trainers.pretext.diffusion import DiffusionConfig, DiffusionTask, TimestepConditioning  # noqa: E402

# importing the task modules registers them
from nnpre_trainers.pretext.mae import MAEConfig, MAETask, block_mask  # noqa: E402
from nnpre_trainers.pretext.model_genesis import ModelGenesisConfig, ModelGenesisTask  # noqa: E402
from nnpre_trainers.pretext.registry import default_config, get_pretext, list_pretexts, register_pretext
from nnpre_trainers.pretext.s3d import S3DConfig, S3DTask  # noqa: E402
from nnpre_trainers.pretext.voco import VoCoConfig, VoCoTask  # noqa: E402

__all__ = [
    "CONDITIONING_ATTR", "PretextSample", "PretextTask", "attach_conditioning", "masked_mse", "numpy_rng",
    "default_config", "get_pretext", "list_pretexts", "register_pretext",
    "MAEConfig", "MAETask", "block_mask", "ModelGenesisConfig", "ModelGenesisTask",
    "DiffusionConfig", "DiffusionTask", "TimestepConditioning", "S3DConfig", "S3DTask", "VoCoConfig", "VoCoTask",
]
