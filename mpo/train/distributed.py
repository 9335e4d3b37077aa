"""The launch: the ``Accelerator`` a recipe runs under, DeepSpeed's config, and the frozen reference.

:func:`make_accelerator` builds the run's ``Accelerator`` (gloo on CPU, the trackers, the
precision). :func:`zero_config` is the one place the launched ZeRO settings are read.

The trainer feeds DeepSpeed no dataloader (the global batch order is :mod:`mpo.data.batch_order`'s), so
accelerate cannot infer the batch sizes; :func:`configure_deepspeed` writes them, the gradient
accumulation, the clipping norm and ZeRO's size thresholds into the plugin's config before any
model loads. The recipe wins over the launch file (``train.mixed_precision`` too, being passed to
the ``Accelerator``), so one recipe trains the same under every launch config.

The frozen reference is wrapped by :func:`prepare_deepspeed_reference` in an inference-only
engine built from the policy's config minus its optimizer (TRL's ``_prepare_deepspeed`` does the
same): under ZeRO-3 it is partitioned across processes exactly like the policy, each process
holding 1/N of its weights and gathering one layer at a time during the forward. ZeRO-1/2 shard
only optimizer state and gradients, which a frozen model has none of, so there the reference is
a plain (stage 0) engine: a full copy per process, as the policy itself is.
"""

from __future__ import annotations

import copy
import os
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs, ProjectConfiguration
from torch import nn

from mpo.config import ModelConfig, Recipe
from mpo.errors import DataError
from mpo.model.forward import PreferenceForward, text_only_vision
from mpo.model.loading import load_reference, reference_model, resolve_model_path


def uses_deepspeed() -> bool:
    """Whether ``accelerate launch`` started this process with a DeepSpeed config."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def make_accelerator(recipe: Recipe) -> Accelerator:
    """The run's ``Accelerator``: trackers, precision and accumulation from the recipe, gloo on CPU."""
    multi_process_cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    # A frozen process is named after train.collective_timeout by mpo.train.liveness; the backend's
    # own timeout (gloo, NCCL, and DeepSpeed's init, which accelerate hands it) is the backstop.
    timeout = timedelta(seconds=2 * recipe.train.collective_timeout)
    # NCCL needs GPUs; on CPU, DDP and DeepSpeed run over gloo.
    handlers = [InitProcessGroupKwargs(backend="gloo", timeout=timeout) if multi_process_cpu else InitProcessGroupKwargs(timeout=timeout)]
    # A GPU launch config (launch/ddp.yaml) on a machine without GPUs makes accelerate start every
    # process as a lone trainer that never syncs; cpu=True makes it CPU data parallel instead. Not
    # under DeepSpeed: there cpu=True would switch DeepSpeed off.
    return Accelerator(
        # Trackers (report_to) write under output_dir/logs (tensorboard: logs/<project>/).
        log_with=recipe.report_to or None,
        project_config=ProjectConfiguration(project_dir=recipe.output_dir, logging_dir=str(Path(recipe.output_dir) / "logs")),
        mixed_precision=recipe.train.mixed_precision,
        gradient_accumulation_steps=recipe.train.gradient_accumulation_steps,
        kwargs_handlers=handlers,
        cpu=multi_process_cpu and not uses_deepspeed(),
        # The scheduler counts global optimizer steps (see the trainer's step); accelerate's
        # default would step it once per process, decaying the rate N times too fast under N.
        step_scheduler_with_optimizer=False,
    )


