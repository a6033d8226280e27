"""Reading and writing checkpoints without ever executing code from them.

Every load goes through :func:`safe_load`: ``torch.load(..., weights_only=True, map_location='cpu')``
with an explicit allow-list of the few non-tensor globals that real checkpoints contain. nnU-Net's
``nnUNetTrainer.save_checkpoint`` stores numpy float64 values in its logging dict and ``_best_ema``
(numpy scalars → ``numpy._core.multiarray.scalar`` + ``numpy.dtype`` + the dtype class) and a
``torch.device`` in ``init_args`` (already allowed by torch). Numpy arrays need
``numpy._core.multiarray._reconstruct`` and ``numpy.ndarray``. Only numeric and bool dtype classes are
allowed, so object arrays (which could smuggle arbitrary objects) are refused. Anything else, for
example a pickle whose ``__reduce__`` calls ``os.system``, is refused with an :class:`NnPreError`
naming the file; there is no fallback to ``weights_only=False``.

:func:`read_pretrained` recognises three sources (nnssl ``AbstractBaseTrainer.save_checkpoint``,
nnU-Net ``nnUNetTrainer.save_checkpoint``):

- ``nnpre``: nnU-Net trainer keys plus ``nnssl_adaptation_plan`` with an ``nnpre`` record,
- ``nnssl``: ``network_weights`` plus ``nnssl_adaptation_plan``; or ``network_weights`` alone (raw
  nnssl / OpenMind checkpoints), in which case the architecture is inferred from the state dict
  (:func:`inferred_plan`; one ``note:`` line on stderr says what was inferred),
- ``nnunet``: a stock ``checkpoint_final.pth``; the architecture comes from ``init_args['plans']``.
"""
from __future__ import annotations

import os
import pickle
import sys
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional

import numpy as np
import torch

from nnpre.adaptation_plan import NNPRE_EXTRAS_KEY, NNSSL_ONEMMISO, AdaptationPlan, from_nnunet_plans
from nnpre.architecture import infer_arch_from_state_dict, key_layout
from nnpre.atomic import write_with
from nnpre.errors import fail

ADAPTATION_PLAN_KEY = "nnssl_adaptation_plan"
#: ``nnpre`` extras flag of a plan whose strides were not known when it was written (inferred from an
#: encoder-only state dict); readers skip the stride comparison and ``nnPre_plan --like`` asks for ``--strides``.
STRIDES_UNKNOWN = "strides_unknown"
#: Patch edge used for plans inferred from a bare state dict (nnssl's 160³ pretraining patch).
INFERRED_PATCH_EDGE = 160
#: Prefixes added by DistributedDataParallel and torch.compile; stripped from checkpoint keys.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
#: numpy dtypes whose dtype classes may appear in a checkpoint (numeric and bool only).
_SAFE_NUMPY_SCALARS = (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64,
                       np.float16, np.float32, np.float64)


def _numpy_multiarray():
    try:  # numpy >= 2
        from numpy._core import multiarray
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray
    return multiarray


def safe_globals() -> List[Any]:
    """The exact allow-list used by :func:`safe_load`.

    ``_reconstruct`` and ``scalar`` are also registered under their numpy-1.x names
    (``numpy.core.multiarray.*``) so checkpoints written with numpy 1 load under numpy 2.
    """
    ma = _numpy_multiarray()
    allowed: List[Any] = [np.ndarray, np.dtype, ma._reconstruct, ma.scalar,
                          (ma._reconstruct, "numpy.core.multiarray._reconstruct"),
                          (ma.scalar, "numpy.core.multiarray.scalar")]
    allowed += [type(np.dtype(t)) for t in _SAFE_NUMPY_SCALARS]
    return allowed


def _unsafe_globals(path: str) -> str:
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # legacy (non-zip) files cannot be scanned; the refusal itself still holds
        return "unknown objects"
    allowed = {f"{getattr(g, '__module__', '')}.{getattr(g, '__qualname__', '')}" if not isinstance(g, tuple)
               else g[1] for g in safe_globals()}
    bad = [n for n in names if n not in allowed]
    return ", ".join(bad[:5]) if bad else "objects outside the allow-list"


