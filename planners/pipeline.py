"""Fingerprint → plan → preprocess for one dataset, labelled or image-only (what ``nnPre_plan`` runs)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Sequence

from nnpre.atomic import writable_folder
from nnpre.dataset_checks import check_dataset_contents, check_raw_dataset, check_target_geometry, retire_stale_splits
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


def plan_dataset(dataset: str | int, planner: Optional[str] = None, preset: Optional[str] = None,
                 spacing: Optional[Sequence[float]] = None, patch_size: Optional[Sequence[int]] = None,
                 batch_size: Optional[int] = None, normalization: Optional[str] = None,
                 plans_name: Optional[str] = None, like: Optional[str] = None, preprocess: bool = True,
                 num_processes: int = 2, verbose: bool = False,
                 strides: Optional[Sequence[Sequence[int]]] = None) -> PlanResult:
    """Fingerprint, plan (fixed geometry) and optionally preprocess ``dataset``.

    Labelled datasets go through nnU-Net's own fingerprint extractor, image-only pools through
    :mod:`planners.image_only`; both are preprocessed all-or-nothing
    (:func:`planners.image_only.preprocess_all_or_nothing`). The raw dataset (headers, then every file in full)
    and the target geometry are validated first, so bad input stops before anything is written. A
    ``splits_final.json`` that does not name exactly the preprocessed cases is moved aside.
    """
    require_env("nnUNet_raw", "nnUNet_preprocessed")
    from nnunetv2.paths import nnUNet_raw

    name = dataset_name(dataset)
    info = check_raw_dataset(os.path.join(nnUNet_raw, name))
    overrides = dict(spacing=spacing, patch_size=patch_size, batch_size=batch_size, normalization=normalization)
    like_spec = None
    if like:  # the checkpoint's network verbatim (planners.like)
        from nnunetv2.paths import nnUNet_preprocessed

        from planners.like import describe, like_checkpoint

        like_spec = like_checkpoint(like, os.path.join(nnUNet_preprocessed, name), strides=strides, planner=planner)
        print(describe(like_spec, like))
        planner = like_spec.planner
        overrides = {**like_spec.overrides, **{k: v for k, v in overrides.items() if v is not None}}
        if normalization is not None:
            overrides["normalization_schemes"] = None
    geometry = FixedGeometry.from_preset(preset, **overrides)
    planner = planner or "resenc-l"
    if planner not in PLANNERS:
        fail(f"unknown planner '{planner}'; choose one of {', '.join(PLANNERS)}")
    if int(num_processes) < 1:
        fail(f"-np / num_processes must be >= 1, got {num_processes}")
    from nnunetv2.paths import nnUNet_preprocessed

    writable_folder(os.path.join(nnUNet_preprocessed, name), "nnUNet_preprocessed:")
    check_target_geometry(info, geometry.spacing, geometry.patch_size)
    check_dataset_contents(info, num_processes=num_processes)

    # 1. fingerprint
    if info.labelled:
        from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprint_dataset

        extract_fingerprint_dataset(dataset_id(name), num_processes=num_processes, check_dataset_integrity=False,
                                    clean=True, verbose=verbose)
    else:
        from planners.image_only import extract_fingerprint_image_only

        extract_fingerprint_image_only(name, info.cases, info.num_channels, num_processes=num_processes)

    # 2. plan
    kwargs = {"geometry": geometry, **(like_spec.planner_kwargs() if like_spec else {})}
    if like_spec and not plans_name:
        plans_name = like_spec.plans_name
    if plans_name:
        kwargs["plans_name"] = plans_name
    p = PLANNERS[planner](name, **kwargs)
    plans = p.plan_experiment()
    ident = p.plans_identifier

    # 3. preprocess
    folder = None
    if preprocess:
        from nnunetv2.paths import nnUNet_preprocessed

        from planners.image_only import preprocess_all_or_nothing

        cases = info.cases if info.labelled else {k: {**c, "label": None} for k, c in info.cases.items()}
        folder = preprocess_all_or_nothing(name, cases, plans, CONFIGURATION, info.dataset_json, num_processes,
                                           plans_identifier=ident)
        moved = retire_stale_splits(os.path.join(nnUNet_preprocessed, name), cases)
        if moved:
            print(f"splits_final.json did not name exactly the {len(cases)} preprocessed cases; moved it to {moved} "
                  f"(nnU-Net writes new splits at the next training)")
    return PlanResult(name, ident, plans, info.labelled, folder)
