"""``probe-linear``: frozen encoder, one trained 1×1×1 convolution per encoder stage (see :mod:`.probe`).

What trains (segmentation): ``decoder.heads.<l>.weight`` / ``.bias`` only — C_l × num_classes + num_classes
per stage. Detection: the encoder is frozen, the (linear) UFPN decoder and the detection heads train.
"""
from __future__ import annotations

from nnpre_trainers.adapters.probe import ProbeAdapter
from nnpre_trainers.adapters.registry import register_adapter


@register_adapter("probe-linear")
class LinearProbeAdapter(ProbeAdapter):
    """Trains: the per-stage linear 1×1×1 probe heads only (segmentation); UFPN decoder + heads (detection).
    Frozen: the whole encoder. The nnU-Net decoder is replaced by the probe."""

    kind = "linear"