def safe_load(path: str | os.PathLike) -> Dict[str, Any]:
    """Load a checkpoint dict with ``weights_only=True`` onto the CPU.

    Raises:
        NnPreError: the file is missing, unreadable, not a dict, or contains any object outside
            :func:`safe_globals` (nothing from such a file is executed).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        fail(f"{path}: checkpoint file not found")
    try:
        with torch.serialization.safe_globals(safe_globals()):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        fail(f"{path}: refused to load: the file contains Python objects outside the safe allow-list "
             f"({_unsafe_globals(path)}); nnpre loads checkpoints with weights_only=True and never runs code "
             f"from them. Only use checkpoints from a trusted source, re-saved with tensors and plain values")
    except Exception as e:  # truncated / corrupt / not a torch file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        fail(f"{path}: cannot read the checkpoint ({first[:200]}); is the file complete and a torch.save file?")
    if not isinstance(obj, dict):
        fail(f"{path}: expected a checkpoint dict, found a {type(obj).__name__}")
    return obj


def save_checkpoint_atomic(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` via a temporary file and a rename (readers never see a partial file)."""
    write_with(lambda tmp: torch.save(obj, tmp), path)


def strip_prefixes(state_dict: Mapping[str, Any]) -> "OrderedDict[str, Any]":
    """Remove leading ``module.`` / ``_orig_mod.`` (DDP / torch.compile), repeatedly, from every key."""
    out: "OrderedDict[str, Any]" = OrderedDict()
    for key, value in state_dict.items():
        k = str(key)
        changed = True
        while changed:
            changed = False
            for p in WRAPPER_PREFIXES:
                if k.startswith(p):
                    k, changed = k[len(p):], True
        out[k] = value
    return out


@dataclass
class PretrainedCheckpoint:
    """A pretrained network's weights and its adaptation plan.

    Attributes:
        state_dict: prefix-stripped ``network_weights`` (CPU tensors, full network as saved).
        plan: the checkpoint's :class:`AdaptationPlan` (or the one derived / defaulted for it).
        source_format: 'nnpre' | 'nnssl' | 'nnunet'.
        path: the file it was read from.
        meta: small facts about the source (trainer_name, current_epoch, how the plan was obtained,
            ``strides_known``, the checkpoint's ``citations`` list if it has one).
    """

    state_dict: "OrderedDict[str, torch.Tensor]"
    plan: AdaptationPlan
    source_format: str
    path: str
    meta: Dict[str, Any] = field(default_factory=dict)

    def _under(self, prefix: str) -> bool:
        return any(k.startswith(prefix + ".") for k in self.state_dict)

    def encoder_state_dict(self) -> "OrderedDict[str, torch.Tensor]":
        """Only the keys under ``plan.key_to_encoder`` or ``plan.key_to_stem`` (full key names)."""
        prefixes = tuple(p + "." for p in (self.plan.key_to_encoder, self.plan.key_to_stem))
        return OrderedDict((k, v) for k, v in self.state_dict.items() if k.startswith(prefixes))

    @property
    def stem_input_channels(self) -> Optional[int]:
        """C of the in-projection weight (F, C, k, k, k), or None if the checkpoint has none."""
        return _stem_channels(self.state_dict, self.plan.keys_to_in_proj)


def _stem_channels(state_dict: Mapping[str, torch.Tensor], keys_to_in_proj) -> Optional[int]:
    for k in keys_to_in_proj:
        w = state_dict.get(f"{k}.weight")
        if isinstance(w, torch.Tensor) and w.ndim >= 3:
            return int(w.shape[1])
    return None


def _nnunet_plans(ckpt: Mapping[str, Any]) -> tuple[Optional[dict], Optional[str], Optional[dict]]:
    init = ckpt.get("init_args")
    if not isinstance(init, dict):
        return None, None, None
    plans, cfg = init.get("plans"), init.get("configuration")
    if not (isinstance(plans, dict) and isinstance(plans.get("configurations"), dict) and isinstance(cfg, str)
            and cfg in plans["configurations"]):
        return None, None, None
    ds = init.get("dataset_json") if isinstance(init.get("dataset_json"), dict) else None
    return plans, cfg, ds


