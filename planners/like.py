"""``nnPre_plan --like CKPT``: plans that rebuild a pretrained checkpoint's network exactly.

The checkpoint's adaptation plan (stored; derived from nnU-Net ``init_args`` plans; or inferred from the
state dict, see :func:`nnpre.checkpoints.read_pretrained`) gives the architecture class and every
``arch_kwargs`` entry — stages, widths, kernel sizes, strides, blocks / convs per stage, decoder convs,
norm / nonlinearity / bias — which the planner writes verbatim instead of letting nnU-Net's topology code
re-derive depth, strides and kernels for the patch. Spacing, patch and normalisation come from the
pretraining configuration (patch: ``recommended_downstream_patchsize``, as nnU-Net master's ``like_nnssl``).
Input channels may differ: the fine-tuning transfer remaps the stem.

The plans are named ``nnPrePlans__<checkpoint tag>`` and carry ``pretrain_info``
(:mod:`nnpre.plans_lookup`), so ``nnPre_train finetune|detect --pretrained CKPT`` finds them without ``-pl``
and plans of several checkpoints coexist in one dataset.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

from nnpre.architecture import DYNAMIC_CLASSES, stage_description
from nnpre.errors import fail
from nnpre.plans_lookup import pretrain_info, unique_like_plans_name

#: Planner key (``-pl``) per dynamic class.
PLANNER_OF = {"ResidualEncoderUNet": "resenc-l", "PlainConvUNet": "plain"}


@dataclass
class LikeSpec:
    """What ``--like`` hands the planner.

    Attributes:
        planner: ``-pl`` key of the checkpoint's family.
        overrides: :class:`~planners.fixed_geometry.FixedGeometry` fields (spacing, patch_size,
            normalization_schemes, base/max features and blocks for the record).
        architecture: ``{"network_class_name", "arch_kwargs", "_kw_requires_import"}`` (nnU-Net plans layout).
        pretrain_info: the plans' ``pretrain_info`` record.
        plans_name: ``nnPrePlans__<tag>``.
        notes: lines for the user (what was inferred / assumed).
    """

    planner: str
    overrides: Dict[str, Any]
    architecture: Dict[str, Any]
    pretrain_info: Dict[str, Any]
    plans_name: str
    notes: List[str] = field(default_factory=list)

    def planner_kwargs(self) -> Dict[str, Any]:
        return {"architecture": self.architecture, "pretrain_info": self.pretrain_info}


def _parse_strides(strides: Sequence[Sequence[int]], n: int, path: str) -> List[List[int]]:
    out = [[int(x) for x in (st if isinstance(st, (list, tuple)) else [st] * 3)] for st in strides]
    if len(out) != n or any(len(st) != 3 or min(st) < 1 for st in out):
        fail(f"--strides gives {len(out)} stage(s); {path} has {n} encoder stages: pass {n} strides, e.g. "
             f"--strides 1 {' '.join(['2'] * (n - 1))} (or per axis 1,2,2)")
    return out


def like_checkpoint(path: str, preprocessed_folder: str, strides: Optional[Sequence[Sequence[int]]] = None,
                    planner: Optional[str] = None) -> LikeSpec:
    """Read ``path`` and describe plans that rebuild its network exactly.

    Args:
        path: the pretrained checkpoint (nnpre, nnssl, nnU-Net; with or without adaptation plan).
        preprocessed_folder: ``nnUNet_preprocessed/<Dataset>`` (to name the plans uniquely).
        strides: per-stage strides for checkpoints whose strides are not stored (encoder-only state dict
            without adaptation plan); must agree with known strides otherwise.
        planner: an explicit ``-pl``; must name the checkpoint's family.

    Raises:
        NnPreError: an architecture nnpre cannot plan (Primus, 2D), unknown strides without ``--strides``,
            ``strides`` contradicting the checkpoint, or ``-pl`` naming the other family.
    """
    from nnpre.checkpoints import pretrained_from_dict, safe_load

    raw = safe_load(path)
    ck = pretrained_from_dict(raw, path)
    plan = ck.plan
    family = plan.network_class_name
    if family not in DYNAMIC_CLASSES:
        fail(f"{path}: architecture '{plan.architecture_plans.get('arch_class_name')}' cannot be planned by nnpre "
             f"(supported: {', '.join(DYNAMIC_CLASSES)} and nnssl's ResEncL)")
    kw = plan.arch_kwargs
    desc = stage_description(kw, family)
    if desc["conv_dim"] != 3:
        fail(f"{path}: the checkpoint is a {desc['conv_dim']}D network; nnPre_plan plans 3d_fullres only")
    if planner is not None and planner != PLANNER_OF[family]:
        fail(f"{path} holds a {family}; -pl {planner} contradicts --like (drop -pl or use -pl {PLANNER_OF[family]})")
    notes = []
    if ck.meta.get("strides_known") is False:
        if strides is None:
            fail(f"{path}: the strides of its {desc['n_stages']} encoder stages are not stored in an encoder-only "
                 f"state dict without adaptation plan; pass them, e.g. --strides 1 "
                 f"{' '.join(['2'] * (desc['n_stages'] - 1))}")
        kw["strides"] = _parse_strides(strides, desc["n_stages"], path)
        notes.append(f"strides {kw['strides']} from --strides")
    elif strides is not None and _parse_strides(strides, desc["n_stages"], path) != desc["strides"]:
        fail(f"{path}: --strides {[list(s) for s in strides]} contradicts the checkpoint's strides "
             f"{desc['strides']}; drop --strides")
    spacing = plan.spacing or [1.0, 1.0, 1.0]
    patch = list(plan.recommended_downstream_patchsize or plan.patch_size or [160, 160, 160])
    schemes = plan.normalization_schemes or ["ZScoreNormalization"]
    overrides = {
        "spacing": tuple(float(s) for s in spacing),
        "patch_size": tuple(int(p) for p in patch),
        "normalization_schemes": tuple(schemes),
        "base_features": int(desc["features_per_stage"][0]),
        "max_features": int(max(desc["features_per_stage"])),
        "n_blocks_per_stage": tuple(desc["blocks_per_stage"]),
    }
    architecture = {
        "network_class_name": DYNAMIC_CLASSES[family],
        "arch_kwargs": kw,
        "_kw_requires_import": list(plan.arch_kwargs_requiring_import),
    }
    citations = raw.get("citations") if isinstance(raw.get("citations"), list) else []
    name = unique_like_plans_name(preprocessed_folder, path)
    info = pretrain_info(plan, path, name.split("__", 1)[1], citations)
    return LikeSpec(planner=PLANNER_OF[family], overrides=overrides, architecture=architecture, pretrain_info=info,
                    plans_name=name, notes=notes)


def describe(spec: LikeSpec, path: str) -> str:
    """One line: which network the plans rebuild."""
    a = spec.architecture["arch_kwargs"]
    blocks = a.get("n_blocks_per_stage", a.get("n_conv_per_stage"))
    return (f"planned like {os.path.basename(path)}: {spec.architecture['network_class_name'].split('.')[-1]} "
            f"copied verbatim ({a['n_stages']} stages, features {a['features_per_stage']}, kernels "
            f"{a['kernel_sizes']}, strides {a['strides']}, blocks {blocks}, decoder convs "
            f"{a['n_conv_per_stage_decoder']}); plans {spec.plans_name}"
            + (f"; {'; '.join(spec.notes)}" if spec.notes else ""))
