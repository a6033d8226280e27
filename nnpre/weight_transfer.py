"""Load a pretrained encoder (and stem) into a freshly built nnU-Net network.

Only the encoder and the stem are transferred; the decoder and the segmentation layers keep their
random (He) initialisation, as in nnssl / nnU-Net's ``PretrainedTrainer``
(``nnunetv2/training/nnUNetTrainer/pretraining/pretrainedTrainer.py`` on nnU-Net master).

The weights are loaded through submodules, never by guessing prefixes: the checkpoint keys under
``plan.key_to_encoder`` / ``plan.key_to_stem`` are loaded strictly into
``network.get_submodule(network.key_to_encoder)`` / ``get_submodule(network.key_to_stem)``. This fills
every alias of a tensor at once (``conv`` and ``all_modules.0``, ``encoder.*`` and the decoder's
``decoder.encoder.*`` view share storage).

Before anything is copied a compatibility gate compares the checkpoint's planned encoder (stages,
features, kernels, strides, blocks) with the target network and raises a one-line
:class:`~nnpre.errors.NnPreError` listing every difference and the fix (re-plan with
``nnPre_plan --like``). Nothing is modified when the gate fails.

Stem remapping when the input channel counts differ (weights (F, C, k, k, k); the bias is never
changed):

- ``by-name``: both sides name their channels and every target channel name exists in the
  checkpoint (case-insensitive): target channel j takes the checkpoint column of the same name. This
  also reorders channels when C is equal.
- ``sum-spread`` (otherwise): ``W' = repeat(W.sum(1), C_down) / C_down``. For C_pt = 1 this is exactly
  nnssl/nnU-Net's ``W.repeat(1, C_down, 1, 1, 1) / C_down``. In general it keeps the stem's response to
  an input whose channels are all equal: conv(W', x repeated C_down times) = conv(W, x repeated C_pt
  times).

Input channels that a pretext task appended after the image channels (``plan.extra_input_channels``,
e.g. a diffusion conditioning channel) are dropped from the stem weight first; that also counts as a
remapped stem.

A remapped stem is reported (``TransferReport.stem_remapped``) so the fine-tuning schedule trains it
during the decoder warm-up.
"""
from __future__ import annotations

import copy
import os
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from nnpre.adaptation_plan import ordered_channel_names
from nnpre.architecture import (  # noqa: F401 - unwrap / network_* re-exported for older imports
    key_layout,
    network_arch_kwargs,
    network_family,
    stage_description,
    unwrap,
)
from nnpre.atomic import write_json
from nnpre.checkpoints import PretrainedCheckpoint, read_pretrained
from nnpre.errors import fail

#: Topology fields compared by the compatibility gate (see :func:`nnpre.architecture.stage_description`).
COMPARED_FIELDS = ("network", "conv_dim", "n_stages", "features_per_stage", "kernel_sizes", "strides",
                   "blocks_per_stage")
DECODER_ENCODER_PREFIX = "decoder.encoder."


@dataclass
class TransferReport:
    """What :func:`transfer_encoder` did, by state-dict key of the target network.

    Attributes:
        loaded: target keys that received pretrained values (encoder + stem, all aliases; the
            ``decoder.encoder.*`` views of the same tensors are implied and not listed).
        remapped: subset of ``loaded`` whose values were channel-remapped (stem in-projection weight).
        skipped: checkpoint keys not used (decoder, seg layers, pretext heads, ...; the checkpoint's own
            ``decoder.encoder.*`` aliases are counted in ``notes`` instead).
        missing: target keys left at their initialisation (decoder and seg layers).
        notes: human-readable remarks (source, stem rule, alias counts).
    """

    loaded: List[str] = field(default_factory=list)
    remapped: List[str] = field(default_factory=list)
    skipped: List[str] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    source: str = ""
    source_format: str = ""

    @property
    def stem_remapped(self) -> bool:
        """True when the stem's input projection was remapped (train it during the warm-up)."""
        return bool(self.remapped)

    def summary(self) -> str:
        head = (f"pretrained encoder from {self.source or '?'} ({self.source_format or '?'}): "
                f"{len(self.loaded)} keys loaded, {len(self.remapped)} remapped, {len(self.skipped)} checkpoint "
                f"keys skipped, {len(self.missing)} target keys left at init")
        lines = [head]
        if self.remapped:
            lines.append("  remapped: " + ", ".join(self.remapped))
        lines += ["  note: " + n for n in self.notes]
        return "\n".join(lines)

    def __str__(self) -> str:  # printable
        return self.summary()

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["stem_remapped"] = self.stem_remapped
        return d

    def save(self, path: str | os.PathLike) -> None:
        """Atomically write the report as JSON (e.g. ``<run folder>/pretrained_transfer.json``)."""
        write_json(self.to_dict(), path)