def inferred_plan(sd: Mapping[str, torch.Tensor], path: str = "<memory>"):
    """(AdaptationPlan, InferredArchitecture) of a bare state dict (no adaptation plan, no nnU-Net init_args).

    The architecture comes from :func:`nnpre.architecture.infer_arch_from_state_dict`; what no tensor stores
    is nnssl's default ``onemmiso`` configuration (1 mm, z-score) with a 160³ patch, rounded up to a multiple
    of the total stride per axis. Unknown strides are flagged in the plan's ``nnpre`` extras.
    """
    import copy

    inferred = infer_arch_from_state_dict(sd, where=str(path))
    kw = inferred.arch_kwargs
    total = np.prod(np.array(kw["strides"]), axis=0)
    patch = [int(-(-INFERRED_PATCH_EDGE // int(t)) * int(t)) for t in total]
    cfg = copy.deepcopy(NNSSL_ONEMMISO)
    cfg["patch_size"] = patch
    plan = AdaptationPlan(
        architecture_plans={"arch_class_name": inferred.family, "arch_kwargs": kw,
                            "arch_kwargs_requiring_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]},
        pretrain_plan={"dataset_name": "unknown", "plans_name": "inferred", "transpose_forward": [0, 1, 2],
                       "transpose_backward": [0, 1, 2], "configurations": {"onemmiso": cfg}},
        pretrain_num_input_channels=inferred.input_channels,
        recommended_downstream_patchsize=patch,
        extras={} if inferred.strides_known else {STRIDES_UNKNOWN: True},
        **key_layout(inferred.family),
    )
    return plan, inferred


def pretrained_from_dict(ckpt: Mapping[str, Any], path: str = "<memory>") -> PretrainedCheckpoint:
    """Interpret an already loaded checkpoint dict (see :func:`read_pretrained`)."""
    sd = ckpt.get("network_weights")
    if not isinstance(sd, Mapping) or not sd:
        fail(f"{path}: no 'network_weights' state dict; this is not an nnU-Net, nnssl or nnpre checkpoint")
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        fail(f"{path}: network_weights['{bad[0]}'] is not a tensor; the checkpoint is malformed")
    sd = strip_prefixes(sd)
    meta = {k: ckpt[k] for k in ("trainer_name", "current_epoch") if k in ckpt and isinstance(ckpt[k], (str, int))}
    if isinstance(ckpt.get("citations"), list):  # nnssl release checkpoints: papers to cite
        meta["citations"] = [c for c in ckpt["citations"] if isinstance(c, dict)]
    raw_plan = ckpt.get(ADAPTATION_PLAN_KEY)
    if raw_plan is not None:
        plan = AdaptationPlan.from_dict(raw_plan, source=path)
        fmt = "nnpre" if isinstance(raw_plan, dict) and NNPRE_EXTRAS_KEY in raw_plan else "nnssl"
        meta["plan"] = "stored"
    else:
        plans, cfg, ds = _nnunet_plans(ckpt)
        if plans is not None:
            arch_name = plans["configurations"][cfg].get("architecture", {}).get("network_class_name")
            keys = key_layout(arch_name)
            c_in = _stem_channels(sd, keys["keys_to_in_proj"])
            if c_in is None:
                c_in = len((ds or {}).get("channel_names", {})) or 1
            plan = from_nnunet_plans(plans, cfg, c_in, channel_names=(ds or {}).get("channel_names"))
            fmt = "nnunet"
            meta["plan"] = f"derived from init_args plans '{plans.get('plans_name', '?')}' / {cfg}"
        else:
            plan, inferred = inferred_plan(sd, path)
            fmt = "nnssl"
            meta["plan"] = "inferred from the state dict"
            print(f"note: {path} carries no {ADAPTATION_PLAN_KEY}; {inferred.describe()}", file=sys.stderr)
    meta["strides_known"] = not bool(plan.extras.get(STRIDES_UNKNOWN))
    return PretrainedCheckpoint(state_dict=sd, plan=plan, source_format=fmt, path=str(path), meta=meta)


def read_pretrained(path: str | os.PathLike) -> PretrainedCheckpoint:
    """Safely load ``path`` and detect its format (nnpre / nnssl / nnunet).

    A checkpoint without an adaptation plan and without nnU-Net ``init_args`` gets a plan inferred from its
    state dict (:func:`inferred_plan`); one line saying what was inferred is printed
    to stderr (nnssl's own loader would raise ``KeyError`` here).
    """
    path = os.fspath(path)
    return pretrained_from_dict(safe_load(path), path)
