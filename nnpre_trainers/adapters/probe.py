"""Probes: the pretrained encoder frozen, a light trained head on its features (shared by ``probe-linear`` /
``probe-mlp``).

Segmentation U-Nets (``PlainConvUNet`` / ``ResidualEncoderUNet``): :meth:`ProbeAdapter.apply` **replaces the
whole nnU-Net decoder** (``network.decoder``) by a :class:`ProbeDecoder`. For every encoder stage l (one per
decoder level plus the bottleneck) a head maps the stage's features (B, C_l, X_l, Y_l, Z_l) to class logits
(B, num_classes, X_l, Y_l, Z_l); coarse-to-fine, each level's logits are trilinearly upsampled to the next
finer level and added:

    out_{n-1} = head_{n-1}(f_{n-1});   out_l = head_l(f_l) + up(out_{l+1});   prediction = out_0

* ``probe-linear``: head_l is one 1×1×1 convolution (with bias). Upsampling is linear, so the prediction
  is a linear function of the multi-scale encoder features — the linear probe on concatenated upsampled
  features of vox2vec (Goncharov et al. 2023) and arXiv 2501.19265, up to the exact interpolation path;
* ``probe-mlp``: head_l is 1×1×1 conv C_l → C_l, the network's nonlinearity (LeakyReLU 0.01 for nnU-Net),
  1×1×1 conv C_l → num_classes.

With deep supervision on, the decoder returns [out_0, …, out_{n-2}] (finest first) like nnU-Net's decoder.

What trains: only the probe heads (``decoder.heads.*``). Frozen (bit-identical): the whole encoder,
including a remapped stem. In the fine-tuning schedule the decoder-first warm-up then trains the heads
only — the same parameters as the later stage (only the LR ramp differs).

Retina U-Net detectors (networks with ``head_prefixes``): the UFPN decoder has no norms and no
nonlinearities, so it is already a linear map of the encoder features; ``probe-linear`` freezes the encoder
and trains the UFPN decoder + classification / regression / segmentation heads. ``probe-mlp`` is refused
for detectors.

A probe network is not the plain nnU-Net architecture, so it cannot be exported for stock
``nnUNetv2_predict``: :meth:`ProbeAdapter.merge` refuses for segmentation (nothing is wrapped for detectors,
so there it is a no-op).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from nnpre.errors import fail
from nnpre_trainers.adapters.base import ENCODER_PREFIX, Adapter, unwrap

PROBE_PREFIX = "decoder.heads."


class ProbeDecoder(nn.Module):
    """Linear or MLP heads on every encoder stage, summed coarse-to-fine (module doc).

    Args:
        encoder_channels: C_l of every encoder stage output (``encoder.output_channels``).
        num_classes: output channels (the seg layers' ``out_channels``).
        kind: ``"linear"`` or ``"mlp"``.
        nonlin: module class for the MLP's hidden nonlinearity (nnU-Net's ``nonlin``); kwargs in ``nonlin_kwargs``.
        deep_supervision: return all levels (finest first) instead of the finest only.
    """

    def __init__(self, encoder_channels: Sequence[int], num_classes: int, kind: str = "linear",
                 nonlin: Optional[type] = None, nonlin_kwargs: Optional[dict] = None,
                 deep_supervision: bool = False):
        super().__init__()
        if kind not in ("linear", "mlp"):
            raise ValueError(f"probe kind must be 'linear' or 'mlp', got {kind!r}")
        self.kind, self.deep_supervision = kind, bool(deep_supervision)
        nonlin = nonlin or nn.LeakyReLU
        nonlin_kwargs = {"negative_slope": 1e-2, "inplace": True} if nonlin is nn.LeakyReLU and not nonlin_kwargs \
            else dict(nonlin_kwargs or {})
        heads: List[nn.Module] = []
        for c in encoder_channels:
            if kind == "linear":
                heads.append(nn.Conv3d(c, num_classes, 1))
            else:
                heads.append(nn.Sequential(nn.Conv3d(c, c, 1), nonlin(**nonlin_kwargs), nn.Conv3d(c, num_classes, 1)))
        self.heads = nn.ModuleList(heads)

    def forward(self, skips: Sequence[torch.Tensor]):
        """Encoder outputs [(B, C_l, X_l, Y_l, Z_l)] → logits (B, num_classes, X_0, Y_0, Z_0), or the list over
        levels 0..n-2 with deep supervision."""
        if len(skips) != len(self.heads):
            raise ValueError(f"probe expects {len(self.heads)} encoder outputs, got {len(skips)}")
        out = None
        outs = []
        for level in range(len(skips) - 1, -1, -1):
            y = self.heads[level](skips[level])
            if out is not None:
                y = y + F.interpolate(out, size=y.shape[2:], mode="trilinear", align_corners=False)
            out = y
            if level < len(skips) - 1:
                outs.append(out)
        if self.deep_supervision:
            return outs[::-1] if outs else [out]
        return out


def _is_detector(net: nn.Module) -> bool:
    return bool(getattr(net, "head_prefixes", ()))


class ProbeAdapter(Adapter):
    """Frozen encoder + trained probe heads (module doc); subclasses fix :attr:`kind`."""

    kind = "linear"

    def __init__(self):
        self._replaced: Optional[bool] = None  # set by apply: True for U-Nets (decoder replaced), False detectors

    def is_trainable(self, name: str) -> bool:
        if self._replaced is False:  # detector: everything but the encoder
            return not name.startswith(ENCODER_PREFIX)
        return name.startswith(PROBE_PREFIX)

    def is_added(self, name: str) -> bool:
        return self._replaced is not False and name.startswith(PROBE_PREFIX)

    def apply(self, network: nn.Module) -> None:
        net = unwrap(network)
        if isinstance(getattr(net, "decoder", None), ProbeDecoder):
            fail("the network already carries a probe head; apply once per network")
        if _is_detector(net):
            if self.kind != "linear":
                fail(f"--adapter {self.name} is for segmentation U-Nets; the Retina U-Net's UFPN decoder is "
                     f"already a linear probe of the encoder features: use --adapter probe-linear")
            self._replaced = False
        else:
            enc, dec = getattr(net, "encoder", None), getattr(net, "decoder", None)
            if enc is None or dec is None or not hasattr(enc, "output_channels") or not hasattr(dec, "seg_layers"):
                fail(f"probe adapters need an nnU-Net U-Net with .encoder.output_channels and .decoder.seg_layers, "
                     f"got {type(net).__name__}")
            num_classes = dec.seg_layers[-1].out_channels
            dev = dec.seg_layers[-1].weight.device
            probe = ProbeDecoder(enc.output_channels, num_classes, self.kind, getattr(enc, "nonlin", None),
                                 getattr(enc, "nonlin_kwargs", None), getattr(dec, "deep_supervision", False))
            net.decoder = probe.to(dev)
            self._replaced = True
        self.set_requires_grad(network)

    def merge(self, network: nn.Module) -> None:
        if isinstance(getattr(unwrap(network), "decoder", None), ProbeDecoder):
            fail(f"a {self.name} network (frozen encoder + probe heads) is not the plain nnU-Net architecture and "
                 f"cannot be exported for nnUNetv2_predict; evaluate it with the trainer's own prediction")

    def options(self) -> Dict[str, Any]:
        return {}