# ---------------------------------------------------------------------------------------------- helpers
def check_compatibility(checkpoint_arch_kwargs: Dict[str, Any], target_arch_kwargs: Dict[str, Any],
                        checkpoint_class: Optional[str] = None, target_class: Optional[str] = None) -> List[str]:
    """Differences between two encoder topologies; empty when the encoder weights fit.

    Compares the network class (when both are given), conv dimensionality, ``n_stages``,
    ``features_per_stage``, ``kernel_sizes``, ``strides`` and blocks per stage. Ints and lists are
    normalised first, so ``3`` equals ``[3, 3, 3]``.

    Returns:
        One string per differing field, e.g. ``"n_stages: checkpoint 6, target 5"``.
    """
    a = stage_description(checkpoint_arch_kwargs, checkpoint_class)
    b = stage_description(target_arch_kwargs, target_class)
    diffs = []
    for f in COMPARED_FIELDS:
        if f == "network" and (a[f] is None or b[f] is None):
            continue
        if a[f] != b[f]:
            diffs.append(f"{f}: checkpoint {_compact(a[f])}, target {_compact(b[f])}")
    return diffs


def _compact(v: Any) -> str:
    return str(v).replace(" ", "")


def stem_remap_rule(c_pt: int, c_down: int, source_channel_names: Any = None,
                    target_channel_names: Any = None) -> Tuple[str, Optional[List[int]]]:
    """Which rule maps a C_pt-channel stem onto C_down channels (see the module docstring).

    Returns:
        ``("identity", None)``, ``("by-name", index)`` with ``index[j]`` the checkpoint column for target
        channel j, or ``("sum-spread", None)``.
    """
    src = ordered_channel_names(source_channel_names)
    tgt = ordered_channel_names(target_channel_names)
    if src is not None and tgt is not None and len(src) == c_pt and len(tgt) == c_down:
        lookup = {n.strip().lower(): i for i, n in enumerate(src)}
        if len(lookup) == len(src) and all(n.strip().lower() in lookup for n in tgt):
            index = [lookup[n.strip().lower()] for n in tgt]
            if c_pt == c_down and index == list(range(c_pt)):
                return "identity", None
            return "by-name", index
    if c_pt == c_down:
        return "identity", None
    return "sum-spread", None


def remap_stem_weight(w: torch.Tensor, c_down: int, source_channel_names: Any = None,
                      target_channel_names: Any = None) -> torch.Tensor:
    """Map a stem conv weight (F, C_pt, *kernel) to (F, C_down, *kernel).

    Args:
        w: pretrained in-projection weight, shape (F, C_pt, k, k, k) (or 2-D kernels).
        c_down: input channels of the downstream network.
        source_channel_names / target_channel_names: optional nnU-Net ``channel_names`` dicts (or lists)
            of the checkpoint and the target; used for the ``by-name`` rule.

    Returns:
        A new tensor (F, C_down, *kernel); ``by-name`` copies columns, ``sum-spread`` computes
        ``repeat(W.sum(1), C_down) / C_down`` (nnssl's rule for C_pt = 1).
    """
    if w.ndim < 3:
        fail(f"stem weight must be (F, C, *kernel), got shape {tuple(w.shape)}")
    if c_down < 1:
        fail(f"number of downstream input channels must be >= 1, got {c_down}")
    rule, index = stem_remap_rule(int(w.shape[1]), int(c_down), source_channel_names, target_channel_names)
    if rule == "identity":
        return w.detach().clone()
    if rule == "by-name":
        return w.detach()[:, index].clone()
    summed = w.detach().sum(dim=1, keepdim=True)
    reps = [1, int(c_down)] + [1] * (w.ndim - 2)
    return (summed.repeat(*reps) / c_down).to(w.dtype)


