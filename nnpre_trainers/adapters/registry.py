"""Adapter registry: ``register_adapter`` (class decorator), ``get_adapter``, ``list_adapters``."""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Type

from nnpre.errors import fail
from nnpre_trainers.adapters.base import Adapter

_REGISTRY: Dict[str, Type[Adapter]] = {}


def register_adapter(name: str) -> Callable[[Type[Adapter]], Type[Adapter]]:
    """Class decorator: make ``cls`` available as ``--adapter NAME`` (sets ``cls.name``)."""
    def deco(cls: Type[Adapter]) -> Type[Adapter]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"adapter {name!r} is already registered ({_REGISTRY[name].__name__})")
        cls.name = name
        _REGISTRY[name] = cls
        return cls
    return deco


def list_adapters() -> List[str]:
    """Registered adapter names, sorted."""
    return sorted(_REGISTRY)


def get_adapter(name: str, **options: Any) -> Adapter:
    """An adapter instance; options that are None are left at the adapter's defaults.

    Unknown names and options stop with one ``NnPreError`` line listing what exists.
    """
    if name not in _REGISTRY:
        fail(f"unknown adapter {name!r}; choose one of {', '.join(list_adapters())}")
    cls = _REGISTRY[name]
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
