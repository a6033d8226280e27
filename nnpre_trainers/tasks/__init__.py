"""Training tasks of :class:`nnpre_trainers.trainer.nnPreTrainer` (see :mod:`.base` for the contract).

Fine-tuning tasks are registered by name (:func:`get_task`, :func:`list_tasks`): ``segmentation``
(:mod:`.segmentation`) and ``detection`` (:mod:`nnpre_detection.task`). Pretext tasks keep their own registry
(:mod:`nnpre_trainers.pretext`) and run through :class:`.pretext.PretextTrainingTask`.
"""
from nnpre_trainers.tasks.base import TaskContext, TrainingTask, get_task, list_tasks, register_task

__all__ = ["TaskContext", "TrainingTask", "get_task", "list_tasks", "register_task"]