def drop_pretext_input_channels(ck: PretrainedCheckpoint) -> Tuple[PretrainedCheckpoint, List[str]]:
    """Remove the input channels a pretext task appended after the image channels (e.g. diffusion).

    With ``plan.extra_input_channels = E`` and ``plan.pretrain_num_input_channels = C`` the stem weight is
    (F, C + E, *kernel); the last E columns only ever saw pretext inputs, so downstream use keeps the
    first C. Returns a new checkpoint (plan with ``extra_input_channels = 0``) and the changed keys;
    ``ck`` itself is not modified.
    """
    extra, c = int(ck.plan.extra_input_channels or 0), int(ck.plan.pretrain_num_input_channels)
    if extra <= 0:
        return ck, []
    sd = OrderedDict(ck.state_dict)
    changed = []
    for key in ck.plan.keys_to_in_proj:
        k = f"{key}.weight"
        if k in sd and sd[k].ndim >= 3 and sd[k].shape[1] == c + extra:
            sd[k] = sd[k][:, :c].clone()
            changed.append(k)
    plan = copy.deepcopy(ck.plan)
    plan.extra_input_channels = 0
    return PretrainedCheckpoint(state_dict=sd, plan=plan, source_format=ck.source_format, path=ck.path,
                                meta=dict(ck.meta)), changed


def _target_keys(net: nn.Module, plan_class: str) -> Dict[str, Any]:
    fam = network_family(net)
    defaults = key_layout(fam if fam in ("ResidualEncoderUNet", "PlainConvUNet") else plan_class)
    keys = {k: getattr(net, k, None) or defaults[k] for k in ("key_to_encoder", "key_to_stem", "keys_to_in_proj")}
    keys["keys_to_in_proj"] = list(keys["keys_to_in_proj"])
    return keys


def _sub_dict(sd: "OrderedDict[str, torch.Tensor]", prefix: str) -> "OrderedDict[str, torch.Tensor]":
    p = prefix + "."
    return OrderedDict((k[len(p):], v) for k, v in sd.items() if k.startswith(p))


def _mismatch_error(ck: PretrainedCheckpoint, diffs: Sequence[str]) -> None:
    shown = list(diffs[:8]) + ([f"... {len(diffs) - 8} more"] if len(diffs) > 8 else [])
    fail(f"{ck.path} ({ck.source_format}) does not fit the target network: {'; '.join(shown)}. "
         f"Fix: re-plan the target dataset with `nnPre_plan -d DATASET --like {ck.path}` so that its spacing, "
         f"patch and architecture match the checkpoint, then preprocess and train again")


