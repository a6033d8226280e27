"""``probe-mlp``: frozen encoder, a small per-stage MLP (1×1×1 conv C_l → C_l, nonlinearity, 1×1×1 conv
C_l → num_classes) on its features (see :mod:`.probe`). Segmentation U-Nets only.

What trains: ``decoder.heads.<l>.0.*`` and ``decoder.heads.<l>.2.*`` only.
"""
from __future__ import annotations

from nnpre_trainers.adapters.probe import ProbeAdapter
from nnpre_trainers.adapters.registry import register_adapter


@register_adapter("probe-mlp")
class MLPProbeAdapter(ProbeAdapter):
    """Trains: the per-stage MLP probe heads only. Frozen: the whole encoder. The nnU-Net decoder is replaced."""

    kind = "mlp"
