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
from typing import Callable, List, Type

from nnpre.registry import Registry
from nnpre_trainers.pretext.base import PretextTask

_REGISTRY: Registry[Type[PretextTask]] = Registry("pretext task", choices="known tasks:")


def register_pretext(name: str) -> Callable[[Type[PretextTask]], Type[PretextTask]]:
    """Class decorator: register a :class:`PretextTask` subclass under ``name`` (sets ``cls.name``)."""
    return _REGISTRY.register(name, base=PretextTask)


def get_pretext(name: str, **overrides) -> PretextTask:
    """Instantiate the task registered as ``name`` with config ``overrides`` (unknown name/key -> NnPreError)."""
    return pretext_class(name)(**overrides)


def pretext_class(name: str) -> Type[PretextTask]:
    """The :class:`PretextTask` subclass registered as ``name`` (unknown name -> NnPreError)."""
    return _REGISTRY.get(name)


def list_pretexts() -> List[str]:
    """Sorted names of the registered tasks."""
    return _REGISTRY.names()


def default_config(name: str) -> dict:
    """The default config of task ``name`` as a plain dict (tuples stay tuples)."""
    return dataclasses.asdict(pretext_class(name).config_class())
