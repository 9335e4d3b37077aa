"""Loading the policy, its frozen reference and its processor; freezing; LoRA adapters.

Checkpoints load through ``AutoModelForImageTextToText`` / ``AutoProcessor`` exactly as a user
would load ``OpenGVLab/InternVL3-8B-hf``. ``builtin:<size>`` (for instance ``builtin:tiny``)
names a random InternVL built by :mod:`mpo.model.tiny` into ``~/.cache/mpo`` on first use, so the
CPU recipes run from a fresh clone with no download.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from mpo.cache import cache_dir
from mpo.config import LoraConfig, ModelConfig, Recipe

BUILTIN_PREFIX = "builtin:"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_path(name_or_path: str) -> str:
    """Maps ``builtin:<size>[-seed<N>]`` to a cached tiny checkpoint, building it once."""
    if not name_or_path.startswith(BUILTIN_PREFIX):
        return name_or_path
    from mpo.model.tiny import build_tiny_model

    spec = name_or_path[len(BUILTIN_PREFIX) :]
    size, _, seed = spec.partition("-seed")
    path = cache_dir() / f"tiny-{size}-seed{seed or 0}"
    if not (path / "config.json").exists():
        build_tiny_model(path, size=size, seed=int(seed or 0))
    return str(path)


def reference_model(recipe: Recipe) -> ModelConfig:
    """The frozen reference's model settings: the policy's, from ``reference.name_or_path`` when set."""
    return dataclasses.replace(recipe.model, name_or_path=recipe.reference.name_or_path or recipe.model.name_or_path)


def load_processor(config: ModelConfig):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(resolve_model_path(config.name_or_path), trust_remote_code=config.trust_remote_code)


def load_model(config: ModelConfig) -> nn.Module:
    """The HF model in ``config.dtype`` with the recipe's attention implementation."""
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(
        resolve_model_path(config.name_or_path),
        dtype=DTYPES[config.dtype],
        attn_implementation=config.attn_implementation,
        trust_remote_code=config.trust_remote_code,
    )


def base_model(model: nn.Module) -> nn.Module:
    """The ``InternVLForConditionalGeneration`` under a peft wrapper (adapters stay injected)."""
    from peft import PeftModel

    return model.get_base_model() if isinstance(model, PeftModel) else model


def apply_freezing(model: nn.Module, config: ModelConfig) -> None:
    """Freezes the vision tower, the projector and/or the language model (+ LM head)."""
    parts = {
        "vision": (config.freeze_vision, [model.model.vision_tower]),
        "projector": (config.freeze_projector, [model.model.multi_modal_projector]),
        "language": (config.freeze_language, [model.model.language_model, model.lm_head]),
    }
    for frozen, modules in parts.values():
        if frozen:
            for module in modules:
                module.requires_grad_(False)


def vision_is_frozen(model: nn.Module) -> bool:
    """True when no vision-tower or projector weight gets a gradient (then the reference can reuse
    the policy's image features: they are the same function of the same pixels)."""
    inner = base_model(model).model
    modules = [inner.vision_tower, inner.multi_modal_projector]
    return not any(p.requires_grad for m in modules for p in m.parameters())


def add_lora(model: nn.Module, config: LoraConfig) -> nn.Module:
    """Wraps the model with peft LoRA adapters on the language model (and the vision tower)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    # Anchored regexes keep adapters off the projector and, unless asked, the vision tower.
    language = rf".*\.language_model\..*\.({'|'.join(config.target_modules)})$"
    vision = r".*\.vision_tower\..*\.(q_proj|k_proj|v_proj|projection_layer|fc1|fc2)$"
    pattern = f"({language})|({vision})" if config.vision else language
    peft_config = PeftLoraConfig(
        r=config.r,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=pattern,
        bias="none",
    )
    return get_peft_model(model, peft_config)


def load_policy(config: ModelConfig) -> nn.Module:
    return prepare_policy(load_model(config), config)


def prepare_policy(model: nn.Module, config: ModelConfig) -> nn.Module:
    """The recipe's freezing, LoRA adapters and activation checkpointing on a loaded model."""
    apply_freezing(model, config)
    if config.lora.enabled:
        model = add_lora(model, config.lora)
    if config.gradient_checkpointing:
        # Non-reentrant checkpointing works with frozen embeddings and with peft.
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        # transformers also hooks every input embedding of the model to make its output require
        # grad, the vision tower's patch embedding included: only reentrant checkpointing needs
        # that, and it makes a frozen vision tower build a graph, recompute and backpropagate at
        # every step (measured at InternVL3-1B size: one LoRA backward 23.8 s -> 9.9 s without).
        model.disable_input_require_grads()
    model.config.use_cache = False
    return model


def load_reference(config: ModelConfig) -> nn.Module:
    """A frozen copy of the starting checkpoint, in eval mode."""
    model = load_model(config)
    model.requires_grad_(False)
    model.eval()
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts (full sizes, also for ZeRO-3 partitioned weights)."""

    def numel(parameter: torch.Tensor) -> int:
        # Under ZeRO-3 a partitioned parameter is an empty placeholder; ds_numel is its real size.
        return parameter.ds_numel if hasattr(parameter, "ds_numel") else parameter.numel()

    total = sum(numel(p) for p in model.parameters())
    trainable = sum(numel(p) for p in model.parameters() if p.requires_grad)
    return trainable, total
