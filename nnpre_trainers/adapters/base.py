"""The adapter contract and the module-surgery helpers every adapter shares.

An adapter decides **which parameters of a network train** and may add small modules to it. Its life cycle
inside a fine-tuning run (encoder weights already transferred, optimizer not yet built):

1. :meth:`Adapter.apply` mutates the network in place: wraps layers, replaces heads, sets ``requires_grad``;
2. the trainer builds its optimizer over :meth:`Adapter.trainable_parameters` (intersected with what the
   current fine-tuning stage trains); everything else stays bit-identical;
3. checkpoints store the adapted (unmerged) state dict plus :meth:`Adapter.to_dict`, so ``--c`` rebuilds
   the same modules before loading;
4. :meth:`Adapter.merge` folds the adapter into plain weights: afterwards the network is the plain
   nnU-Net architecture again and its state dict has exactly the plain network's keys (stock
   ``nnUNetv2_predict`` can load it).

Networks are nnU-Net / dynamic-network-architectures U-Nets (``PlainConvUNet``, ``ResidualEncoderUNet``) or
nnpre's Retina U-Net. Two quirks of dynamic-network-architectures matter here and are handled by
:func:`replace_module`:

* ``ConvDropoutNormReLU`` registers its conv twice, as ``.conv`` and as ``.all_modules.0``, and its
  ``forward`` runs ``all_modules``: replacing only the ``.conv`` attribute (what Hugging Face ``peft``'s
  injection does) leaves the forward pass unchanged. Every reference to a module is replaced;
* ``UNetDecoder`` keeps a reference to the encoder (``decoder.encoder``), so each encoder tensor has a
  second name ``decoder.encoder.*``; :func:`unique_named_parameters` gives every tensor one canonical
  name (the first one not under ``decoder.encoder.``), as :func:`nnpre_trainers.finetune_schedule.parameter_groups`.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Dict, List, Tuple

from torch import nn

from nnpre.architecture import unwrap

#: Prefix of the transferred (pretrained) encoder in every nnpre network.
ENCODER_PREFIX = "encoder."




def _canonical(names: List[str]) -> str:
    name = next((n for n in names if not n.startswith("decoder.encoder.")), None)
    return name if name is not None else names[0][len("decoder."):]


def unique_named_parameters(network: nn.Module) -> List[Tuple[str, nn.Parameter]]:
    """Every parameter tensor once, under its canonical name (see module doc), in registration order."""
    names: Dict[int, List[str]] = {}
    params: Dict[int, nn.Parameter] = {}
    for name, p in unwrap(network).named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
        params[id(p)] = p
    return [(_canonical(n), params[pid]) for pid, n in names.items()]


def unique_named_modules(network: nn.Module) -> List[Tuple[str, nn.Module]]:
    """Every module once, under its canonical name (first name not under ``decoder.encoder.``)."""
    names: Dict[int, List[str]] = {}
    mods: Dict[int, nn.Module] = {}
    for name, m in unwrap(network).named_modules(remove_duplicate=False):
        names.setdefault(id(m), []).append(name)
        mods[id(m)] = m
    return [(_canonical(n), mods[mid]) for mid, n in names.items()]


def replace_module(network: nn.Module, old: nn.Module, new: nn.Module) -> int:
    """Replace **every** reference to ``old`` inside ``network`` by ``new``; returns how many were replaced.

    Raises ValueError when ``old`` is not referenced (or is the network itself).
    """
    done = set()
    parents = [m for m in unwrap(network).modules() if m is not new]  # collected first: the tree changes below
    for parent in parents:  # modules() lists each parent object once
        for key, child in list(parent._modules.items()):
            if child is old and (id(parent), key) not in done:
                parent._modules[key] = new
                done.add((id(parent), key))
    if not done:
        raise ValueError(f"module {type(old).__name__} is not part of the network")
    return len(done)


def count(params) -> int:
    return int(sum(p.numel() for p in params))


class Adapter(ABC):
    """One way of choosing what trains during fine-tuning (see the module doc for the life cycle).

    Subclasses set :attr:`name` (the registry key), implement :meth:`is_trainable` (a rule on canonical
    parameter names, applied after :meth:`apply`) and, when they add modules, :meth:`apply` / :meth:`merge`.
    """

    #: registry name (``--adapter NAME``)
    name: str = ""
    #: True when :meth:`merge` reproduces the unmerged outputs exactly (to float rounding)
    exact_merge: bool = True

    # -- to override -------------------------------------------------------------------------------------
    def options(self) -> Dict[str, Any]:
        """The constructor keyword arguments (plain values), stored in checkpoints and ``adapter.json``."""
        return {}

    @abstractmethod
    def is_trainable(self, name: str) -> bool:
        """Whether the parameter with canonical ``name`` may train (in the adapted network)."""

    def is_added(self, name: str) -> bool:
        """Whether the parameter with canonical ``name`` was added by :meth:`apply` (default: none)."""
        return False

    def apply(self, network: nn.Module) -> None:
        """Mutate ``network`` in place (add modules) and set ``requires_grad`` from :meth:`is_trainable`."""
        self.set_requires_grad(network)

    def merge(self, network: nn.Module) -> None:
        """Fold the adapter into plain weights in place (default: nothing was added, nothing to fold)."""

    # -- shared --------------------------------------------------------------------------------------------
    def set_requires_grad(self, network: nn.Module) -> None:
        for n, p in unique_named_parameters(network):
            p.requires_grad_(self.is_trainable(n))

    def trainable_parameters(self, network: nn.Module) -> List[nn.Parameter]:
        """The parameters this adapter lets train (each tensor once), whatever their ``requires_grad``."""
        return [p for _, p in self.trainable_named_parameters(network)]

    def trainable_named_parameters(self, network: nn.Module) -> List[Tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in unique_named_parameters(network) if self.is_trainable(n)]

    def describe(self, network: nn.Module) -> Dict[str, Any]:
        """Parameter counts of the adapted network (each tensor counted once).

        Returns ``{"adapter", "options", "trainable", "frozen", "total", "trainable_share", "added",
        "added_share", "exact_merge"}``; ``added`` counts the parameters :meth:`apply` introduced and
        ``added_share`` relates them to the network without them (the "extra parameters" of LoRA / MoLRE).
        """
        named = unique_named_parameters(network)
        total = count(p for _, p in named)
        trainable = count(p for n, p in named if self.is_trainable(n))
        added = count(p for n, p in named if self.is_added(n))
        return {
            "adapter": self.name,
            "options": self.options(),
            "trainable": trainable,
            "frozen": total - trainable,
            "total": total,
            "trainable_share": trainable / total if total else 0.0,
            "added": added,
            "added_share": added / (total - added) if total > added else 0.0,
            "exact_merge": self.exact_merge,
        }

    def summary(self, network: nn.Module) -> str:
        """One log line from :meth:`describe`."""
        d = self.describe(network)
        opts = ", ".join(f"{k}={v}" for k, v in d["options"].items())
        return (f"adapter {d['adapter']}{f' ({opts})' if opts else ''}: {d['trainable']:,} of {d['total']:,} "
                f"parameters trainable ({100 * d['trainable_share']:.2f} %), {d['added']:,} added "
                f"({100 * d['added_share']:.2f} % of the plain network)")

    def to_dict(self) -> Dict[str, Any]:
        """``{"name": ..., "options": {...}}`` (plain values; :func:`~nnpre_trainers.adapters.adapter_from_dict`)."""
        return {"name": self.name, "options": self.options()}

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({opts})"
