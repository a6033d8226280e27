"""``full``: plain full fine-tuning (nnpre's behaviour before adapters existed).

Adds nothing; every parameter may train (which groups actually train in which stage is the fine-tuning
schedule's business: decoder-first warm-up, then the whole network). :meth:`merge` is a no-op.
"""
from __future__ import annotations

from nnpre_trainers.adapters.base import Adapter
from nnpre_trainers.adapters.registry import register_adapter


@register_adapter("full")
class FullAdapter(Adapter):
    """Trains: everything (encoder, decoder, heads). Adds: nothing."""

    def is_trainable(self, name: str) -> bool:
        return True
