"""Registry of pretext tasks: one entry per method, hyperparameters as config overrides (no subclasses).

Example:
    >>> from nnpre_trainers.pretext import get_pretext, list_pretexts, default_config
    >>> list_pretexts()
    ['diffusion', 'mae', 'model_genesis']
    >>> task = get_pretext("mae", mask_ratio=0.6)
    >>> default_config("mae")["block_size"]
    16
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Type

from nnpre.errors import fail
from nnpre_trainers.pretext.base import PretextTask

_REGISTRY: Dict[str, Type[PretextTask]] = {}


def register_pretext(name: str) -> Callable[[Type[PretextTask]], Type[PretextTask]]:
    """Class decorator: register a :class:`PretextTask` subclass under ``name`` (sets ``cls.name``)."""

    def deco(cls: Type[PretextTask]) -> Type[PretextTask]:
        if not (isinstance(cls, type) and issubclass(cls, PretextTask)):
            raise TypeError(f"register_pretext('{name}') must decorate a PretextTask subclass, got {cls!r}")
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"pretext task name '{name}' is already registered by {_REGISTRY[name].__name__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def _lookup(name: str) -> Type[PretextTask]:
    if name not in _REGISTRY:
        fail(f"unknown pretext task '{name}'; known tasks: {', '.join(list_pretexts())}")
    return _REGISTRY[name]


def get_pretext(name: str, **overrides) -> PretextTask:
    """Instantiate the task registered as ``name`` with config ``overrides`` (unknown name/key -> NnPreError)."""
    return _lookup(name)(**overrides)


def list_pretexts() -> List[str]:
    """Sorted names of the registered tasks."""
    return sorted(_REGISTRY)


def default_config(name: str) -> dict:
    """The default config of task ``name`` as a plain dict (tuples stay tuples)."""
    return dataclasses.asdict(_lookup(name).config_class())
