"""What a training run prints: libraries' noise silenced, one start-up summary block, and where
the output is not a terminal (a cluster's log file), one metric line per logged step.

Silenced, through each library's own switch, because the user cannot act on it: transformers'
per-load and per-save progress bars, accelerate's notice at every save that safetensors dropped
the tied LM head (reloading ties it again), DeepSpeed's "Setting accelerator to CPU" on a machine
without CUDA (accelerate imports DeepSpeed to recognise its engine when unwrapping a model, in
runs without DeepSpeed too), torch's "No CUDA runtime is found" when DeepSpeed builds its CPU
ops, and the FutureWarnings torch.distributed raises at DeepSpeed's calls of its deprecated
functions.

A progress bar redraws one line with carriage returns, which a log file keeps as one endless
line; so the bar is drawn only on a terminal, and a log gets :func:`metric_line` instead.
"""

from __future__ import annotations

import datetime
import logging
import os
import warnings
from collections import Counter
from pathlib import Path

import torch
from accelerate.utils import DistributedType

# The reference implementations (mpo.model.reference, mpo.model.precomputed) in words.
REFERENCE_KINDS = {
    "FrozenModelReference": "a frozen copy of the starting model",
    "DisabledAdapterReference": "the model with its LoRA adapters disabled (no second copy)",
    "PrecomputedReference": "precomputed log-probs",
}


class _TiedWeightNotice(logging.Filter):
    """Drops accelerate's "Removed shared tensor {...} while saving" (logged at every checkpoint of
    a model with tied embeddings; the tie is restored on load)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Removed shared tensor" not in record.getMessage()  # after accelerate's "[RANK 0] " prefix


def quiet_libraries() -> None:
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    logging.getLogger("accelerate.utils.other").addFilter(_TiedWeightNotice())
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed\.")
    if not torch.cuda.is_available():
        # DeepSpeed's documented accelerator override; with it set, its detection logs nothing.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


LINE_METRICS = (("loss", "loss", ".4f"), ("loss/dpo", "dpo", ".4f"), ("loss/bco", "bco", ".4f"), ("loss/sft", "sft", ".4f"),
                ("rewards/accuracies", "acc", ".2f"), ("rewards/margins", "margin", ".4f"), ("grad_norm", "grad_norm", ".3g"),
                ("lr", "lr", ".2e"), ("tokens_per_s", "tok/s", ".0f"))
"""The metrics of a log line: (metrics.jsonl name, shown name, format); absent ones are left out."""


def metric_line(step: int, total_steps: int, metrics: dict[str, float], elapsed_s: float, steps_done: int) -> str:
    """One log line of a step, e.g. ``step 2/4  loss 0.8318  dpo 0.6931 ... tok/s 812  elapsed 0:00:03  eta 0:00:03``.

    Args:
        step: the step just trained; ``total_steps`` the run's last.
        metrics: the step's metrics (those of metrics.jsonl).
        elapsed_s: seconds since this process's first step; ``steps_done`` the steps trained in them.
    """
    parts = [f"step {step}/{total_steps}"]
    parts += [f"{shown} {metrics[name]:{spec}}" for name, shown, spec in LINE_METRICS if name in metrics]
    remaining = elapsed_s / max(steps_done, 1) * (total_steps - step)
    parts += [f"elapsed {datetime.timedelta(seconds=round(elapsed_s))}", f"eta {datetime.timedelta(seconds=round(remaining))}"]
    return "  ".join(parts)


def _distribution(accelerator) -> str:
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return f"DeepSpeed ZeRO-{accelerator.state.deepspeed_plugin.zero_stage}"
    if accelerator.distributed_type == DistributedType.NO:
        return "one process"
    return "DDP" if accelerator.distributed_type in (DistributedType.MULTI_CPU, DistributedType.MULTI_GPU) else str(
        accelerator.distributed_type.value
    )


def _subsets(records) -> str:
    """``N subsets (name count, ...)``, the largest five named; a subset is an annotation file."""
    counts = Counter(Path(record.source.rpartition(":")[0]).stem for record in records)
    named = ", ".join(f"{name} {count}" for name, count in counts.most_common(5))
    more = f", and {len(counts) - 5} more" if len(counts) > 5 else ""
    return f"{len(counts)} subset(s): {named}{more}"


def _gradients(recipe, accelerator) -> str:
    """How a step's gradients are summed and clipped (``train.grad_accum_dtype``, ``train.max_grad_norm``)."""
    train = recipe.train
    # DeepSpeed casts the weights to 16 bits under 16-bit mixed precision.
    deepspeed_cast = accelerator.distributed_type == DistributedType.DEEPSPEED and train.mixed_precision != "no"
    sixteen_bit = recipe.model.dtype != "float32" or deepspeed_cast
    summed = "summed in fp32" if train.grad_accum_dtype == "fp32" or not sixteen_bit else "summed in 16 bits (the weights' dtype)"
    clipped = f"clipped at norm {train.max_grad_norm:g}" if train.max_grad_norm > 0 else "not clipped (train.max_grad_norm <= 0)"
    return f"{summed}, {clipped}"


