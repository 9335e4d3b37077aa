"""DeepSpeed glue: the engine config the recipe implies, and the reference model under ZeRO.

The trainer feeds DeepSpeed no dataloader (the global batch order is :mod:`mpo.sampling`'s), so
accelerate cannot infer the batch sizes; :func:`configure_deepspeed` writes them, the gradient
accumulation and the clipping norm into the plugin's config from the recipe before ``prepare``.
The recipe wins over the launch file, so one recipe trains the same under every launch config.

The frozen reference is wrapped by :func:`prepare_deepspeed_reference` in an inference-only
engine built from the policy's config minus its optimizer (TRL's ``_prepare_deepspeed`` does the
same): under ZeRO-3 it is partitioned across processes exactly like the policy, each process
holding 1/N of its weights and gathering one layer at a time during the forward. ZeRO-1/2 shard
only optimizer state and gradients, which a frozen model has none of, so there the reference is
a plain (stage 0) engine: a full copy per process, as the policy itself is.
"""

from __future__ import annotations

import copy

from torch import nn

# Config keys accelerate fills from the model's hidden size when they say "auto"; the wrapped
# PreferenceForward has no ``config``, so they are filled here from the language model's.
_HIDDEN_SIZE_KEYS = ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold")


def language_hidden_size(model: nn.Module) -> int:
    """The text hidden size of an InternVL model (or a peft model around one)."""
    from mpo.forward import base_model

    return base_model(model).config.text_config.hidden_size


def _fill_hidden_size_keys(zero: dict, hidden_size: int) -> None:
    values = {
        "reduce_bucket_size": hidden_size * hidden_size,
        "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
        "stage3_param_persistence_threshold": 10 * hidden_size,
    }
    for key in _HIDDEN_SIZE_KEYS:
        if zero.get(key) == "auto":
            zero[key] = values[key]


def configure_deepspeed(accelerator, micro_batch_size: int, accumulation_steps: int, max_grad_norm: float, model: nn.Module) -> None:
    """Writes the recipe's batch, accumulation and clipping into the DeepSpeed config (in place).

    Args:
        accelerator: an ``Accelerator`` whose distributed type is DeepSpeed.
        micro_batch_size: pairs per forward pass per process.
        accumulation_steps: micro-batches per optimizer step; must match what accelerate counts.
        max_grad_norm: DeepSpeed clips inside its own step, so the recipe's norm goes in its config
            (accelerate's ``clip_grad_norm_`` is a no-op under DeepSpeed).
        model: the unwrapped HF policy, for the hidden-size-based "auto" keys.
    """
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    config["train_micro_batch_size_per_gpu"] = micro_batch_size
    config["gradient_accumulation_steps"] = accumulation_steps
    config["train_batch_size"] = micro_batch_size * accumulation_steps * accelerator.num_processes
    config["gradient_clipping"] = max_grad_norm
    _fill_hidden_size_keys(config.setdefault("zero_optimization", {}), language_hidden_size(model))


def reference_config(policy_config: dict, hidden_size: int) -> dict:
    """The policy's DeepSpeed config turned into an inference-only one for a frozen model.

    Drops the optimizer and scheduler (nothing is trained), keeps ZeRO-3 (and its parameter
    offload) so the reference is partitioned like the policy, and drops ZeRO-1/2 to stage 0
    since those stages partition nothing a frozen model has.
    """
    config = copy.deepcopy(policy_config)
    for key in ("optimizer", "scheduler"):
        config.pop(key, None)
    zero = config.setdefault("zero_optimization", {})
    if zero.get("stage", 0) != 3:
        zero["stage"] = 0
    # Optimizer offload means nothing without an optimizer.
    zero.pop("offload_optimizer", None)
    _fill_hidden_size_keys(zero, hidden_size)
    return config


def prepare_deepspeed_reference(reference_forward: nn.Module, accelerator) -> nn.Module:
    """Wraps the frozen reference (a :class:`mpo.forward.PreferenceForward`) in a DeepSpeed engine.

    Under ZeRO-3 the weights were already created partitioned when ``zero3_init_flag`` is set
    (``from_pretrained`` runs inside ``deepspeed.zero.Init``); the engine keeps them so and adds
    the hooks that gather each layer for its forward. The engine is in eval mode and is only ever
    called under ``torch.no_grad``.

    Returns:
        The engine; calling it runs ``reference_forward.forward``.
    """
    import deepspeed

    policy_config = accelerator.state.deepspeed_plugin.deepspeed_config
    config = reference_config(policy_config, language_hidden_size(reference_forward.model))
    engine, *_ = deepspeed.initialize(model=reference_forward, config=config)
    engine.eval()
    return engine


def local_and_total_numel(module: nn.Module) -> tuple[int, int]:
    """(elements held by this process, elements of the whole model) over ``module``'s parameters.

    Under ZeRO-3 a partitioned parameter's ``numel()`` is 0 here and its full size is
    ``ds_numel``; its local shard is ``ds_tensor``. Elsewhere both counts are the plain sizes.
    """
    local = total = 0
    for parameter in module.parameters():
        if hasattr(parameter, "ds_tensor"):  # a ZeRO-3 partitioned parameter
            local += parameter.ds_tensor.numel()
            total += parameter.ds_numel
        else:
            local += parameter.numel()
            total += parameter.numel()
    return local, total
