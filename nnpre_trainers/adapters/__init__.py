"""Parameter-efficient fine-tuning and probing: what trains when a pretrained encoder is fine-tuned.

Registered adapters (``nnPre_train finetune|detect --adapter NAME``; contract in :mod:`.base`):

============  ==================================================================  =====================
name          trains                                                              merge → plain nnU-Net
============  ==================================================================  =====================
full          everything (nnpre's behaviour before adapters)                      no-op
lora          LoRA A/B on encoder convs + decoder + heads; encoder frozen         exact
molre         K routed low-rank experts + routers on encoder convs + decoder +    approximate only
              heads; encoder frozen                                               (input-dependent)
probe-linear  per-stage 1×1×1 conv heads replacing the decoder; encoder frozen    refused (other arch.)
probe-mlp     per-stage small MLP heads replacing the decoder; encoder frozen     refused (other arch.)
============  ==================================================================  =====================

LoRA is our own small module, not Hugging Face ``peft`` (see :mod:`.lora` and the README for why).
"""
from nnpre_trainers.adapters import full, lora, molre, probe_linear, probe_mlp  # noqa: F401  (registers)
from nnpre_trainers.adapters.base import Adapter, replace_module, unique_named_modules, unique_named_parameters, unwrap
from nnpre_trainers.adapters.lora import DEFAULT_LAYERS, LoRAAdapter, LoRAConv
from nnpre_trainers.adapters.molre import MoLREAdapter, MoLREConv
from nnpre_trainers.adapters.probe import ProbeAdapter, ProbeDecoder
from nnpre_trainers.adapters.registry import adapter_from_dict, get_adapter, list_adapters, register_adapter

__all__ = [
    "Adapter", "DEFAULT_LAYERS", "LoRAAdapter", "LoRAConv", "MoLREAdapter", "MoLREConv", "ProbeAdapter",
    "ProbeDecoder", "adapter_from_dict", "get_adapter", "list_adapters", "register_adapter", "replace_module",
    "unique_named_modules", "unique_named_parameters", "unwrap",
]
