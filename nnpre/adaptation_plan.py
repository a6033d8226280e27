"""The adaptation plan: everything a downstream run needs to reuse a pretrained encoder.

The serialised form is the one nnssl writes into checkpoints as ``nnssl_adaptation_plan`` (nnssl
``src/nnssl/adaptation_planning/adaptation_plan.py``, ``AdaptationPlan.serialize``): ``architecture_plans``
(``arch_class_name``, ``arch_kwargs``, ``arch_kwargs_requiring_import``), ``pretrain_plan`` (an nnssl
``Plan`` whose ``configurations.<name>`` holds ``spacing``, ``patch_size``, ``normalization_schemes``, ...),
``pretrain_num_input_channels``, ``recommended_downstream_patchsize`` and the state-dict keys
``key_to_encoder``, ``key_to_stem``, ``keys_to_in_proj``, ``key_to_lpe``.
nnssl loaders read those keys and ignore the rest, so nnpre's own
extras (pretext task, its config, input channel names) live under one extra key, ``nnpre``.

The dict holds plain Python values only (str, int, float, bool, None, list, dict), so a checkpoint
carrying it loads with ``torch.load(..., weights_only=True)`` and it round-trips through JSON.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np

from nnpre.architecture import (  # noqa: F401 - re-exported: the architecture facts used to live here
    ARCH_PRESETS,
    DYNAMIC_CLASSES,
    KEY_LAYOUTS,
    KWARGS_REQUIRING_IMPORT,
    RESENC_L_ARCH_KWARGS,
    expand_int_list,
    key_layout,
    resolve_family,
    short_class_name,
    stage_description,
    unet_arch_kwargs,
)
from nnpre.errors import fail

#: Backwards-compatible name of :data:`nnpre.architecture.KEY_LAYOUTS`.
DEFAULT_KEYS = KEY_LAYOUTS

#: nnssl's default pretraining configuration (``onemmiso``: 1 mm isotropic, z-score, one channel,
#: 160³ patches; nnssl ``experiment_planning`` ``onemmiso`` plans).
NNSSL_ONEMMISO = {
    "data_identifier": "nnsslPlans_onemmiso",
    "preprocessor_name": "DefaultPreprocessor",
    "spacing_style": "onemmiso",
    "normalization_schemes": ["ZScoreNormalization"],
    "use_mask_for_norm": [False],
    "resampling_fn_data": "resample_data_or_seg_to_shape",
    "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
    "resampling_fn_mask": "resample_data_or_seg_to_shape",
    "resampling_fn_mask_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
    "spacing": [1.0, 1.0, 1.0],
    "patch_size": [160, 160, 160],
}

NNPRE_EXTRAS_KEY = "nnpre"
FORMAT_VERSION = 1
_KNOWN_EXTRAS = ("format_version", "pretext", "pretext_config", "channel_names", "extra_input_channels")


def plain(obj: Any, where: str = "value") -> Any:
    """Recursively convert ``obj`` to plain Python (numpy → python, tuples → lists, dict keys → str).

    Raises NnPreError for anything that would need an unpickler allow-list (classes, tensors, ...).
    """
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (list, tuple)):
        return [plain(v, where) for v in obj]
    if isinstance(obj, dict):
        return {str(k): plain(v, f"{where}.{k}") for k, v in obj.items()}
    fail(f"adaptation plan field {where} holds a {type(obj).__name__}; only plain values are allowed")


@dataclass
class AdaptationPlan:
    """nnssl-compatible description of a pretrained network plus nnpre's pretext record.

    Attributes:
        architecture_plans: ``{"arch_class_name", "arch_kwargs", "arch_kwargs_requiring_import"}``.
            ``arch_class_name`` is the short dynamic class name ("ResidualEncoderUNet", "PlainConvUNet") or an
            nnssl preset ("ResEncL"; its kwargs are filled in on load).
        pretrain_plan: nnssl ``Plan`` dict; the pretraining spacing / patch / normalisation live in
            ``configurations.<name>``.
        pretrain_num_input_channels: C of the stem conv weight (F, C, k, k, k) at pretraining.
        recommended_downstream_patchsize: patch (voxels) to fine-tune with (nnssl: 160³; nnpre: the
            pretraining patch).
        key_to_encoder / key_to_stem / keys_to_in_proj / key_to_lpe: state-dict locations (see
            :data:`DEFAULT_KEYS`).
        pretrain_patch_size: optional nnssl override of the configuration's patch size (VoCo/SimCLR).
        pretext: nnpre pretext task name ("mae", "model_genesis", "diffusion") or None (foreign source).
        pretext_config: the pretext task's config dict.
        channel_names: input channel names at pretraining, nnU-Net style ``{"0": "T1", "1": "T2"}``.
        extra_input_channels: channels the pretext task appended after the image channels at the network
            input (so the stem weight is (F, C + extra, ...)); dropped before any downstream use.
        extras: any other keys found under ``nnpre`` (kept verbatim on a round trip).
    """

    architecture_plans: Dict[str, Any]
    pretrain_plan: Dict[str, Any]
    pretrain_num_input_channels: int = 1
    recommended_downstream_patchsize: List[int] = field(default_factory=lambda: [160, 160, 160])
    key_to_encoder: str = KEY_LAYOUTS["ResidualEncoderUNet"]["key_to_encoder"]
    key_to_stem: str = KEY_LAYOUTS["ResidualEncoderUNet"]["key_to_stem"]
    keys_to_in_proj: List[str] = field(
        default_factory=lambda: key_layout("ResidualEncoderUNet")["keys_to_in_proj"])
    key_to_lpe: Optional[str] = None
    pretrain_patch_size: Optional[List[int]] = None
    pretext: Optional[str] = None
    pretext_config: Optional[Dict[str, Any]] = None
    channel_names: Optional[Dict[str, str]] = None
    extra_input_channels: int = 0
    extras: Dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ architecture
    @property
    def network_class_name(self) -> str:
        """Short dynamic class name ("ResidualEncoderUNet" / "PlainConvUNet"); presets resolved."""
        return resolve_family(self.architecture_plans.get("arch_class_name"))

    @property
    def dotted_network_class(self) -> str:
        """Importable class path for nnU-Net's ``get_network_from_plans``."""
        name = self.network_class_name
        if name not in DYNAMIC_CLASSES:
            fail(f"architecture '{self.architecture_plans.get('arch_class_name')}' is not supported by nnpre; "
                 f"supported: {', '.join(list(DYNAMIC_CLASSES) + list(ARCH_PRESETS))}")
        return DYNAMIC_CLASSES[name]

    @property
    def arch_kwargs(self) -> Dict[str, Any]:
        """Constructor kwargs of the dynamic class (a copy; presets expanded)."""
        kw = self.architecture_plans.get("arch_kwargs")
        name = short_class_name(self.architecture_plans.get("arch_class_name"))
        if not kw and name in ARCH_PRESETS:
            kw = ARCH_PRESETS[name][1]
        if not kw:
            fail(f"adaptation plan of architecture '{name}' has no arch_kwargs; cannot build the network")
        return copy.deepcopy(dict(kw))

    @property
    def arch_kwargs_requiring_import(self) -> List[str]:
        req = self.architecture_plans.get("arch_kwargs_requiring_import")
        return list(req) if req else list(KWARGS_REQUIRING_IMPORT)

    def build_network(self, num_input_channels: Optional[int] = None, num_output_channels: int = 1,
                      deep_supervision: bool = False):
        """Build (and He-initialise) the planned network with nnU-Net's ``get_network_from_plans``.

        Args:
            num_input_channels: C of the input (B, C, X, Y, Z); default the pretraining channel count.
            num_output_channels: channels of the seg/reconstruction layers.
            deep_supervision: passed to the decoder (fine-tuning default: off, as nnU-Net master's
                ``PretrainedTrainer``).
        """
        from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

        return get_network_from_plans(self.dotted_network_class, self.arch_kwargs, self.arch_kwargs_requiring_import,
                                      int(num_input_channels or self.pretrain_num_input_channels),
                                      int(num_output_channels), allow_init=True, deep_supervision=deep_supervision)

    # ------------------------------------------------------------------ pretraining geometry
    def _flat_configuration(self) -> bool:
        cfgs = self.pretrain_plan.get("configurations")
        return isinstance(cfgs, dict) and any(k in cfgs for k in ("spacing", "patch_size", "normalization_schemes"))

    @property
    def pretrain_configuration_name(self) -> Optional[str]:
        """Name of the (single) pretraining configuration, e.g. 'onemmiso' or '3d_fullres'."""
        cfgs = self.pretrain_plan.get("configurations")
        if not isinstance(cfgs, dict) or not cfgs:
            return None
        if self._flat_configuration():  # some writers store the configuration itself, unnamed
            return cfgs.get("spacing_style")
        return next(iter(cfgs))

    @property
    def pretrain_configuration(self) -> Dict[str, Any]:
        """The pretraining configuration dict ({} when the plan has none)."""
        cfgs = self.pretrain_plan.get("configurations")
        if not isinstance(cfgs, dict) or not cfgs:
            return {}
        if self._flat_configuration():
            return dict(cfgs)
        first = next(iter(cfgs.values()))
        return dict(first) if isinstance(first, dict) else {}

    @property
    def spacing(self) -> Optional[List[float]]:
        """Pretraining spacing in mm (array axis order), or None if the plan does not say."""
        sp = self.pretrain_configuration.get("spacing")
        return [float(s) for s in sp] if sp else None

    @property
    def patch_size(self) -> Optional[List[int]]:
        """Pretraining patch in voxels (``pretrain_patch_size`` override first, as nnssl loaders do)."""
        ps = self.pretrain_patch_size or self.pretrain_configuration.get("patch_size")
        return [int(p) for p in ps] if ps else None

    @property
    def normalization_schemes(self) -> Optional[List[str]]:
        ns = self.pretrain_configuration.get("normalization_schemes")
        return list(ns) if ns else None

    @property
    def is_nnpre(self) -> bool:
        """True when the plan was written by nnpre (has the pretext record)."""
        return (self.pretext is not None or self.pretext_config is not None or self.channel_names is not None
                or self.extra_input_channels > 0 or bool(self.extras))

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> Dict[str, Any]:
        """nnssl ``AdaptationPlan.serialize()`` layout plus the ``nnpre`` extras; plain values only."""
        d = {
            "architecture_plans": plain(self.architecture_plans, "architecture_plans"),
            "pretrain_plan": plain(self.pretrain_plan, "pretrain_plan"),
            "pretrain_num_input_channels": int(self.pretrain_num_input_channels),
            "recommended_downstream_patchsize": plain(self.recommended_downstream_patchsize),
            "key_to_encoder": self.key_to_encoder,
            "key_to_stem": self.key_to_stem,
            "keys_to_in_proj": list(self.keys_to_in_proj),
            "key_to_lpe": self.key_to_lpe,
        }
        if self.pretrain_patch_size is not None:
            d["pretrain_patch_size"] = plain(self.pretrain_patch_size)
        d[NNPRE_EXTRAS_KEY] = {
            **plain(self.extras, "extras"),
            "format_version": FORMAT_VERSION,
            "pretext": self.pretext,
            "pretext_config": plain(self.pretext_config, "pretext_config"),
            "channel_names": plain(self.channel_names, "channel_names"),
            "extra_input_channels": int(self.extra_input_channels),
        }
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any], source: str = "adaptation plan") -> "AdaptationPlan":
        """Read an nnssl or nnpre serialised plan. Missing optional keys get the class defaults.

        ``source`` names the file in error messages.
        """
        if not isinstance(d, dict) or not isinstance(d.get("architecture_plans"), dict):
            fail(f"{source}: the adaptation plan has no 'architecture_plans' dict; it is not an nnssl/nnpre plan")
        arch = dict(d["architecture_plans"])
        name = short_class_name(arch.get("arch_class_name"))
        if not name:
            fail(f"{source}: adaptation plan has no architecture_plans.arch_class_name")
        if not arch.get("arch_kwargs") and name in ARCH_PRESETS:
            arch["arch_kwargs"] = copy.deepcopy(ARCH_PRESETS[name][1])
            arch["arch_kwargs_requiring_import"] = list(KWARGS_REQUIRING_IMPORT)
        keys = key_layout(name)
        extras = d.get(NNPRE_EXTRAS_KEY) or {}
        pp = d.get("pretrain_plan")
        cfgs = pp.get("configurations") if isinstance(pp, dict) else None
        cfg_patch = None
        if isinstance(cfgs, dict) and cfgs:
            first = cfgs if "patch_size" in cfgs else next(iter(cfgs.values()))
            cfg_patch = first.get("patch_size") if isinstance(first, dict) else None
        rec = (d.get("recommended_downstream_patchsize") or d.get("pretrain_patch_size") or cfg_patch
               or [160, 160, 160])
        in_proj = d.get("keys_to_in_proj") or keys["keys_to_in_proj"]
        return cls(
            architecture_plans=plain(arch, "architecture_plans"),
            pretrain_plan=plain(d.get("pretrain_plan") or {}, "pretrain_plan"),
            pretrain_num_input_channels=int(d.get("pretrain_num_input_channels") or 1),
            recommended_downstream_patchsize=[int(p) for p in rec],
            key_to_encoder=d.get("key_to_encoder") or keys["key_to_encoder"],
            key_to_stem=d.get("key_to_stem") or keys["key_to_stem"],
            keys_to_in_proj=[in_proj] if isinstance(in_proj, str) else list(in_proj),
            key_to_lpe=d.get("key_to_lpe", keys["key_to_lpe"]),
            pretrain_patch_size=plain(d.get("pretrain_patch_size")),
            pretext=extras.get("pretext"),
            pretext_config=plain(extras.get("pretext_config")),
            channel_names=plain(extras.get("channel_names")),
            extra_input_channels=int(extras.get("extra_input_channels") or 0),
            extras=plain({k: v for k, v in extras.items() if k not in _KNOWN_EXTRAS}, "nnpre"),
        )

    # aliases so callers can use either the class or the module functions
    @classmethod
    def from_nnunet_plans(cls, *args, **kwargs) -> "AdaptationPlan":
        return from_nnunet_plans(*args, **kwargs)

    @classmethod
    def resenc_l_default(cls) -> "AdaptationPlan":
        return resenc_l_default()


