"""Fingerprint → plan → preprocess for one dataset, labelled or image-only (what ``nnPre_plan`` runs)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Sequence

from nnpre.dataset_checks import check_raw_dataset
from nnpre.errors import fail
from nnpre.nnunet_env import dataset_id, dataset_name, require_env
from planners.fixed_geometry import PLANNERS, FixedGeometry

CONFIGURATION = "3d_fullres"


@dataclass
class PlanResult:
    dataset_name: str
    plans_identifier: str
    plans: dict
    labelled: bool
    preprocessed_folder: Optional[str]

    @property
    def configuration(self) -> dict:
        return self.plans["configurations"][CONFIGURATION]

    def summary(self) -> str:
        c = self.configuration
        a = c["architecture"]["arch_kwargs"]
        lines = [
            f"{self.dataset_name}: plans '{self.plans_identifier}' ({'labelled' if self.labelled else 'image-only'})",
            f"  spacing {c['spacing']} mm, patch {c['patch_size']}, batch {c['batch_size']}",
            f"  {c['architecture']['network_class_name'].split('.')[-1]}: {a['n_stages']} stages, features "
            f"{a['features_per_stage']}, strides {[list(s) for s in a['strides']]}",
            f"  normalization {c['normalization_schemes']}",
        ]
        if self.preprocessed_folder:
            lines.append(f"  preprocessed data: {self.preprocessed_folder}")
        return "\n".join(lines)


def geometry_from_checkpoint(path: str) -> tuple[str, dict]:
    """(planner key, FixedGeometry overrides) that reproduce a pretrained checkpoint's geometry."""
    from nnpre.checkpoints import read_pretrained

    ck = read_pretrained(path)
    plan = ck.plan
    arch = plan.architecture_plans or {}
    kw = arch.get("arch_kwargs") or {}
    cls = str(arch.get("arch_class_name", "ResEncL"))
    planner = "plain" if "PlainConv" in cls else "resenc-l"
    cfgs = (plan.pretrain_plan or {}).get("configurations", {}) if isinstance(plan.pretrain_plan, dict) else {}
    cfg = next(iter(cfgs.values()), {}) if cfgs else {}
    over = {}
    if cfg.get("spacing"):
        over["spacing"] = tuple(float(s) for s in cfg["spacing"])
    patch = getattr(plan, "pretrain_patch_size", None) or cfg.get("patch_size") or plan.recommended_downstream_patchsize
    if patch:
        over["patch_size"] = tuple(int(p) for p in patch)
    if kw.get("features_per_stage"):
        over["base_features"] = int(kw["features_per_stage"][0])
        over["max_features"] = int(max(kw["features_per_stage"]))
    if kw.get("n_blocks_per_stage"):
        over["n_blocks_per_stage"] = tuple(int(b) for b in kw["n_blocks_per_stage"])
    return planner, over


def plan_dataset(dataset: str | int, planner: Optional[str] = None, preset: Optional[str] = None,
                 spacing: Optional[Sequence[float]] = None, patch_size: Optional[Sequence[int]] = None,
                 batch_size: Optional[int] = None, normalization: Optional[str] = None,
                 plans_name: Optional[str] = None, like: Optional[str] = None, preprocess: bool = True,
                 num_processes: int = 2, verbose: bool = False) -> PlanResult:
    """Fingerprint, plan (fixed geometry) and optionally preprocess ``dataset``.

    Labelled datasets go through nnU-Net's own fingerprint extractor and ``preprocess_dataset``;
    image-only pools through :mod:`planners.image_only`. The raw dataset is validated first, so bad
    input stops before anything is written.
    """
    require_env("nnUNet_raw", "nnUNet_preprocessed")
    from nnunetv2.paths import nnUNet_raw

    name = dataset_name(dataset)
    info = check_raw_dataset(os.path.join(nnUNet_raw, name))
    overrides = dict(spacing=spacing, patch_size=patch_size, batch_size=batch_size, normalization=normalization)
    if like:
        like_planner, like_over = geometry_from_checkpoint(like)
        planner = planner or like_planner
        overrides = {**like_over, **{k: v for k, v in overrides.items() if v is not None}}
    geometry = FixedGeometry.from_preset(preset, **overrides)
    planner = planner or "resenc-l"
    if planner not in PLANNERS:
        fail(f"unknown planner '{planner}'; choose one of {', '.join(PLANNERS)}")

    # 1. fingerprint
    if info.labelled:
        from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprint_dataset

        extract_fingerprint_dataset(dataset_id(name), num_processes=num_processes, check_dataset_integrity=False,
                                    clean=True, verbose=verbose)
    else:
        from planners.image_only import extract_fingerprint_image_only

        extract_fingerprint_image_only(name, info.cases, info.num_channels, num_processes=num_processes)

    # 2. plan
    kwargs = {"geometry": geometry}
    if plans_name:
        kwargs["plans_name"] = plans_name
    p = PLANNERS[planner](name, **kwargs)
    plans = p.plan_experiment()
    ident = p.plans_identifier

    # 3. preprocess
    folder = None
    if preprocess:
        if info.labelled:
            from nnunetv2.experiment_planning.plan_and_preprocess_api import preprocess_dataset

            preprocess_dataset(dataset_id(name), ident, [CONFIGURATION], [num_processes], verbose=verbose)
        else:
            from planners.image_only import preprocess_image_only

            preprocess_image_only(name, info.cases, plans, CONFIGURATION, info.dataset_json, num_processes)
        from nnunetv2.paths import nnUNet_preprocessed

        folder = os.path.join(nnUNet_preprocessed, name, plans["configurations"][CONFIGURATION]["data_identifier"])
    return PlanResult(name, ident, plans, info.labelled, folder)
