"""nnU-Net experiment planners with a fixed target spacing and a fixed patch size.

nnU-Net normally derives spacing and patch size from the dataset fingerprint. For pretraining and
fine-tuning to see the same geometry we force both, and let nnU-Net's own topology code
(``network_topology.get_pool_and_conv_props``) derive the network for that patch: 128³ at 1 mm gives
6 stages, all 3×3×3 kernels, strides 1,2,2,2,2,2 — the ResEnc-L layout of nnssl's pretraining
checkpoints (nnssl ``get_res_enc_l``).

Everything else (resampling functions, preprocessor, label manager, reader/writer) keeps nnU-Net's
names, so the plans are accepted as they are by stock ``nnUNetv2_preprocess``, ``nnUNetv2_train`` and
``nnUNetv2_predict``.

Spacing, patch size, batch size, widths and the normalisation are options (:class:`FixedGeometry`),
not subclasses. Axis order: spacing and patch are given in nnU-Net's array axis order (for NIfTI read
with SimpleITK: slice axis first). The planners never transpose, so what you ask for is what the
plans hold.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import asdict, dataclass
from typing import List, Optional, Tuple, Union

import numpy as np
from batchgenerators.utilities.file_and_folder_operations import isfile, join, load_json
from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props
from nnunetv2.experiment_planning.experiment_planners.residual_unets.residual_encoder_unet_planners import (
    nnUNetPlannerResEncL,
)
from nnunetv2.paths import nnUNet_preprocessed
from nnunetv2.utilities.json_export import recursive_fix_for_json_export

from nnpre.architecture import KWARGS_REQUIRING_IMPORT, unet_arch_kwargs
from nnpre.atomic import write_json
from nnpre.errors import fail
from nnpre.presets import Preset, get_preset

#: Normalisation choices. ``zscore`` (default) z-scores every channel, CT included, as nnssl pretraining
#: and nnU-Net master's fine-tuning plans (``experiment_planning/like_nnssl.py``) do, so a checkpoint sees
#: the same intensity distribution in both phases. ``nnunet`` keeps nnU-Net's per-channel choice
#: (CTNormalization for channels named "CT").
NORMALIZATIONS = ("zscore", "nnunet")


@dataclass(frozen=True)
class FixedGeometry:
    """The geometry an nnPre planner forces.

    Attributes:
        spacing: target spacing in mm, array axis order. Default (1, 1, 1) (nnssl ``onemmiso``).
        patch_size: patch in voxels. Default 128³. Must be divisible by 2**num_pool per axis; otherwise
            nnU-Net's topology code pads it up and the planner reports the padded size.
        batch_size: default 2 (nnssl, nnU-Net's minimum).
        base_features / max_features: 32 / 320 as in nnU-Net and ResEnc-L.
        n_blocks_per_stage: encoder blocks per stage for residual encoders (ResEnc-L 1,3,4,6,6,6,...).
        normalization: see :data:`NORMALIZATIONS`.
        normalization_schemes: explicit nnU-Net scheme names (``--like``: the checkpoint's), used instead of
            ``normalization``: one per channel, or one name for every channel.
        preset: name of the preset this geometry came from (recorded in the plans).
    """

    spacing: Tuple[float, float, float] = (1.0, 1.0, 1.0)
    patch_size: Tuple[int, int, int] = (128, 128, 128)
    batch_size: int = 2
    base_features: int = 32
    max_features: int = 320
    n_blocks_per_stage: Tuple[int, ...] = (1, 3, 4, 6, 6, 6, 6, 6, 6, 6)
    normalization: str = "zscore"
    preset: str = "gpu"
    normalization_schemes: Optional[Tuple[str, ...]] = None

    def __post_init__(self):
        if len(self.spacing) != 3 or any((not np.isfinite(s)) or s <= 0 for s in self.spacing):
            fail(f"target spacing must be three positive numbers in mm, got {list(self.spacing)}")
        if len(self.patch_size) != 3 or any(int(p) < 4 for p in self.patch_size):
            fail(f"patch size must be three integers >= 4, got {list(self.patch_size)}")
        if self.batch_size < 1:
            fail(f"batch size must be >= 1, got {self.batch_size}")
        if self.normalization not in NORMALIZATIONS:
            fail(f"unknown normalization '{self.normalization}'; choose one of {', '.join(NORMALIZATIONS)}")

    @classmethod
    def from_preset(cls, preset: Union[str, Preset, None], **overrides) -> "FixedGeometry":
        """Geometry of a named preset, with optional non-``None`` overrides (spacing, patch_size, ...)."""
        p = preset if isinstance(preset, Preset) else get_preset(preset)
        kw = dict(spacing=tuple(float(s) for s in p.spacing), patch_size=tuple(int(s) for s in p.patch_size),
                  batch_size=p.batch_size, base_features=p.base_features, max_features=p.max_features,
                  n_blocks_per_stage=tuple(p.n_blocks_per_stage), preset=p.name)
        for k, v in overrides.items():
            if v is not None:
                kw[k] = tuple(v) if isinstance(v, list) else v
        return cls(**kw)

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


class _FixedGeometryMixin:
    """Overrides shared by the nnPre planners. Must come before the nnU-Net planner in the MRO."""

    geometry: FixedGeometry
    _encoder_blocks_key = "n_conv_per_stage"  # ResEnc planners use "n_blocks_per_stage"

    def _init_geometry(self, geometry: Optional[FixedGeometry], overwrite_target_spacing,
                       architecture: Optional[dict] = None, pretrain_info: Optional[dict] = None) -> None:
        geometry = geometry or FixedGeometry()
        if overwrite_target_spacing is not None:  # stock CLI/API argument wins over the default
            geometry = dataclasses.replace(geometry, spacing=tuple(float(s) for s in overwrite_target_spacing))
        self.geometry = geometry
        self.architecture = copy.deepcopy(architecture) if architecture else None
        self.pretrain_info = copy.deepcopy(pretrain_info) if pretrain_info else None
        self.UNet_base_num_features = geometry.base_features
        self.UNet_max_features_3d = geometry.max_features
        self.lowres_creation_threshold = 0  # one geometry: no 3d_lowres / cascade

    # -- spacing ---------------------------------------------------------------------------------------------
    def determine_fullres_target_spacing(self) -> np.ndarray:
        return np.array(self.geometry.spacing, dtype=float)

    def determine_transpose(self):
        # Identity: the fixed spacing/patch are given in array axis order and must stay there.
        return [0, 1, 2], [0, 1, 2]

    # -- normalisation ---------------------------------------------------------------------------------------
    def determine_normalization_scheme_and_whether_mask_is_used_for_norm(self):
        schemes, use_mask = super().determine_normalization_scheme_and_whether_mask_is_used_for_norm()
        given = self.geometry.normalization_schemes
        if given:
            if len(given) == len(schemes):
                return list(given), use_mask
            if len(set(given)) == 1:
                return [given[0]] * len(schemes), use_mask
            fail(f"the checkpoint normalises its {len(given)} channels with {list(given)}; {self.dataset_name} has "
                 f"{len(schemes)} channel(s). Choose with --normalization zscore (nnssl) or nnunet")
        if self.geometry.normalization == "zscore":
            schemes = ["ZScoreNormalization"] * len(schemes)
        return schemes, use_mask

    # -- patch and topology ----------------------------------------------------------------------------------
    def get_plans_for_configuration(self, spacing, median_shape, data_identifier: str,
                                    approximate_n_voxels_dataset: float, _cache: dict) -> dict:
        if len(spacing) != 3:
            # nnU-Net always plans a 2D configuration; one fixed 3D geometry is the point of nnPre, so the
            # 2D entry is dropped in save_plans (and its VRAM search skipped).
            return {}
        spacing = [float(s) for s in spacing]
        if self.architecture:
            patch_size, architecture = self._given_architecture()
        else:
            _, strides, kernels, patch_size, _ = get_pool_and_conv_props(
                spacing, list(self.geometry.patch_size), self.UNet_featuremap_min_edge_length, 999999)
            patch_size = [int(p) for p in patch_size]
            n_stages = len(strides)
            features = [min(self.geometry.max_features, self.geometry.base_features * 2 ** i)
                        for i in range(n_stages)]
            architecture = {
                "network_class_name": self.UNet_class.__module__ + "." + self.UNet_class.__name__,
                "arch_kwargs": unet_arch_kwargs(features, [list(map(int, k)) for k in kernels],
                                                [list(map(int, st)) for st in strides], self._encoder_blocks(n_stages),
                                                self.UNet_blocks_per_stage_decoder[: n_stages - 1],
                                                blocks_key=self._encoder_blocks_key),
                "_kw_requires_import": list(KWARGS_REQUIRING_IMPORT),
            }
        resampling_data, resampling_data_kwargs, resampling_seg, resampling_seg_kwargs = self.determine_resampling()
        resampling_softmax, resampling_softmax_kwargs = self.determine_segmentation_softmax_export_fn()
        normalization_schemes, mask_is_used_for_norm = \
            self.determine_normalization_scheme_and_whether_mask_is_used_for_norm()
        return {
            "data_identifier": data_identifier,
            "preprocessor_name": self.preprocessor_name,
            "batch_size": int(self.geometry.batch_size),
            "patch_size": patch_size,
            "median_image_size_in_voxels": median_shape,
            "spacing": np.asarray(spacing, dtype=float),  # nnU-Net's plan_experiment does arithmetic on it
            "normalization_schemes": normalization_schemes,
            "use_mask_for_norm": mask_is_used_for_norm,
            "resampling_fn_data": resampling_data.__name__,
            "resampling_fn_seg": resampling_seg.__name__,
            "resampling_fn_data_kwargs": resampling_data_kwargs,
            "resampling_fn_seg_kwargs": resampling_seg_kwargs,
            "resampling_fn_probabilities": resampling_softmax.__name__,
            "resampling_fn_probabilities_kwargs": resampling_softmax_kwargs,
            "architecture": architecture,
        }

    def _given_architecture(self) -> Tuple[List[int], dict]:
        """(patch, architecture) for a fixed network (``--like``): the kwargs verbatim; the patch must be a
        multiple of the network's total stride on every axis (nnU-Net's U-Net concatenates skips)."""
        arch = copy.deepcopy(self.architecture)
        kw = arch["arch_kwargs"]
        strides = [[int(x) for x in (st if isinstance(st, (list, tuple)) else [st] * 3)] for st in kw["strides"]]
        total = [int(t) for t in np.prod(np.array(strides), axis=0)]
        patch = [int(p) for p in self.geometry.patch_size]
        if len(total) != 3 or any(p % t for p, t in zip(patch, total)):
            fail(f"patch {patch} is not a multiple of the checkpoint network's total stride {total} per axis; "
                 f"pass --patch with multiples of {total}")
        return patch, arch

    def _encoder_blocks(self, n_stages: int) -> List[int]:
        return list(self.UNet_blocks_per_stage_encoder[:n_stages])

    # -- identifiers and saving ------------------------------------------------------------------------------
    def generate_data_identifier(self, configuration_name: str) -> str:
        # Our own folder: never share (and overwrite) nnUNetPlans_3d_fullres data (nnU-Net ResEnc
        # planners return that identifier; DefaultPreprocessor.run deletes the folder before writing).
        return self.plans_identifier + "_" + configuration_name

    def save_plans(self, plans: dict) -> None:
        """Like nnU-Net's ``save_plans`` (keeps foreign configurations) but atomic, plus an ``nnpre`` record."""
        if not plans["configurations"].get("2d"):
            plans["configurations"].pop("2d", None)
        plans["nnpre"] = {"geometry": self.geometry.to_dict(), "preset": self.geometry.preset,
                          "planner": type(self).__name__}
        if self.pretrain_info:
            plans["pretrain_info"] = copy.deepcopy(self.pretrain_info)
        recursive_fix_for_json_export(plans)
        plans_file = join(nnUNet_preprocessed, self.dataset_name, self.plans_identifier + ".json")
        if isfile(plans_file):
            try:
                old = load_json(plans_file)
                for c, cfg in old.get("configurations", {}).items():
                    plans["configurations"].setdefault(c, cfg)
            except ValueError:
                pass  # a corrupt earlier file is simply replaced
        write_json(plans, plans_file)
        print(f"Plans were saved to {plans_file}")


class nnPrePlanner(_FixedGeometryMixin, ExperimentPlanner):
    """Plain-conv U-Net (nnU-Net default architecture) at a fixed spacing and patch.

    Constructor keywords are nnU-Net's (so ``plan_experiment_dataset`` can build it) plus ``geometry``, and for
    ``--like``: ``architecture`` (``{"network_class_name", "arch_kwargs", "_kw_requires_import"}``, used verbatim
    instead of nnU-Net's topology derivation) and ``pretrain_info`` (copied to the plans' top level).
    """

    def __init__(self, dataset_name_or_id: Union[str, int], gpu_memory_target_in_gb: float = 8,
                 preprocessor_name: str = "DefaultPreprocessor", plans_name: str = "nnPrePlans",
                 overwrite_target_spacing: Union[List[float], Tuple[float, ...]] = None,
                 suppress_transpose: bool = False, geometry: Optional[FixedGeometry] = None,
                 architecture: Optional[dict] = None, pretrain_info: Optional[dict] = None):
        super().__init__(dataset_name_or_id, gpu_memory_target_in_gb, preprocessor_name, plans_name,
                         overwrite_target_spacing, suppress_transpose)
        self._init_geometry(geometry, overwrite_target_spacing, architecture, pretrain_info)


class nnPreResEncLPlanner(_FixedGeometryMixin, nnUNetPlannerResEncL):
    """Residual-encoder U-Net with ResEnc-L widths and depths at a fixed spacing and patch."""

    _encoder_blocks_key = "n_blocks_per_stage"

    def __init__(self, dataset_name_or_id: Union[str, int], gpu_memory_target_in_gb: float = 24,
                 preprocessor_name: str = "DefaultPreprocessor", plans_name: str = "nnPreResEncLPlans",
                 overwrite_target_spacing: Union[List[float], Tuple[float, ...]] = None,
                 suppress_transpose: bool = False, geometry: Optional[FixedGeometry] = None,
                 architecture: Optional[dict] = None, pretrain_info: Optional[dict] = None):
        super().__init__(dataset_name_or_id, gpu_memory_target_in_gb, preprocessor_name, plans_name,
                         overwrite_target_spacing, suppress_transpose)
        self._init_geometry(geometry, overwrite_target_spacing, architecture, pretrain_info)

    def _encoder_blocks(self, n_stages: int) -> List[int]:
        blocks = list(self.geometry.n_blocks_per_stage)
        blocks += [blocks[-1]] * max(0, n_stages - len(blocks))
        return blocks[:n_stages]


#: ``-pl`` choices of ``nnPre_plan``.
PLANNERS = {"plain": nnPrePlanner, "resenc-l": nnPreResEncLPlanner}
