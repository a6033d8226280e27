"""Named presets: the faithful GPU defaults and the tiny CPU preset used by tests and the demo.

A preset bundles the planning geometry (target spacing, patch size, feature widths, batch size) with the
training length. The defaults are those of the papers and nnssl/nnU-Net (1 mm isotropic, 128³ patch,
ResEnc-L widths 32→320, batch 2, 1000 epochs × 250 iterations). ``cpu-tiny`` exists so that a 2-core
machine can run the whole pipeline in minutes; it never changes the defaults.

The chosen preset name is recorded in the plans (``plans['nnpre']['preset']``) so that trainers that
nnU-Net instantiates by name pick up the matching training length without extra arguments.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Dict, Optional, Tuple

from nnpre.errors import fail


@dataclass(frozen=True)
class Preset:
    """Planning geometry and training length.

    Attributes:
        name: preset identifier.
        spacing: target spacing in mm, (X, Y, Z) order of the raw images. Default 1 mm isotropic
            (nnssl ``onemmiso``).
        patch_size: patch in voxels at ``spacing``. Default 128³ (nnPre design; nnssl uses 160³).
        batch_size: patches per step. Default 2 (nnssl ``total_batch_size``).
        base_features / max_features: width of stage 0 and the cap (nnU-Net: 32 and 320).
        n_blocks_per_stage: residual blocks per encoder stage for ResEnc (ResEnc-L: 1,3,4,6,6,6,...).
        num_epochs / iterations_per_epoch / val_iterations_per_epoch: training length
            (nnU-Net/nnssl: 1000 × 250, 50 validation iterations).
        save_every: checkpoint interval in epochs (nnU-Net: 50).
        detector_head_channels: width of the Retina U-Net classification/regression towers; ``None`` =
            nnDetection's 128 (4 × its stage-0 width of 32). ``cpu-tiny`` keeps that ratio to its narrower
            network (4 × 8 = 32): full-width towers on every decoder level made a detection step ~10× a
            segmentation step there.
        finetune_optimizer / finetune_lr: optimizer and peak LR (scratch, pretrained) of the default fine-tuning
            schedule; ``"sgd"`` / ``None`` = the DKFZ recipe (SGD, 1e-2 scratch, 1e-3 pretrained). ``cpu-tiny``
            uses AdamW at 3e-3 for both: its runs of a few hundred iterations are too short for SGD to leave the
            all-background solution on small lesions, and a lower pretrained LR (1e-3, the recipe's ratio
            would be 10x lower still) left every pretrained run with 2 labels all-background after 270
            iterations (demo Dice 0.00-0.03 vs scratch 0.24), while at 3e-3 MAE reached 0.24 and diffusion 0.16.
            The recipe's lower LR protects pretrained features over 1000 epochs; in 270 iterations it only
            measures how slowly a run leaves the background solution.
        detection_recipe: fields of :class:`nnpre_detection.recipe.DetectionRecipe` (nnDetection v001: SGD 1e-2,
            momentum 0.9, warm-up + poly, 50 x 2500 iterations + 10 SWA epochs, no clipping) this preset
            overrides for ``nnPre_train detect`` (:func:`nnpre_detection.recipe.recipe_for_preset`). Empty for
            ``gpu``. ``cpu-tiny`` keeps its fine-tuning choices: AdamW at 3e-3 (the measurement under
            ``finetune_lr``; the detection learning benchmark, ``benchmarks/bench_detection_learning.py``, measured
            Retina U-Net AP@0.1 0.48 ± 0.17 over 3 seeds at 300 iterations with it; nnDetection's SGD was not
            measured at these budgets), no warm-up, no SWA (not measured at a few hundred iterations), nnU-Net's
            gradient clip 12, and its own length (4 x 10 iterations, 2 validation iterations). Foreground
            oversampling stays nnDetection's 0.5: with batch 2 it draws the same patches as nnU-Net's 0.33
            (nnU-Net forces the last ``batch - round(batch * (1 - p))`` samples, 1 of 2 for both values).
        pretext_overrides: per pretext task (registry name) config values this preset changes; applied where the
            trainer builds the task (:meth:`nnpre_trainers.trainer.nnPreTrainer.pretext_config`), an explicit
            ``nnPre_train pretrain --set KEY=VALUE`` wins. Empty for ``gpu`` (the papers' values). ``cpu-tiny``:
            VoCo crops the plans' 32³ patch (``region_size`` None) instead of nnssl's 256×256×64 region, which
            on cpu-tiny plans took 188 s and 5 GB per iteration (2 cores).
    """

    name: str
    spacing: Tuple[float, float, float] = (1.0, 1.0, 1.0)
    patch_size: Tuple[int, int, int] = (128, 128, 128)
    batch_size: int = 2
    base_features: int = 32
    max_features: int = 320
    n_blocks_per_stage: Tuple[int, ...] = (1, 3, 4, 6, 6, 6, 6, 6)
    num_epochs: int = 1000
    iterations_per_epoch: int = 250
    val_iterations_per_epoch: int = 50
    save_every: int = 50
    detector_head_channels: Optional[int] = None
    finetune_optimizer: str = "sgd"
    finetune_lr: Optional[Tuple[float, float]] = None
    detection_recipe: Dict[str, object] = field(default_factory=dict)
    pretext_overrides: Dict[str, Dict[str, object]] = field(default_factory=dict)
    extra: Dict[str, object] = field(default_factory=dict)

    @property
    def training_length(self) -> Tuple[int, int, int, int]:
        """(num_epochs, iterations_per_epoch, val_iterations_per_epoch, save_every): what a trainer takes from
        the preset."""
        return self.num_epochs, self.iterations_per_epoch, self.val_iterations_per_epoch, self.save_every

    def to_dict(self) -> dict:
        d = asdict(self)
        d["spacing"] = list(self.spacing)
        d["patch_size"] = list(self.patch_size)
        d["n_blocks_per_stage"] = list(self.n_blocks_per_stage)
        return d

    def with_overrides(self, **kw) -> "Preset":
        """Return a copy with the non-``None`` keyword overrides applied."""
        kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in kw.items() if v is not None}
        return replace(self, **kw)


PRESETS: Dict[str, Preset] = {
    # Faithful defaults for GPU users (see module docstring for the sources).
    "gpu": Preset(name="gpu"),
    # 2-core CPU: 2 mm voxels, 32³ patches (4 stages), 8→64 features, 1-block stages, short runs.
    "cpu-tiny": Preset(
        name="cpu-tiny",
        spacing=(2.0, 2.0, 2.0),
        patch_size=(32, 32, 32),
        batch_size=2,
        base_features=8,
        max_features=64,
        n_blocks_per_stage=(1, 1, 1, 1, 1, 1, 1, 1),
        num_epochs=4,
        iterations_per_epoch=10,
        val_iterations_per_epoch=2,
        save_every=1,
        detector_head_channels=32,
        finetune_optimizer="adamw",
        finetune_lr=(3e-3, 3e-3),
        detection_recipe={"optimizer": "adamw", "initial_lr": 3e-3, "warm_iterations": 0, "swa_epochs": 0,
                          "grad_clip": 12.0, "num_epochs": 4, "iterations_per_epoch": 10,
                          "val_iterations_per_epoch": 2},
        pretext_overrides={"voco": {"region_size": None}},
    ),
}
PRESETS["default"] = PRESETS["gpu"]


def get_preset(name: str | None) -> Preset:
    """Look up a preset by name (``None`` → ``gpu``, the faithful default)."""
    if name is None:
        return PRESETS["gpu"]
    if name not in PRESETS:
        fail(f"unknown preset '{name}'; choose one of: {', '.join(sorted(set(PRESETS) - {'default'}))}")
    return PRESETS[name]


def preset_from_plans(plans: dict) -> Preset:
    """The preset recorded in an nnPre plans dict (``gpu`` for plans we did not write)."""
    info = plans.get("nnpre", {}) if isinstance(plans, dict) else {}
    return get_preset(info.get("preset", "gpu"))
