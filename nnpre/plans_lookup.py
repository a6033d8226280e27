"""Which nnU-Net plans belong to a pretrained checkpoint.

``nnPre_plan --like CKPT`` writes plans named ``nnPrePlans__<tag>`` (``<tag>`` names the checkpoint, as
nnU-Net master's ``nnUNetv2_preprocess_like_nnssl`` names its plans ``ptPlans__<name>____<data id>``,
``nnunetv2/experiment_planning/like_nnssl.py``) and records the checkpoint under the plans' top-level
``pretrain_info`` with the keys master writes (``checkpoint_path``, ``checkpoint_name``, ``key_to_encoder``,
``key_to_stem``, ``keys_to_in_proj``, ``key_to_lpe``, ``pt_num_in_channels``, ``pt_used_patchsize``,
``pt_recommended_downstream_patchsize``, ``citations``) plus ``checkpoint_sha256``.
:func:`find_plans_for_checkpoint` finds them again from ``--pretrained CKPT`` alone: by the checkpoint's
real path first, then by its SHA-256 (a moved or copied file). Plans written by master's ``like_nnssl``
match by path. :func:`canonical_architecture` makes such plans buildable by nnU-Net 2.8.x (nnssl preset
names like ``ResEncL`` → the dynamic class and its kwargs).
"""
from __future__ import annotations

import copy
import glob
import hashlib
import json
import os
import re
from typing import Any, Dict, List, Optional

from nnpre.architecture import ARCH_PRESETS, DYNAMIC_CLASSES, KWARGS_REQUIRING_IMPORT, short_class_name
from nnpre.errors import fail

#: Prefix of the plans identifier ``nnPre_plan --like`` writes (``nnPrePlans__<tag>``).
LIKE_PLANS_PREFIX = "nnPrePlans__"
#: Files in a preprocessed dataset folder that are never plans.
_NOT_PLANS = {"dataset.json", "dataset_fingerprint.json", "splits_final.json"}


def checkpoint_tag(path: str | os.PathLike) -> str:
    """Readable name of a checkpoint for plans identifiers and run folders.

    nnU-Net layout ``.../<Trainer>__<Plans>__<cfg>/fold_X/checkpoint_*.pth`` → ``<Trainer>``; any other file →
    its name without extension (``/data/openmind_mae.pth`` → ``openmind_mae``). Characters other than letters,
    digits, ``-`` and ``.`` become ``_``, and runs of ``_`` collapse to one, so the tag never contains
    nnU-Net's ``__`` separator.
    """
    path = os.path.abspath(os.fspath(path))
    stem = os.path.basename(path)
    for ext in (".pth", ".pt", ".ckpt"):
        if stem.endswith(ext):
            stem = stem[: -len(ext)]
    parent = os.path.basename(os.path.dirname(path))
    if stem.startswith("checkpoint_") and parent.startswith("fold_"):
        stem = os.path.basename(os.path.dirname(os.path.dirname(path))).split("__")[0] or stem
    tag = re.sub(r"_+", "_", re.sub(r"[^A-Za-z0-9.-]", "_", stem)).strip("_")
    return tag or "pretrained"


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file's bytes (read in 4 MiB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def pretrain_info(plan, checkpoint: str, tag: str, citations: Optional[List[Any]] = None) -> Dict[str, Any]:
    """The ``pretrain_info`` record of plans made for ``checkpoint`` (the keys nnU-Net master's ``like_nnssl``
    writes, so master's ``PretrainedTrainer`` can also use them, plus ``checkpoint_sha256``).

    Args:
        plan: the checkpoint's :class:`~nnpre.adaptation_plan.AdaptationPlan`.
        checkpoint: its path (stored absolute). tag: its name. citations: the checkpoint's ``citations`` list.
    """
    return {
        "checkpoint_path": os.path.abspath(checkpoint),
        "checkpoint_name": tag,
        "checkpoint_sha256": file_sha256(checkpoint),
        "key_to_encoder": plan.key_to_encoder,
        "key_to_stem": plan.key_to_stem,
        "keys_to_in_proj": list(plan.keys_to_in_proj),
        "key_to_lpe": plan.key_to_lpe,
        "pt_num_in_channels": int(plan.pretrain_num_input_channels),
        "pt_used_patchsize": plan.patch_size,
        "pt_recommended_downstream_patchsize": list(plan.recommended_downstream_patchsize),
        "citations": list(citations or []),
    }


def _plans_files(folder: str) -> List[str]:
    return sorted(f for f in glob.glob(os.path.join(folder, "*.json")) if os.path.basename(f) not in _NOT_PLANS)


