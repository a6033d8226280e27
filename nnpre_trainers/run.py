"""Build nnpre trainers from a preprocessed dataset (what ``nnPre_train`` and the demo call)."""
from __future__ import annotations

import json
import os
from typing import Optional, Type

import torch

from nnpre.errors import fail
from nnpre.nnunet_env import dataset_name, require_env
from nnpre.plans_lookup import canonical_architecture
from nnpre.presets import get_preset

#: ``-pl`` short names → plans identifiers written by nnPre_plan.
PLANS_ALIASES = {"resenc-l": "nnPreResEncLPlans", "plain": "nnPrePlans"}


def resolve_plans_name(pl: Optional[str], dataset: str | int | None = None, pretrained: Optional[str] = None) -> str:
    """``-pl`` → plans identifier; without ``-pl``, the plans ``nnPre_plan --like PRETRAINED`` (or nnU-Net
    master's ``like_nnssl``) wrote for the checkpoint (:func:`nnpre.plans_lookup.find_plans_for_checkpoint`)."""
    if pl is None and pretrained and dataset is not None:
        from nnpre.plans_lookup import find_plans_for_checkpoint

        found = find_plans_for_checkpoint(dataset, pretrained)
        if found:
            print(f"plans: {found} (written for {pretrained})")
            return found
    return PLANS_ALIASES.get(pl or "resenc-l", pl or "nnPreResEncLPlans")


def pick_device(name: Optional[str] = None) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        fail("--device cuda was requested but this torch build sees no GPU; use --device cpu")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        fail("--device mps was requested but this torch build sees no Apple GPU (MPS); use --device cpu")
    return torch.device(name)


def make_trainer(trainer_class: Type, dataset: str | int, plans_name: str = "nnPreResEncLPlans",
                 configuration: str = "3d_fullres", fold: str | int = "all", device: Optional[str] = None,
                 continue_training: bool = False, preset: Optional[str] = None, epochs: Optional[int] = None,
                 iterations: Optional[int] = None, variant: Optional[str] = None):
    """Instantiate ``trainer_class`` for a dataset planned with ``nnPre_plan``.

    ``preset``/``epochs``/``iterations`` override the training length recorded in the plans. ``variant`` (e.g.
    :func:`nnpre_trainers.trainer.run_variant`): train with the plans variant ``<plans>_<variant>``
    (:func:`nnpre_trainers.trainer.variant_plans`, written by rank 0 next to the plans), so the run folder is
    ``<Trainer>__<plans>_<variant>__<configuration>`` from the start (nothing is created and moved).
    """
    check_length(epochs, iterations)
    require_env("nnUNet_preprocessed", "nnUNet_results")
    from nnunetv2.paths import nnUNet_preprocessed

    name = dataset_name(dataset, must_exist_in="nnUNet_preprocessed")
    folder = os.path.join(nnUNet_preprocessed, name)
    plans_file = os.path.join(folder, plans_name + ".json")
    if not os.path.isfile(plans_file):
        fail(f"{plans_file} does not exist; run nnPre_plan -d {dataset} first (or pass the right -pl)")
    with open(plans_file) as f:
        plans = canonical_architecture(json.load(f))  # nnssl preset names in like_nnssl plans → buildable
    if configuration not in plans.get("configurations", {}):
        fail(f"{plans_file} has no configuration '{configuration}'; re-run nnPre_plan")
    data_folder = os.path.join(folder, plans["configurations"][configuration]["data_identifier"])
    if not os.path.isdir(data_folder):
        fail(f"{data_folder} is missing; run nnPre_plan -d {dataset} without --no-preprocess")
    from nnpre.dataset_checks import verify_preprocessed

    verify_preprocessed(data_folder, dataset, plans=plans, configuration=configuration)  # complete and current
    with open(os.path.join(folder, "dataset.json")) as f:
        dataset_json = json.load(f)
    if variant:
        from nnpre_trainers.trainer import variant_plans, write_variant_plans

        plans = variant_plans(plans, variant)
        if _rank() == 0:
            write_variant_plans(plans, folder)
    plans["continue_training"] = bool(continue_training)
    fold = parse_fold(fold)
    trainer = trainer_class(plans=plans, configuration=configuration, fold=fold, dataset_json=dataset_json,
                            device=pick_device(device))
    if preset is not None:
        p = get_preset(preset)
        if hasattr(trainer, "use_preset"):
            trainer.use_preset(p)  # its length, or the task's for it (detection: the recipe's)
        else:  # a stock nnU-Net trainer (e.g. the benchmarks' reference): the preset's length
            (trainer.num_epochs, trainer.num_iterations_per_epoch, trainer.num_val_iterations_per_epoch,
             trainer.save_every) = p.training_length
    if epochs is not None:
        trainer.num_epochs = int(epochs)
    if iterations is not None:
        trainer.num_iterations_per_epoch = int(iterations)
    return trainer


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def check_length(epochs: Optional[int], iterations: Optional[int]) -> None:
    """``--epochs`` / ``--iterations`` must be >= 1 (0 or negative: one-line error, before anything is written)."""
    for flag, v in (("--epochs", epochs), ("--iterations", iterations)):
        if v is not None and int(v) < 1:
            fail(f"{flag} must be >= 1, got {v}")


def parse_fold(fold: str | int) -> str | int:
    """``-f``: ``'all'`` or a fold number >= 0 (whether the split has it is checked when training starts)."""
    if str(fold) == "all":
        return "all"
    try:
        f = int(str(fold))
    except ValueError:
        fail(f"-f expects a fold number (0-4 for nnU-Net's 5-fold split) or 'all', got '{fold}'")
    if f < 0:
        fail(f"-f expects a fold number >= 0 or 'all', got {f}")
    return f


def maybe_resume(trainer) -> Optional[str]:
    """Load final > latest > best checkpoint from the trainer's output folder (nnU-Net's ``--c`` order)."""
    for n in ("checkpoint_final.pth", "checkpoint_latest.pth", "checkpoint_best.pth"):
        p = os.path.join(trainer.output_folder, n)
        if os.path.isfile(p):
            trainer.load_checkpoint(p)
            return p
    print(f"--c: no checkpoint in {trainer.output_folder}; starting from scratch")
    return None
