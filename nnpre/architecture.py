"""Architecture facts in one place: U-Net ``arch_kwargs``, state-dict key layouts, wrapper unwrapping.

Everything here describes nnU-Net's dynamic U-Nets (dynamic-network-architectures
``architectures/unet.py``: ``PlainConvUNet``, ``ResidualEncoderUNet``) and is imported by the planners,
the weight transfer, the checkpoint reader and the detector alike; it imports nothing of nnpre but
:mod:`nnpre.errors`.

- :func:`unet_arch_kwargs` builds ``arch_kwargs`` as nnU-Net plans (``configurations.<c>.architecture``)
  and nnssl adaptation plans (``architecture_plans.arch_kwargs``) hold them.
- :data:`KEY_LAYOUTS` / :func:`key_layout`: where encoder, stem and stem in-projection live in the
  state dict (the ``key_to_encoder`` / ``key_to_stem`` / ``keys_to_in_proj`` / ``key_to_lpe`` attributes
  of the dynamic-network-architectures classes, same order).
- :func:`unwrap`: the network under DistributedDataParallel (``.module``) and ``torch.compile``
  (``._orig_mod``) wrappers, in any nesting.
- :func:`network_family`, :func:`network_arch_kwargs`, :func:`stage_description`: the encoder topology of
  a built network or of an ``arch_kwargs`` dict, normalised for comparison.
- :func:`infer_arch_from_state_dict`: the architecture of a bare ``state_dict`` (checkpoints without an
  adaptation plan).
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
from torch import nn

from nnpre.errors import fail

#: Where the dynamic U-Nets live (nnU-Net plans use the dotted path, nnssl the short name).
DYNAMIC_CLASSES = {
    "ResidualEncoderUNet": "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet",
    "PlainConvUNet": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
}
#: ``arch_kwargs`` entries given as dotted class paths (nnU-Net's ``_kw_requires_import``).
KWARGS_REQUIRING_IMPORT = ["conv_op", "norm_op", "dropout_op", "nonlin"]
#: The per-stage encoder depth key of each class.
BLOCKS_KEY = {"ResidualEncoderUNet": "n_blocks_per_stage", "PlainConvUNet": "n_conv_per_stage"}

#: nnU-Net's fixed layer choices (``default_experiment_planner.py``): Conv bias, InstanceNorm(eps 1e-5,
#: affine), no dropout, LeakyReLU(inplace).
INSTANCE_NORM_3D = "torch.nn.modules.instancenorm.InstanceNorm3d"
BATCH_NORM_3D = "torch.nn.modules.batchnorm.BatchNorm3d"
LEAKY_RELU = "torch.nn.LeakyReLU"


def unet_arch_kwargs(features_per_stage: Sequence[int], kernel_sizes: Sequence[Sequence[int]],
                     strides: Sequence[Sequence[int]], encoder_blocks: Sequence[int], decoder_convs: Sequence[int],
                     blocks_key: str = "n_blocks_per_stage", conv_bias: bool = True,
                     norm_op: Optional[str] = INSTANCE_NORM_3D, norm_op_kwargs: Optional[dict] = None,
                     nonlin: Optional[str] = LEAKY_RELU, nonlin_kwargs: Optional[dict] = None) -> Dict[str, Any]:
    """``arch_kwargs`` of a 3D dynamic U-Net as nnU-Net plans (and nnssl adaptation plans) hold them.

    Args:
        features_per_stage / kernel_sizes / strides: one entry per resolution stage.
        encoder_blocks: per stage, residual blocks (``blocks_key="n_blocks_per_stage"``, ResidualEncoderUNet)
            or convolutions (``"n_conv_per_stage"``, PlainConvUNet).
        decoder_convs: per decoder stage (n_stages - 1) the convolutions.
        conv_bias / norm_op / norm_op_kwargs / nonlin / nonlin_kwargs: layer choices; the defaults are
            nnU-Net's (Conv3d with bias, InstanceNorm3d eps 1e-5 affine, LeakyReLU inplace), dotted paths.
    """
    if norm_op_kwargs is None and norm_op is not None:
        norm_op_kwargs = {"eps": 1e-05, "affine": True}
    if nonlin_kwargs is None and nonlin is not None:
        nonlin_kwargs = {"inplace": True}
    return {
        "n_stages": len(features_per_stage),
        "features_per_stage": [int(f) for f in features_per_stage],
        "conv_op": "torch.nn.modules.conv.Conv3d",
        "kernel_sizes": [[int(x) for x in k] for k in kernel_sizes],
        "strides": [[int(x) for x in st] for st in strides],
        blocks_key: [int(b) for b in encoder_blocks],
        "n_conv_per_stage_decoder": [int(d) for d in decoder_convs],
        "conv_bias": bool(conv_bias),
        "norm_op": norm_op,
        "norm_op_kwargs": norm_op_kwargs,
        "dropout_op": None,
        "dropout_op_kwargs": None,
        "nonlin": nonlin,
        "nonlin_kwargs": nonlin_kwargs,
    }


#: nnssl ``get_res_enc_l`` (nnssl ``architectures/get_network_by_name.py``): 6 stages, 32→320 features, 3³
#: kernels, strides 1,2,2,2,2,2, blocks 1,3,4,6,6,6, one decoder conv per stage, nnU-Net's layer choices.
RESENC_L_ARCH_KWARGS: Dict[str, Any] = unet_arch_kwargs(
    [32, 64, 128, 256, 320, 320], [[3, 3, 3]] * 6, [[1, 1, 1]] + [[2, 2, 2]] * 5, [1, 3, 4, 6, 6, 6], [1] * 5)
#: nnssl architecture presets nnpre can build, mapped to (dynamic class, kwargs).
ARCH_PRESETS = {"ResEncL": ("ResidualEncoderUNet", RESENC_L_ARCH_KWARGS)}

#: State-dict locations per dynamic class, as the classes of dynamic-network-architectures >= 0.4 declare
#: them (``key_to_encoder``, ``key_to_stem``, ``keys_to_in_proj`` in this order, ``key_to_lpe``).
KEY_LAYOUTS: Dict[str, Dict[str, Any]] = {
    "ResidualEncoderUNet": {
        "key_to_encoder": "encoder.stages",
        "key_to_stem": "encoder.stem",
        "keys_to_in_proj": ["encoder.stem.convs.0.conv", "encoder.stem.convs.0.all_modules.0"],
        "key_to_lpe": None,
    },
    "PlainConvUNet": {  # the stem is the first encoder stage
        "key_to_encoder": "encoder.stages",
        "key_to_stem": "encoder.stages.0",
        "keys_to_in_proj": ["encoder.stages.0.0.convs.0.all_modules.0", "encoder.stages.0.0.convs.0.conv"],
        "key_to_lpe": None,
    },
}


def key_layout(family: Optional[str]) -> Dict[str, Any]:
    """A copy of :data:`KEY_LAYOUTS` for ``family`` (short class or preset name; ResEnc layout otherwise)."""
    name = resolve_family(family)
    return copy.deepcopy(KEY_LAYOUTS.get(name, KEY_LAYOUTS["ResidualEncoderUNet"]))


def short_class_name(name: Optional[str]) -> str:
    """'dynamic_network_architectures....ResidualEncoderUNet' → 'ResidualEncoderUNet' (presets unchanged)."""
    return str(name or "").split(".")[-1]


def resolve_family(name: Optional[str]) -> str:
    """Short dynamic class name of a class path, short name or nnssl preset ("ResEncL" → ResidualEncoderUNet)."""
    short = short_class_name(name)
    return ARCH_PRESETS[short][0] if short in ARCH_PRESETS else short


def expand_int_list(value: Any, n: int) -> List[int]:
    """An int or a sequence → list of ``n`` ints (nnU-Net accepts both for blocks/features)."""
    if isinstance(value, (int, np.integer)):
        return [int(value)] * n
    return [int(v) for v in value]


# ---------------------------------------------------------------------------------------------- built networks
def unwrap(network: nn.Module) -> nn.Module:
    """The network under (Distributed)DataParallel (``.module``) and torch.compile (``._orig_mod``) wrappers."""
    changed = True
    while changed:
        changed = False
        if isinstance(network, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            network, changed = network.module, True
        orig = getattr(network, "_orig_mod", None)
        if isinstance(orig, nn.Module):
            network, changed = orig, True
    return network


def encoder_family(encoder: nn.Module) -> str:
    """U-Net class whose key layout an nnU-Net encoder has: own ``stem`` → ResidualEncoderUNet, else PlainConvUNet."""
    return "ResidualEncoderUNet" if getattr(encoder, "stem", None) is not None else "PlainConvUNet"


def network_family(network: nn.Module) -> str:
    """'ResidualEncoderUNet' / 'PlainConvUNet' for those classes and their subclasses (and for networks that
    declare ``encoder_family``, e.g. the Retina U-Net), else the class name."""
    from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet

    net = unwrap(network)
    fam = getattr(net, "encoder_family", None)
    if isinstance(fam, str):
        return fam
    for cls in (ResidualEncoderUNet, PlainConvUNet):
        if isinstance(net, cls):
            return cls.__name__
    return type(net).__name__


def network_arch_kwargs(network: nn.Module) -> Optional[Dict[str, Any]]:
    """Encoder topology of a built dynamic U-Net in ``arch_kwargs`` form, or None if it is not one.

    Read from the encoder's attributes (``output_channels``, ``kernel_sizes``, ``strides``, ``conv_op``)
    and the number of blocks / convs in each stage.
    """
    enc = getattr(unwrap(network), "encoder", None)
    if enc is None or not isinstance(getattr(enc, "stages", None), nn.Sequential):
        return None
    blocks = []
    for stage in enc.stages:
        core = list(stage)[-1] if isinstance(stage, nn.Sequential) else stage  # a pool op may come first
        if hasattr(core, "blocks"):
            blocks.append(len(core.blocks))
        elif hasattr(core, "convs"):
            blocks.append(len(core.convs))
        else:
            return None
    conv_op = getattr(enc, "conv_op", None)
    return {
        "n_stages": len(enc.stages),
        "features_per_stage": [int(f) for f in enc.output_channels],
        "kernel_sizes": enc.kernel_sizes,
        "strides": enc.strides,
        BLOCKS_KEY[encoder_family(enc)]: blocks,
        "conv_op": f"{conv_op.__module__}.{conv_op.__name__}" if conv_op is not None else None,
    }


def stage_description(arch_kwargs: Dict[str, Any], class_name: Optional[str] = None) -> Dict[str, Any]:
    """Normalised encoder topology for comparisons.

    Returns ``{"network": short class, "conv_dim": 2|3, "n_stages", "features_per_stage",
    "kernel_sizes", "strides", "blocks_per_stage"}``; ints are expanded to per-stage lists and
    per-axis triples. ``blocks_per_stage`` is ``n_blocks_per_stage`` (residual) or ``n_conv_per_stage``
    (plain conv).
    """
    n = int(arch_kwargs["n_stages"])
    conv_op = str(arch_kwargs.get("conv_op") or "")
    dim = 2 if conv_op.endswith("Conv2d") else 3 if conv_op.endswith("Conv3d") else None

    def per_axis(v: Any) -> List[List[int]]:
        if isinstance(v, (int, np.integer)):
            v = [v] * n
        out = []
        for e in v:
            if isinstance(e, (int, np.integer)):
                out.append([int(e)] * (dim or 3))
            else:
                out.append([int(x) for x in e])
        return out

    kernels = per_axis(arch_kwargs["kernel_sizes"])
    if dim is None:
        dim = len(kernels[0])
    blocks_key = "n_blocks_per_stage" if "n_blocks_per_stage" in arch_kwargs else "n_conv_per_stage"
    return {
        "network": resolve_family(class_name) or None,
        "conv_dim": dim,
        "n_stages": n,
        "features_per_stage": expand_int_list(arch_kwargs["features_per_stage"], n),
        "kernel_sizes": kernels,
        "strides": per_axis(arch_kwargs["strides"]),
        "blocks_per_stage": expand_int_list(arch_kwargs.get(blocks_key, 1), n),
    }


# ---------------------------------------------------------------------------------------------- bare state dicts
@dataclass
class InferredArchitecture:
    """What :func:`infer_arch_from_state_dict` read from a state dict.

    Attributes:
        family: "ResidualEncoderUNet" | "PlainConvUNet".
        arch_kwargs: complete ``arch_kwargs`` (strides filled with ``[1, 1, 1]`` placeholders where unknown).
        input_channels: C of the stem in-projection (F, C, k, k, k).
        strides_known: False when the strides could not be read (no decoder) and none were given.
        assumed: kwargs not stored in any tensor and taken from nnU-Net's defaults (e.g. the nonlinearity).
    """

    family: str
    arch_kwargs: Dict[str, Any]
    input_channels: int
    strides_known: bool
    assumed: List[str] = field(default_factory=list)

    def describe(self) -> str:
        """One line: what was inferred and what was assumed."""
        a = self.arch_kwargs
        ks = a["kernel_sizes"]
        kernels = f"{ks[0]}" if all(k == ks[0] for k in ks) else str(ks)
        strides = str(a["strides"]) if self.strides_known else "unknown (no decoder in the state dict)"
        r = RESENC_L_ARCH_KWARGS
        same = self.family == "ResidualEncoderUNet" and all(a[k] == r[k] for k in (
            "features_per_stage", "kernel_sizes", "n_blocks_per_stage"))
        return (f"inferred from the state dict: {self.family}{' (nnssl ResEnc-L layout)' if same else ''}, "
                f"{a['n_stages']} stages, features "
                f"{a['features_per_stage']}, {BLOCKS_KEY[self.family]} {a[BLOCKS_KEY[self.family]]}, kernels "
                f"{kernels}, strides {strides}, decoder convs {a['n_conv_per_stage_decoder']}, "
                f"norm {short_class_name(a['norm_op'])}, conv bias {a['conv_bias']}, {self.input_channels} input "
                f"channel(s)" + (f"; assumed {', '.join(self.assumed)}" if self.assumed else ""))


def _indices(keys: Sequence[str], pattern: str) -> List[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in keys for m in [rx.match(k)] if m})


def _conv_unit(sd: Mapping[str, Any], prefix: str, where: str):
    """(weight, has_bias, norm kind) of a ConvDropoutNormReLU at ``prefix`` (``.conv`` / ``.norm``)."""
    w = sd.get(f"{prefix}.conv.weight")
    if w is None or getattr(w, "ndim", 0) < 4:
        fail(f"{where}: no convolution weight at '{prefix}.conv.weight'; cannot infer the architecture")
    if f"{prefix}.norm.running_mean" in sd:
        norm = "batch"
    elif f"{prefix}.norm.weight" in sd:
        norm = "instance"
    else:
        norm = None
    return w, f"{prefix}.conv.bias" in sd, norm


def infer_arch_from_state_dict(sd: Mapping[str, Any], strides: Optional[Sequence[Sequence[int]]] = None,
                               where: str = "checkpoint") -> InferredArchitecture:
    """Read a dynamic U-Net's architecture from its ``state_dict`` (keys without wrapper prefixes).

    Read from tensor shapes: the family (``encoder.stem.*`` → ResidualEncoderUNet, ``encoder.stages.N.0.convs``
    → PlainConvUNet), stages, features (output channels of each stage), kernel sizes (conv weight
    (F, C, *kernel)), blocks / convs per stage, decoder convs per stage (0 → nnssl's one conv when the
    state dict holds no decoder), conv bias (``.conv.bias`` present), norm (affine InstanceNorm: ``norm.weight``;
    BatchNorm: ``running_mean``) and the input channels.

    Strides are not stored in any encoder tensor. They are read from the decoder's transposed convolutions
    (weight (C_in, C_out, *stride), stages 1..n-1) when the state dict holds them; stage 0 has stride 1 in
    every nnU-Net / nnssl U-Net (the segmentation output is at stage-0 resolution). Otherwise ``strides``
    must be given, or ``strides_known`` is False and the strides are placeholders.

    Raises:
        NnPreError: no dynamic U-Net encoder keys, a norm without parameters, or ``strides`` of the wrong length.
    """
    keys = list(sd)
    if any(k.startswith("encoder.stem.") for k in keys):
        family = "ResidualEncoderUNet"
        stages = _indices(keys, r"^encoder\.stages\.(\d+)\.blocks\.")
    elif any(re.match(r"^encoder\.stages\.\d+\.0\.convs\.", k) for k in keys):
        family = "PlainConvUNet"
        stages = _indices(keys, r"^encoder\.stages\.(\d+)\.0\.convs\.")
    else:
        fail(f"{where}: the state dict holds no nnU-Net U-Net encoder (no 'encoder.stem.*' or "
             f"'encoder.stages.N.0.convs.*' keys) and the checkpoint has no nnssl_adaptation_plan; nnpre cannot "
             f"tell its architecture. Export it with its adaptation plan (nnssl) or its nnU-Net init_args")
    if stages != list(range(len(stages))) or not stages:
        fail(f"{where}: encoder stages {stages} are not numbered 0..n-1; cannot infer the architecture")
    n = len(stages)
    features, kernels, blocks = [], [], []
    biases, norms = set(), set()
    for s in stages:
        if family == "ResidualEncoderUNet":
            nb = len(_indices(keys, rf"^encoder\.stages\.{s}\.blocks\.(\d+)\.conv1\.conv\.weight$"))
            last = f"encoder.stages.{s}.blocks.{nb - 1}.conv2"
            first = f"encoder.stages.{s}.blocks.0.conv1"
        else:
            nb = len(_indices(keys, rf"^encoder\.stages\.{s}\.0\.convs\.(\d+)\.conv\.weight$"))
            last = f"encoder.stages.{s}.0.convs.{nb - 1}"
            first = f"encoder.stages.{s}.0.convs.0"
        if nb < 1:
            fail(f"{where}: encoder stage {s} has no convolutions; cannot infer the architecture")
        w_last, b_last, n_last = _conv_unit(sd, last, where)
        w_first, b_first, n_first = _conv_unit(sd, first, where)
        features.append(int(w_last.shape[0]))
        kernels.append([int(x) for x in w_first.shape[2:]])
        blocks.append(nb)
        biases |= {b_last, b_first}
        norms |= {n_last, n_first}
    stem_prefix = "encoder.stem.convs.0" if family == "ResidualEncoderUNet" else "encoder.stages.0.0.convs.0"
    w_stem, b_stem, n_stem = _conv_unit(sd, stem_prefix, where)
    biases.add(b_stem)
    norms.add(n_stem)
    if len(biases) != 1 or len(norms) != 1:
        fail(f"{where}: convolutions disagree on bias / normalisation; not an nnU-Net dynamic U-Net")
    norm = norms.pop()
    if norm is None:
        fail(f"{where}: the convolutions have no normalisation parameters (non-affine or no norm); nnpre cannot "
             f"tell which, so it cannot rebuild the network. Provide a checkpoint with an nnssl_adaptation_plan")
    dim = int(w_stem.ndim) - 2
    conv_op = {3: "torch.nn.modules.conv.Conv3d", 2: "torch.nn.modules.conv.Conv2d"}.get(dim)
    if conv_op is None:
        fail(f"{where}: stem weight has {w_stem.ndim} dimensions; expected a 2D or 3D convolution")

    dec_stages = _indices(keys, r"^decoder\.stages\.(\d+)\.convs\.")
    dec_convs = [len(_indices(keys, rf"^decoder\.stages\.{i}\.convs\.(\d+)\.conv\.weight$")) for i in dec_stages]
    assumed = ["LeakyReLU(inplace) (no parameters; nnU-Net's default)"]
    if len(dec_convs) != n - 1:
        dec_convs = [1] * (n - 1)
        assumed.append("1 decoder conv per stage (nnssl's default; the state dict holds no decoder)")
    transp = [sd.get(f"decoder.transpconvs.{i}.weight") for i in range(n - 1)]
    read = None
    if all(t is not None and t.ndim == dim + 2 for t in transp):
        # decoder.transpconvs.i upsamples encoder stage n-1-i: kernel = stride of that stage
        read = [[1] * dim] + [[int(x) for x in transp[n - 1 - s].shape[2:]] for s in range(1, n)]
    known = True
    if strides is not None:
        given = [[int(x) for x in st] for st in strides]
        if len(given) != n or any(len(st) != dim for st in given):
            fail(f"{where}: --strides gives {len(given)} stage(s); the encoder has {n} stages of {dim}D strides")
        if read is not None and given != read:
            fail(f"{where}: --strides {given} contradicts the decoder's transposed convolutions ({read})")
        final = given
    elif read is not None:
        final = read
    else:
        final, known = [[1] * dim] * n, False
    norm_op = (INSTANCE_NORM_3D if norm == "instance" else BATCH_NORM_3D).replace("3d", f"{dim}d")
    norm_kwargs = {"eps": 1e-05, "affine": True} if norm == "instance" else {"eps": 1e-05, "momentum": 0.1}
    if norm == "batch":
        assumed.append("BatchNorm eps 1e-5, momentum 0.1 (torch defaults)")
    kw = unet_arch_kwargs(features, kernels, final, blocks, dec_convs, blocks_key=BLOCKS_KEY[family],
                          conv_bias=biases.pop(), norm_op=norm_op, norm_op_kwargs=norm_kwargs)
    kw["conv_op"] = conv_op
    return InferredArchitecture(family=family, arch_kwargs=kw, input_channels=int(w_stem.shape[1]),
                                strides_known=known, assumed=assumed)