# ---------------------------------------------------------------------------------------------- transfer
def transfer_encoder(source: PretrainedCheckpoint | str | os.PathLike, network: nn.Module,
                     target_channel_names: Any = None) -> TransferReport:
    """Load the encoder and stem of ``source`` into ``network`` (in place).

    Args:
        source: a :class:`PretrainedCheckpoint` or a checkpoint path (read with :func:`read_pretrained`).
        network: freshly built target network (ResidualEncoderUNet / PlainConvUNet; DDP or compiled
            wrappers are unwrapped). Its input channel count may differ from the checkpoint's.
        target_channel_names: the target dataset's ``channel_names`` (enables the by-name stem rule).

    Returns:
        The :class:`TransferReport`.

    Raises:
        NnPreError: the encoder topology or any encoder/stem tensor shape (other than the stem's input
            channels) differs; the message lists the differences and the ``nnPre_plan --like`` fix.
    """
    ck = source if isinstance(source, PretrainedCheckpoint) else read_pretrained(source)
    extra = int(ck.plan.extra_input_channels or 0)
    ck, pretext_cut = drop_pretext_input_channels(ck)
    net = unwrap(network)
    plan = ck.plan
    report = TransferReport(source=ck.path, source_format=ck.source_format)

    # 1. topology gate on the planned architecture
    target_kw = network_arch_kwargs(net)
    if target_kw is not None:
        plan.dotted_network_class  # noqa: B018 - raises a clear error for architectures nnpre cannot load (Primus)
        diffs = check_compatibility(plan.arch_kwargs, target_kw, plan.network_class_name, network_family(net))
        if ck.meta.get("strides_known") is False:  # encoder-only state dict without a plan: strides not stored
            diffs = [d for d in diffs if not d.startswith("strides:")]
        if diffs:
            _mismatch_error(ck, diffs)
    else:
        report.notes.append(f"target {type(net).__name__} is not a dynamic U-Net; only key/shape checks were done")

    # 2. per-submodule source dicts, stem remap, key/shape gate
    tk = _target_keys(net, plan.network_class_name)
    pairs = [(plan.key_to_encoder, tk["key_to_encoder"]), (plan.key_to_stem, tk["key_to_stem"])]
    c_pt = ck.stem_input_channels
    rules: Dict[str, str] = {}
    problems: List[str] = []
    plans_to_load = []
    for src_prefix, tgt_prefix in pairs:
        try:
            module = net.get_submodule(tgt_prefix)
        except AttributeError:
            fail(f"target network {type(net).__name__} has no submodule '{tgt_prefix}' to load the pretrained "
                 f"weights into")
        sub = _sub_dict(ck.state_dict, src_prefix)
        if not sub:
            fail(f"{ck.path}: no weights under '{src_prefix}' (the adaptation plan's key); the checkpoint does not "
                 f"hold the encoder the plan describes")
        expected = module.state_dict()
        in_proj = [k[len(tgt_prefix) + 1:] + ".weight" for k in tk["keys_to_in_proj"] if k.startswith(tgt_prefix + ".")]
        for rel in in_proj:
            if rel not in sub or rel not in expected:
                continue
            w, want = sub[rel], expected[rel].shape
            if w.ndim != len(want) or w.shape[0] != want[0] or w.shape[2:] != want[2:]:
                continue  # reported by the shape check below
            rule, _ = stem_remap_rule(w.shape[1], want[1], plan.channel_names, target_channel_names)
            done = [f"dropped {extra} pretext-only input channel(s)"] if pretext_cut else []
            if rule != "identity":
                sub[rel] = remap_stem_weight(w, want[1], plan.channel_names, target_channel_names)
                done.append(f"{rule} {w.shape[1]}->{want[1]}")
            if done:
                rules[f"{tgt_prefix}.{rel}"] = ", ".join(done)
        for rel, v in sub.items():
            if rel not in expected:
                problems.append(f"unexpected key {src_prefix}.{rel}")
            elif tuple(v.shape) != tuple(expected[rel].shape):
                problems.append(f"{tgt_prefix}.{rel}: checkpoint {list(v.shape)}, target {list(expected[rel].shape)}")
        problems += [f"missing key {tgt_prefix}.{rel}" for rel in expected if rel not in sub]
        plans_to_load.append((tgt_prefix, module, sub))
    if problems:
        _mismatch_error(ck, problems)

    # 3. load (strict) through the submodules; every alias follows
    loaded: "OrderedDict[str, None]" = OrderedDict()
    for tgt_prefix, module, sub in plans_to_load:
        module.load_state_dict(sub, strict=True)
        for rel in sub:
            loaded[f"{tgt_prefix}.{rel}"] = None
    report.loaded = list(loaded)
    report.remapped = sorted(rules)

    # 4. bookkeeping
    src_prefixes = tuple(p + "." for p, _ in pairs)
    aliases = [k for k in ck.state_dict if k.startswith(DECODER_ENCODER_PREFIX)]
    report.skipped = [k for k in ck.state_dict if not k.startswith(src_prefixes) and not k.startswith(
        DECODER_ENCODER_PREFIX)]
    report.missing = [k for k in net.state_dict() if k not in loaded and not (
        k.startswith(DECODER_ENCODER_PREFIX) and "encoder." + k[len(DECODER_ENCODER_PREFIX):] in loaded)]
    report.notes.append(f"plan: {ck.meta.get('plan', 'stored')}; encoder '{plan.key_to_encoder}' -> "
                        f"'{tk['key_to_encoder']}', stem '{plan.key_to_stem}' -> '{tk['key_to_stem']}'")
    if aliases:
        report.notes.append(f"{len(aliases)} checkpoint keys under decoder.encoder.* ignored (aliases of the encoder)")
    if rules:
        rule_text = sorted(set(rules.values()))
        report.notes.append(f"stem in-projection remapped ({', '.join(rule_text)}; bias unchanged); "
                            f"train the stem during the warm-up")
    elif c_pt is not None and plan.channel_names and target_channel_names and \
            ordered_channel_names(plan.channel_names) != ordered_channel_names(target_channel_names):
        report.notes.append(f"channel names differ (checkpoint {ordered_channel_names(plan.channel_names)}, target "
                            f"{ordered_channel_names(target_channel_names)}); stem loaded in channel order")
    return report