def resenc_l_default() -> AdaptationPlan:
    """The plan of an nnssl ResEnc-L checkpoint (nnssl ``get_res_enc_l`` and ``AdaptationPlan``).

    Describes nnssl's default checkpoint (tests, references); checkpoints without an adaptation plan are
    read by :func:`nnpre.checkpoints.read_pretrained`, which infers their architecture instead: ResEnc-L
    kwargs, one input channel, ``onemmiso`` configuration (1 mm, z-score, 160³), downstream patch 160³,
    encoder at ``encoder.stages`` and stem at ``encoder.stem``.
    """
    return AdaptationPlan(
        architecture_plans={"arch_class_name": "ResEncL", "arch_kwargs": copy.deepcopy(RESENC_L_ARCH_KWARGS),
                            "arch_kwargs_requiring_import": list(KWARGS_REQUIRING_IMPORT)},
        pretrain_plan={
            "dataset_name": "unknown",
            "plans_name": "nnsslPlans",
            "original_median_spacing_after_transp": [1.0, 1.0, 1.0],
            "image_reader_writer": "SimpleITKIO",
            "transpose_forward": [0, 1, 2],
            "transpose_backward": [0, 1, 2],
            "experiment_planner_used": "unknown",
            "configurations": {"onemmiso": copy.deepcopy(NNSSL_ONEMMISO)},
        },
        pretrain_num_input_channels=1,
        recommended_downstream_patchsize=[160, 160, 160],
        **key_layout("ResidualEncoderUNet"),
    )