def is_deepspeed(accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def zero_config(accelerator) -> dict | None:
    """The launched ``zero_optimization`` section (``{}`` when the config has none), or ``None``
    outside DeepSpeed: the one place the ZeRO settings are read."""
    if not is_deepspeed(accelerator):
        return None
    return accelerator.state.deepspeed_plugin.deepspeed_config.setdefault("zero_optimization", {})


def zero_stage(accelerator) -> int | None:
    """The launched ZeRO stage (0 for a DeepSpeed config without one), ``None`` outside DeepSpeed."""
    zero = zero_config(accelerator)
    return None if zero is None else int(zero.get("stage", 0))


def text_hidden_size(config: ModelConfig) -> int:
    """The language model's hidden size, read from the checkpoint's config (no weights loaded)."""
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(resolve_model_path(config.name_or_path), trust_remote_code=config.trust_remote_code)
    return hf_config.text_config.hidden_size


def _fill_bucket_sizes(zero: dict, hidden_size: int) -> None:
    """ZeRO's size thresholds from the hidden size, as accelerate and HF do for "auto" values.

    Filled when absent too (the launch YAMLs set none): DeepSpeed's fixed defaults ignore the
    model, and under ZeRO-3 a parameter below the persistence threshold is never partitioned.
    """
    values = {
        "reduce_bucket_size": hidden_size * hidden_size,
        "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
        "stage3_param_persistence_threshold": 10 * hidden_size,
    }
    for key, value in values.items():
        if zero.get(key, "auto") == "auto":
            zero[key] = value


def check_supported(accelerator, config: ModelConfig) -> None:
    """Refuses, in one line, what is known not to run under the launched DeepSpeed stage.

    LoRA adapters on the vision tower under ZeRO-3 desynchronise DeepSpeed's recorded module
    trace across processes after the first step (measured here: a collective mismatch or a hang
    at step 2, with or without prefetching); adapters on the language model run fine.
    """
    if zero_stage(accelerator) == 3 and config.lora.enabled and config.lora.vision:
        raise DataError(
            "LoRA on the vision tower does not run under ZeRO-3; use launch/zero2.yaml or model.lora.vision=false",
            field="model.lora.vision",
        )


def configure_deepspeed(accelerator, micro_batch_size: int, accumulation_steps: int, max_grad_norm: float, hidden_size: int,
                        grad_accum_dtype: str = "weights") -> None:
    """Writes the recipe's batch, accumulation and clipping into the DeepSpeed config (in place).

    Call it before loading any model: under ZeRO-3, ``from_pretrained`` partitions the weights as
    it creates them, with the thresholds in this config.

    Args:
        accelerator: an ``Accelerator`` whose distributed type is DeepSpeed.
        micro_batch_size: pairs per forward pass per process.
        accumulation_steps: micro-batches per optimizer step; must match what accelerate counts.
        max_grad_norm: DeepSpeed clips inside its own step, so the recipe's norm goes in its config
            (accelerate's ``clip_grad_norm_`` is a no-op under DeepSpeed).
        hidden_size: the language model's hidden size (:func:`text_hidden_size`).
        grad_accum_dtype: ``train.grad_accum_dtype``: ``fp32`` becomes DeepSpeed's
            ``data_types.grad_accum_dtype``; ``weights`` leaves DeepSpeed's default (the weights' dtype).
    """
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    config["train_micro_batch_size_per_gpu"] = micro_batch_size
    config["gradient_accumulation_steps"] = accumulation_steps
    config["train_batch_size"] = micro_batch_size * accumulation_steps * accelerator.num_processes
    # DeepSpeed clips only when this is > 0, which is what the recipe's <= 0 means (no clipping).
    config["gradient_clipping"] = max(max_grad_norm, 0.0)
    data_types = config.setdefault("data_types", {})
    if grad_accum_dtype == "fp32":
        if int(config.get("zero_optimization", {}).get("stage", 0)) == 0 and accelerator.mixed_precision in ("bf16", "fp16"):
            # DeepSpeed raises NotImplementedError on 16-bit weights with fp32 sums outside ZeRO.
            raise DataError("DeepSpeed sums 16-bit gradients in fp32 only under ZeRO; launch a ZeRO config "
                            "(launch/zero1.yaml) or set train.grad_accum_dtype=weights", field="train.grad_accum_dtype")
        data_types["grad_accum_dtype"] = "fp32"
    else:
        data_types.pop("grad_accum_dtype", None)
    _fill_bucket_sizes(config.setdefault("zero_optimization", {}), hidden_size)


def check_zero3_gathers(accelerator) -> None:
    """Refuses, before training, a ZeRO-3 launch config under which no checkpoint could be opened.

    Every checkpoint gathers the ZeRO-3 shards into one 16-bit model, which DeepSpeed does only
    with ``zero3_save_16bit_model: true`` (every ``launch/zero3*.yaml`` sets it).
    """
    zero = zero_config(accelerator)
    if zero is not None and zero.get("stage") == 3 and not zero.get("stage3_gather_16bit_weights_on_model_save", False):
        raise DataError("must be true under ZeRO-3: checkpoints gather the shards into a model users can open",
                        field="zero3_save_16bit_model (launch config)")


def reference_config(policy_config: dict) -> dict:
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
    config = reference_config(policy_config)
    engine, *_ = deepspeed.initialize(model=reference_forward, config=config)
    engine.eval()
    return engine


def load_frozen_reference(recipe: Recipe, accelerator) -> nn.Module:
    """The reference checkpoint (``reference.name_or_path``, else the starting one) as a frozen
    :class:`mpo.model.forward.PreferenceForward`, placed for the launch: a DeepSpeed engine
    (partitioned like the policy under ZeRO-3), else on the accelerator's device. The trainer and
    ``mpo precompute-ref`` both load it here; under DeepSpeed, :func:`configure_deepspeed` must
    have run first."""
    vision = text_only_vision(accelerator.num_processes, zero_config(accelerator), trained=False)
    reference = PreferenceForward(load_reference(reference_model(recipe)), vision)
    if is_deepspeed(accelerator):
        return prepare_deepspeed_reference(reference, accelerator)
    return reference.to(accelerator.device)


def local_and_total_numel(module: nn.Module) -> tuple[int, int]:
    """(elements held by this process, elements of the whole model) over ``module``'s parameters.

    Under ZeRO-3 a partitioned parameter's ``numel()`` is 0 here and its full size is
    ``ds_numel``; its local shard is ``ds_tensor``, except for the small persistent parameters
    every process keeps whole. Elsewhere both counts are the plain sizes.
    """
    local = total = 0
    for parameter in module.parameters():
        if hasattr(parameter, "ds_tensor"):  # a ZeRO-3 parameter
            # A persistent one (below the persistence threshold) stays whole on every process.
            local += parameter.ds_numel if parameter.ds_persist else parameter.ds_tensor.numel()
            total += parameter.ds_numel
        else:
            local += parameter.numel()
            total += parameter.numel()
    return local, total