LAYOUTS = {"auto": "auto (shared_prefix, or packed where it removes padding)"}


def startup_summary(trainer) -> str:
    """The block printed before the first step (model, data, layout, reference, precision, world
    size, global batch, steps, outputs)."""
    recipe, accelerator, order = trainer.recipe, trainer.accelerator, trainer.order
    reference = "none (SFT only)" if trainer.reference is None else REFERENCE_KINDS[type(trainer.reference).__name__]
    if type(trainer.reference).__name__ == "FrozenModelReference" and recipe.reference.name_or_path:
        reference = f"a frozen copy of {recipe.reference.name_or_path}"
    if trainer.reference is not None and trainer.reuse_features:
        reference += ", reusing the policy's image features"
    epochs = trainer.total_steps / order.steps_per_epoch
    dropped = f"; {order.dropped_per_epoch} pair(s) per epoch do not fill a global batch and are left out" if order.dropped_per_epoch else ""
    save = f"checkpoints every {recipe.train.save_every} steps" if recipe.train.save_every else "a checkpoint at the end"
    trackers = ", ".join(recipe.report_to) or "none"
    rows = [
        ("model", f"{recipe.model.name_or_path} ({trainer.total_params:,} parameters, {trainer.trainable:,} trainable"
                  f"{', LoRA' if recipe.model.lora.enabled else ''})"),
        ("data", f"{len(trainer.dataset)} pairs from {_subsets(trainer.dataset.records)}; {trainer.skip_log.count} skipped"),
        ("layout", f"{LAYOUTS.get(recipe.forward.layout, recipe.forward.layout)}{', vision once per pair' if recipe.forward.dedupe_vision else ''}"),
        ("reference", reference),
        ("precision", f"weights {recipe.model.dtype}, mixed precision {recipe.train.mixed_precision}"),
        ("gradients", _gradients(recipe, accelerator)),
        ("processes", f"{accelerator.num_processes} ({_distribution(accelerator)})"),
        ("global batch", f"{order.global_batch_size} pairs = micro-batch {order.micro_batch_size} x accumulation "
                         f"{order.accumulation_steps} x {order.world_size} process(es)"),
        ("steps", f"{trainer.total_steps} ({epochs:.2f} epochs; from step {trainer.step}){dropped}"),
        ("outputs", f"{recipe.output_dir}: {save}, final/, metrics.jsonl; trackers: {trackers}"),
    ]
    if trainer.eval_dataset is not None:
        every = f"every {recipe.train.eval_every} steps and " if recipe.train.eval_every else ""
        rows.insert(2, ("evaluation", f"{len(trainer.eval_dataset)} held-out pairs, {every}after the last step"))
    width = max(len(name) for name, _ in rows)
    return "\n".join(["MPO run"] + [f"  {name:<{width}}  {value}" for name, value in rows])