def from_nnunet_plans(plans: Dict[str, Any], configuration: str, num_input_channels: int,
                      pretext: Optional[str] = None, pretext_config: Optional[Dict[str, Any]] = None,
                      channel_names: Optional[Dict[str, str]] = None) -> AdaptationPlan:
    """Adaptation plan of a network trained from an nnU-Net plans dict.

    Args:
        plans: nnU-Net plans (as in ``nnUNetPlans.json`` or ``checkpoint['init_args']['plans']``).
        configuration: configuration name (e.g. "3d_fullres"); ``inherits_from`` is resolved.
        num_input_channels: C of the network input (B, C, X, Y, Z).
        pretext / pretext_config: nnpre pretext record (None for a supervised nnU-Net run).
        channel_names: dataset.json ``channel_names`` ({"0": "CT"}); stored for name-based stem remapping.

    The recommended downstream patch is the configuration's patch size (nnpre fine-tunes at the
    pretraining geometry).
    """
    cfgs = plans.get("configurations") if isinstance(plans, dict) else None
    if not isinstance(cfgs, dict) or configuration not in cfgs:
        have = ", ".join(cfgs) if isinstance(cfgs, dict) else "none"
        fail(f"plans '{plans.get('plans_name', '?') if isinstance(plans, dict) else '?'}' have no configuration "
             f"'{configuration}' (available: {have})")
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    cfg = PlansManager(copy.deepcopy(plans)).get_configuration(configuration).configuration
    arch = cfg.get("architecture")
    if not isinstance(arch, dict) or "network_class_name" not in arch:
        fail(f"configuration '{configuration}' has no 'architecture' entry (nnU-Net < 2.4 plans are not supported); "
             f"re-plan the dataset with nnPre_plan")
    name = short_class_name(arch["network_class_name"])
    keys = key_layout(name)
    config_record = {k: cfg[k] for k in (
        "data_identifier", "preprocessor_name", "normalization_schemes", "use_mask_for_norm", "resampling_fn_data",
        "resampling_fn_data_kwargs", "resampling_fn_mask", "resampling_fn_mask_kwargs", "resampling_fn_seg",
        "resampling_fn_seg_kwargs", "spacing", "patch_size", "batch_size") if k in cfg}
    config_record["spacing_style"] = "nnunet_plans"
    pretrain_plan = {k: plans[k] for k in (
        "dataset_name", "plans_name", "original_median_spacing_after_transp", "image_reader_writer",
        "transpose_forward", "transpose_backward", "experiment_planner_used") if k in plans}
    pretrain_plan["configurations"] = {configuration: config_record}
    patch = [int(p) for p in cfg.get("patch_size", [160, 160, 160])]
    return AdaptationPlan(
        architecture_plans={"arch_class_name": name, "arch_kwargs": plain(arch.get("arch_kwargs") or {}),
                            "arch_kwargs_requiring_import": list(arch.get("_kw_requires_import")
                                                                 or KWARGS_REQUIRING_IMPORT)},
        pretrain_plan=plain(pretrain_plan, "pretrain_plan"),
        pretrain_num_input_channels=int(num_input_channels),
        recommended_downstream_patchsize=patch,
        pretext=pretext,
        pretext_config=plain(pretext_config, "pretext_config"),
        channel_names=plain(channel_names, "channel_names"),
        **keys,
    )


def ordered_channel_names(names: Any) -> Optional[List[str]]:
    """nnU-Net ``{"0": "T1", "1": "T2"}`` (or a list) → ["T1", "T2"] ordered by channel index; None stays None."""
    if names is None:
        return None
    if isinstance(names, dict):
        try:
            items = sorted(names.items(), key=lambda kv: int(kv[0]))
        except (TypeError, ValueError):
            fail(f"channel_names keys must be channel indices ('0', '1', ...), got {list(names)}")
        return [str(v) for _, v in items]
    if isinstance(names, (list, tuple)):
        return [str(v) for v in names]
    fail(f"channel_names must be a dict {{'0': 'T1', ...}} or a list, got {type(names).__name__}")
