"""One name -> entry registry, shared by the pretext tasks, the adapters and the fine-tuning tasks.

A :class:`Registry` maps names to entries (classes, or ``"module:attribute"`` import paths for entries that
live in packages imported on demand). It gives every registry the same rules:

* registering a name twice with a different entry is a programming error (``ValueError``); registering the
  same entry again is a no-op (modules may be imported twice, e.g. by tests);
* looking up an unknown name stops with one :func:`nnpre.errors.fail` line naming the kind and the sorted
  choices, e.g. ``unknown adapter 'dora'; choose one of full, lora, molre``.

Example:
    >>> reg = Registry("widget", choices="known widgets:")
    >>> reg.add("a", 1)
    1
    >>> reg.names(), reg.get("a")
    (['a'], 1)
"""
from __future__ import annotations

from typing import Callable, Dict, Generic, List, Optional, TypeVar

from nnpre.errors import fail

T = TypeVar("T")


def _describe(entry: object) -> str:
    return getattr(entry, "__name__", None) or str(entry)


class Registry(Generic[T]):
    """Named entries of one kind.

    Args:
        kind: what an entry is, as the error messages name it (``"pretext task"``, ``"adapter"``).
        choices: the words before the list of names in the unknown-name error (default ``"choose one of"``).
    """

    def __init__(self, kind: str, choices: str = "choose one of") -> None:
        self.kind = kind
        self.choices = choices
        self._entries: Dict[str, T] = {}

    def add(self, name: str, entry: T) -> T:
        """Register ``entry`` as ``name`` and return it; ``ValueError`` if ``name`` holds another entry."""
        old = self._entries.get(name)
        if old is not None and old != entry:
            raise ValueError(f"{self.kind} {name!r} is already registered ({_describe(old)})")
        self._entries[name] = entry
        return entry

    def register(self, name: str, base: Optional[type] = None) -> Callable[[T], T]:
        """Class decorator: register the class as ``name`` and set its ``name`` attribute.

        ``base``: the class must subclass it (``TypeError`` otherwise).
        """

        def deco(cls: T) -> T:
            if base is not None and not (isinstance(cls, type) and issubclass(cls, base)):
                raise TypeError(f"registering {self.kind} {name!r} needs a {base.__name__} subclass, got {cls!r}")
            self.add(name, cls)
            cls.name = name
            return cls

        return deco

    def get(self, name: str) -> T:
        """The entry registered as ``name``; unknown names stop with one line listing :meth:`names`."""
        if name not in self._entries:
            fail(f"unknown {self.kind} {name!r}; {self.choices} {', '.join(self.names())}")
        return self._entries[name]

    def names(self) -> List[str]:
        """Registered names, sorted."""
        return sorted(self._entries)

    def pop(self, name: str, default: Optional[T] = None) -> Optional[T]:
        """Remove ``name`` (e.g. an entry a test registered) and return its entry, or ``default``."""
        return self._entries.pop(name, default)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)
