"""Merging adapters at the state-dict level, for exports of fine-tuned checkpoints (``nnPre_export --full``).

A fine-tuned checkpoint of an adapter run stores the **unmerged** network (``...conv.base.weight``,
``...conv.lora_A.weight``, ...) plus the adapter record (``nnpre_run["adapter"]``, written by the trainer,
or ``nnpre_adapter``; ``Adapter.to_dict()``), so ``--c`` can rebuild it. :func:`merged_checkpoint` turns it
into an ordinary nnU-Net checkpoint whose ``network_weights`` carry exactly the plain network's keys, so
stock ``nnUNetv2_predict`` (and ``nnPre_predict``) load it without knowing about adapters. The merge works on
tensors only — no network is built — so it serves segmentation U-Nets and the Retina U-Net alike; every
alias of a wrapped conv (``.conv.`` and ``.all_modules.0.``) has its own keys in the state dict and is
merged the same way.

Per adapter: ``full`` → unchanged; ``lora`` → ``W = W_base + (alpha / rank) · B·A`` (exact, as
:meth:`LoRAConv.merged`); ``molre`` → refused unless ``approximate`` (fixed routing ``gate_mean``, as
:meth:`MoLREConv.merged`); ``probe-*`` → refused when the decoder was replaced by probe heads.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Dict, Mapping, Optional

import torch

from nnpre.errors import fail
from nnpre_trainers.adapters.lora import low_rank_delta
from nnpre_trainers.adapters.probe import PROBE_PREFIX

#: Checkpoint key holding ``Adapter.to_dict()`` in fine-tuning / detection checkpoints.
ADAPTER_KEY = "nnpre_adapter"
_BASE, _A, _B = ".base.weight", ".lora_A.weight", ".lora_B.weight"


def merge_state_dict(state_dict: Mapping[str, torch.Tensor], record: Dict[str, Any],
                     approximate: bool = False) -> "OrderedDict[str, torch.Tensor]":
    """The plain network's state dict from an adapted one (see the module doc); tensors are new copies where
    merged and shared otherwise. ``record``: ``{"name": ..., "options": {...}}``."""
    name = (record or {}).get("name", "full")
    opts = dict((record or {}).get("options") or {})
    if name == "full":
        return OrderedDict(state_dict)
    if name.startswith("probe"):
        if any(k.startswith(PROBE_PREFIX) for k in state_dict):
            fail(f"a {name} checkpoint (frozen encoder + probe heads) is not the plain nnU-Net architecture and "
                 f"cannot be exported for nnUNetv2_predict; evaluate it with the trainer's own prediction")
        return OrderedDict(state_dict)
    if name not in ("lora", "molre"):
        fail(f"cannot merge adapter {name!r}: unknown to this nnpre version")
    if name == "molre" and not approximate:
        fail("MoLRE routing depends on each input, so its experts cannot be folded exactly into plain weights; "
             "predict with the unmerged network, or pass --approximate-molre (experts fixed at their mean "
             "training routing)")
    rank = int(opts["rank"])
    scaling = float(opts["alpha"]) / rank
    prefixes = [k[: -len(_BASE)] for k in state_dict if k.endswith(_BASE) and k[: -len(_BASE)] + _A in state_dict]
    wrapped = set(prefixes)
    out: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    for k, v in state_dict.items():
        prefix = next((p for p in (k.rsplit(".", 2)[0], k.rsplit(".", 1)[0]) if p in wrapped), None)
        if prefix is None:
            out[k] = v
            continue
        leaf = k[len(prefix):]
        if leaf == _BASE:
            a, b = state_dict[prefix + _A], state_dict[prefix + _B]
            if name == "molre":
                g = state_dict[prefix + ".gate_mean"].to(a.dtype).repeat_interleave(rank)
                a = a * g.view(-1, *([1] * (a.dim() - 1)))
            out[prefix + ".weight"] = v + (scaling * low_rank_delta(a.float(), b.float(), v.shape)).to(v.dtype)
        elif leaf == ".base.bias":
            out[prefix + ".bias"] = v
        # lora_A / lora_B / router / gate_mean: folded above, dropped
    return out


def adapter_record(checkpoint: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The adapter record of a checkpoint: ``nnpre_adapter``, else the trainer's ``nnpre_run["adapter"]``
    (``{"name", "options"}``); None for runs without an adapter."""
    rec = checkpoint.get(ADAPTER_KEY) or (checkpoint.get("nnpre_run") or {}).get("adapter")
    return dict(rec) if rec else None


def merged_checkpoint(checkpoint: Dict[str, Any], approximate: bool = False) -> Dict[str, Any]:
    """A copy of a fine-tuned adapter checkpoint with merged ``network_weights`` (plain keys), no optimizer
    state (it refers to adapter tensors) and ``nnpre_adapter`` replaced by ``nnpre_adapter_merged`` (the record
    plus whether the merge was approximate). Other entries (``init_args``, ``trainer_name``, ...) are kept, so
    the result can be a run folder's ``checkpoint_final.pth`` for ``nnUNetv2_predict``."""
    record = adapter_record(checkpoint)
    if not record:
        fail("the checkpoint has no adapter record ('nnpre_adapter' or 'nnpre_run.adapter'); nothing to merge")
    out = {k: v for k, v in checkpoint.items() if k not in (ADAPTER_KEY, "optimizer_state", "grad_scaler_state")}
    if isinstance(out.get("nnpre_run"), dict):  # the merged network has no adapter: --c must not rebuild one
        out["nnpre_run"] = {**out["nnpre_run"], "adapter": None}
    out["network_weights"] = merge_state_dict(checkpoint["network_weights"], record, approximate)
    out["nnpre_adapter_merged"] = {**record, "approximate": bool(approximate and record.get("name") == "molre")}
    return out
