"""Named trainer classes, only so nnU-Net can find them by name (``nnUNetv2_train -tr NAME``).

nnU-Net locates trainers by class name (in its own package, then in the folders listed in
``nnUNet_extTrainer``; point that variable at :data:`nnpre_trainers.EXT_TRAINER_DIR`). Every class here is
:class:`~nnpre_trainers.trainer.nnPreTrainer` with a default task and nothing else:

* one pretraining alias per registered pretext task, generated from the registry
  (:func:`~nnpre_trainers.pretext.registry.list_pretexts`): ``nnPreTrainer_<SHORT>``, where ``<SHORT>`` is the
  task's short name (:func:`short_name`) upper-cased when it has at most 4 characters and capitalised otherwise
  (``mae`` → ``nnPreTrainer_MAE``, ``model_genesis`` (short ``mg``) → ``nnPreTrainer_MG``, ``diffusion`` →
  ``nnPreTrainer_Diffusion``); a newly registered task gets its alias and its ``nnPre_train pretrain -t``
  name automatically;
* ``nnPreFineTuneTrainer`` (segmentation) and ``nnPreDetectionTrainer`` (Retina U-Net), which from stock
  ``nnUNetv2_train`` train from scratch (the pretrained encoder is an ``nnPre_train --pretrained`` option).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Type

from nnpre.errors import fail
from nnpre_trainers.pretext import list_pretexts
from nnpre_trainers.pretext.registry import pretext_class
from nnpre_trainers.trainer import nnPreTrainer

#: Historical short names of registered tasks (CLI ``-t`` and alias suffix); a task class may instead define
#: ``short_name``.
SHORT_NAMES = {"model_genesis": "mg"}


def short_name(task: str) -> str:
    """The CLI / alias short name of the registered pretext task ``task``."""
    return getattr(pretext_class(task), "short_name", None) or SHORT_NAMES.get(task, task)


def alias_name(task: str) -> str:
    """Class name of the pretraining alias of pretext task ``task`` (see the module doc)."""
    s = short_name(task)
    suffix = s.upper() if len(s) <= 4 else "".join(p[:1].upper() + p[1:] for p in s.split("_"))
    return "nnPreTrainer_" + suffix


class nnPreFineTuneTrainer(nnPreTrainer):
    """Segmentation fine-tuning (``nnPre_train finetune``); see :meth:`nnPreTrainer.configure_finetuning`."""

    task_name = "segmentation"


class nnPreDetectionTrainer(nnPreTrainer):
    """Retina U-Net training (``nnPre_train detect``)."""

    task_name = "detection"

    def configure_detection(self, pretrained: Optional[str] = None, num_train_cases: Optional[int] = None,
                            tag: Optional[str] = None, plan_anchors: bool = True, adapter=None,
                            **detector_overrides) -> None:
        """Choose the encoder source, the labelled subset and detector options; call before training.

        Args:
            pretrained: checkpoint whose encoder is transferred (nnpre, nnssl or nnU-Net); ``None`` = scratch.
            num_train_cases: use only this many training cases of the fold (deterministic subset).
            tag: plans variant of the run (default ``scratch`` / ``pt_<source>`` [+ ``_n<N>``]): run folder
                ``nnPreDetectionTrainer__<plans>_<tag>__<config>`` (:meth:`nnPreTrainer.set_run_tag`).
            plan_anchors: fit anchor sizes to the training boxes (nnDetection does).
            **detector_overrides: :class:`~nnpre_detection.retina_unet.RetinaUNetConfig` fields.
        """
        from nnpre_detection.task import DetectionTask

        self.configure_finetuning(pretrained=pretrained, from_scratch=pretrained is None,
                                  num_train_cases=num_train_cases, tag=tag, adapter=adapter,
                                  task=DetectionTask(plan_anchors=plan_anchors, **detector_overrides))

    @property
    def anchor_sizes(self):
        return getattr(self.task, "anchor_sizes", None)


def _make_pretrain_aliases() -> Dict[str, Type[nnPreTrainer]]:
    out = {}
    for task in list_pretexts():
        name = alias_name(task)
        out[task] = type(name, (nnPreTrainer,), {"pretext_name": task, "__module__": __name__,
                                                 "__doc__": f"Pretraining with the pretext task '{task}'."})
        globals()[name] = out[task]
    return out


#: registry name -> pretraining alias class (generated).
PRETEXT_ALIASES: Dict[str, Type[nnPreTrainer]] = _make_pretrain_aliases()


#: CLI name (registry and short names) -> alias class (generated; what the study and examples index).
PRETRAIN_TRAINERS: Dict[str, Type[nnPreTrainer]] = {
    **PRETEXT_ALIASES, **{short_name(t): c for t, c in PRETEXT_ALIASES.items()}}


def pretext_choices() -> List[str]:
    """Names ``nnPre_train pretrain -t`` accepts: every registered task and its short name."""
    return sorted({*PRETEXT_ALIASES, *(short_name(t) for t in PRETEXT_ALIASES)})


def resolve_pretext(name: str) -> str:
    """Registry name of a CLI task name (registry name or short name); unknown → one-line error."""
    for task in PRETEXT_ALIASES:
        if name in (task, short_name(task)):
            return task
    fail(f"unknown pretext task '{name}'; choose one of: {', '.join(pretext_choices())}")


def pretrain_trainer(name: str) -> Type[nnPreTrainer]:
    """The alias class of pretext task ``name`` (registry or short name)."""
    return PRETEXT_ALIASES[resolve_pretext(name)]


__all__ = ["nnPreFineTuneTrainer", "nnPreDetectionTrainer", *(c.__name__ for c in PRETEXT_ALIASES.values())]
