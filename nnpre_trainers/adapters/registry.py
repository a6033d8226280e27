"""Adapter registry: ``register_adapter`` (class decorator), ``get_adapter``, ``list_adapters``."""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Type

from nnpre.errors import fail
from nnpre.registry import Registry
from nnpre_trainers.adapters.base import Adapter

_REGISTRY: Registry[Type[Adapter]] = Registry("adapter")


def register_adapter(name: str) -> Callable[[Type[Adapter]], Type[Adapter]]:
    """Class decorator: make ``cls`` available as ``--adapter NAME`` (sets ``cls.name``)."""
    return _REGISTRY.register(name)


def list_adapters() -> List[str]:
    """Registered adapter names, sorted."""
    return _REGISTRY.names()


def get_adapter(name: str, **options: Any) -> Adapter:
    """An adapter instance; options that are None are left at the adapter's defaults.

    Unknown names and options stop with one ``NnPreError`` line listing what exists.
    """
    cls = _REGISTRY.get(name)
    opts = {k: v for k, v in options.items() if v is not None}
    try:
        return cls(**opts)
    except TypeError as e:
        fail(f"adapter {name!r} does not take these options {sorted(opts)}: {e}")


def adapter_from_dict(record: Optional[Dict[str, Any]]) -> Adapter:
    """Inverse of :meth:`Adapter.to_dict` (``None`` → the ``full`` adapter, i.e. runs before adapters existed)."""
    if not record:
        return get_adapter("full")
    return get_adapter(record["name"], **dict(record.get("options") or {}))