def _load(path: str) -> Optional[dict]:
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) and isinstance(d.get("configurations"), dict) else None


def plans_for_checkpoint(folder: str, checkpoint: str | os.PathLike) -> List[str]:
    """Identifiers of the plans in ``folder`` (a ``nnUNet_preprocessed/<Dataset>`` folder) written for
    ``checkpoint``: ``pretrain_info.checkpoint_path`` is the same file, else ``checkpoint_sha256`` matches."""
    real = os.path.realpath(os.fspath(checkpoint))
    by_path, by_hash, sha = [], [], None
    for f in _plans_files(folder):
        info = (_load(f) or {}).get("pretrain_info")
        if not isinstance(info, dict) or not info.get("checkpoint_path"):
            continue
        ident = os.path.basename(f)[: -len(".json")]
        p = str(info["checkpoint_path"])
        if os.path.realpath(p if os.path.isabs(p) else os.path.join(os.getcwd(), p)) == real:
            by_path.append(ident)
        elif info.get("checkpoint_sha256"):
            sha = sha or file_sha256(real)
            if info["checkpoint_sha256"] == sha:
                by_hash.append(ident)
    return by_path or by_hash


def find_plans_for_checkpoint(dataset: str | int, checkpoint: str | os.PathLike) -> Optional[str]:
    """The plans identifier written for ``checkpoint`` in ``dataset`` (``nnPre_plan --like`` or nnU-Net master's
    ``like_nnssl``), or None when there are none.

    Raises:
        NnPreError: several plans were written for the checkpoint (pass ``-pl`` to choose).
    """
    from nnunetv2.paths import nnUNet_preprocessed

    from nnpre.nnunet_env import dataset_name

    name = dataset_name(dataset, must_exist_in="nnUNet_preprocessed")
    folder = os.path.join(nnUNet_preprocessed, name)
    if not os.path.isfile(os.fspath(checkpoint)):
        return None
    found = plans_for_checkpoint(folder, checkpoint)
    if len(found) > 1:
        fail(f"{folder} holds {len(found)} plans written for {checkpoint} ({', '.join(found)}); choose one with "
             f"-pl NAME")
    return found[0] if found else None


def unique_like_plans_name(folder: str, checkpoint: str | os.PathLike) -> str:
    """``nnPrePlans__<tag>`` for ``checkpoint``: the existing identifier when ``folder`` already has plans for
    this checkpoint, else ``<tag>``, ``<tag>_2``, ... whichever is not taken by another checkpoint's plans."""
    own = [p for p in plans_for_checkpoint(folder, checkpoint) if p.startswith(LIKE_PLANS_PREFIX)]
    if own:
        return own[0]
    tag = checkpoint_tag(checkpoint)
    i = 1
    while True:
        ident = LIKE_PLANS_PREFIX + (tag if i == 1 else f"{tag}_{i}")
        if not os.path.exists(os.path.join(folder, ident + ".json")):
            return ident
        i += 1


def canonical_architecture(plans: dict) -> dict:
    """Plans whose ``architecture`` entries nnU-Net 2.8.x can build (a copy; the input is not changed).

    nnU-Net master's ``like_nnssl`` copies the adaptation plan's ``arch_class_name`` as ``network_class_name``:
    an nnssl preset ("ResEncL", ``arch_kwargs`` null) or a short class name. Presets become the dynamic class
    with the preset's kwargs; short dynamic class names become their dotted paths. Everything else is kept.
    """
    out = copy.deepcopy(plans)
    for cfg in (out.get("configurations") or {}).values():
        arch = cfg.get("architecture") if isinstance(cfg, dict) else None
        if not isinstance(arch, dict) or not arch.get("network_class_name"):
            continue
        short = short_class_name(arch["network_class_name"])
        if short in ARCH_PRESETS and not arch.get("arch_kwargs"):
            family, kwargs = ARCH_PRESETS[short]
            arch["network_class_name"] = DYNAMIC_CLASSES[family]
            arch["arch_kwargs"] = copy.deepcopy(kwargs)
            arch["_kw_requires_import"] = list(KWARGS_REQUIRING_IMPORT)
        elif arch["network_class_name"] in DYNAMIC_CLASSES:
            arch["network_class_name"] = DYNAMIC_CLASSES[arch["network_class_name"]]
        if arch.get("_kw_requires_import") is None and arch.get("arch_kwargs_requiring_import") is not None:
            arch["_kw_requires_import"] = arch.pop("arch_kwargs_requiring_import")
    return out
