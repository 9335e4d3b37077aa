"""Per-GPU memory of the model states under each launch config, before renting any GPU.

    mpo memory RECIPE.yaml --world-size N [key.sub=value ...]

Only the model's config is read: the model is built on the meta device (no weights, no memory),
with the recipe's freezing and LoRA adapters applied, and its parameters counted. The estimate
covers the states that ZeRO partitions; activations (which depend on sequence length, tiles and
``model.gradient_checkpointing``), communication buckets and the CUDA context come on top.

Bytes per parameter, w being the size of ``model.dtype``:

* weights: w per parameter; gradients: w per trainable parameter;
* optimizer: DDP runs torch AdamW on the weights themselves, 2 moments in their dtype (2w per
  trainable parameter). DeepSpeed keeps 2 fp32 moments, plus an fp32 master copy when the
  weights are 16-bit (12 bytes, the ZeRO paper's K; 8 with fp32 weights);
* the reference: a frozen copy (w per parameter); none with LoRA (the policy with adapters
  disabled) or with precomputed log-probs.

Stages: ZeRO-1 partitions the optimizer state over the N processes, ZeRO-2 also the gradients,
ZeRO-3 also the weights (the reference's too), gathering one module at a time ("gathered" is
the largest module, held whole while it runs). ZeRO-3 + offload keeps weights, gradients and
optimizer state in CPU RAM, shown per process in the last column.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

from torch import nn

from mpo.config import Recipe, load_recipe
from mpo.errors import DataError

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass
class ParameterCounts:
    """Parameter counts of the policy as the recipe builds it."""

    total: int
    trainable: int
    vision: int
    projector: int
    language: int
    """The language model with its embeddings and LM head."""
    largest_module: int
    """Parameters owned directly by the largest single module (ZeRO-3's gather unit)."""
    reference: int
    """Parameters of a separate reference model (0 with LoRA or precomputed log-probs)."""


@dataclass
class StageEstimate:
    """Bytes per GPU for one launch config."""

    name: str
    params: float
    grads: float
    optimizer: float
    reference: float
    gathered: float
    cpu: float
    """CPU RAM per process for offloaded states (0 without offload)."""

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.reference + self.gathered


def _numel(module: nn.Module, recurse: bool = True) -> int:
    return sum(p.numel() for p in module.parameters(recurse=recurse))


def count_parameters(recipe: Recipe) -> ParameterCounts:
    """Builds the recipe's policy on the meta device (config only) and counts its parameters."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForImageTextToText

    from mpo.forward import base_model
    from mpo.modeling import add_lora, apply_freezing, resolve_model_path

    name = recipe.model.name_or_path
    try:
        config = AutoConfig.from_pretrained(resolve_model_path(name), trust_remote_code=recipe.model.trust_remote_code)
    except OSError as error:
        first_line = str(error).strip().splitlines()[0]
        raise DataError(f"cannot read the model config ({first_line}); point it at a directory with config.json", field="model.name_or_path") from None
    with init_empty_weights():
        model = AutoModelForImageTextToText.from_config(config)
    # On the meta device the constructor leaves tied embeddings untied (and tying fails inside
    # init_empty_weights); tie them so a shared LM head is counted once, as it is in memory.
    model.tie_weights()
    apply_freezing(model, recipe.model)
    if recipe.model.lora.enabled:
        with init_empty_weights():
            model = add_lora(model, recipe.model.lora)
    inner = base_model(model)
    total = _numel(model)
    separate_reference = not (recipe.model.lora.enabled or recipe.reference.precomputed_path)
    needs_reference = recipe.loss.dpo_weight != 0 or recipe.loss.bco_weight != 0
    return ParameterCounts(
        total=total,
        trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
        vision=_numel(inner.model.vision_tower),
        projector=_numel(inner.model.multi_modal_projector),
        language=_numel(inner.model.language_model) + _numel(inner.lm_head) * (not config.tie_word_embeddings),
        largest_module=max(_numel(m, recurse=False) for m in model.modules()),
        # The reference is the base model: no adapters.
        reference=_numel(inner) - sum(p.numel() for n, p in inner.named_parameters() if "lora_" in n)
        if separate_reference and needs_reference
        else 0,
    )


def estimate(counts: ParameterCounts, dtype: str, world_size: int) -> list[StageEstimate]:
    """Per-GPU bytes of weights, gradients, optimizer state and reference under each stage."""
    w = _DTYPE_BYTES[dtype]
    n = world_size
    weights, grads = w * counts.total, w * counts.trainable
    reference = w * counts.reference
    adam_ddp = 2 * w * counts.trainable
    adam_deepspeed = (12 if w < 4 else 8) * counts.trainable
    gathered = w * counts.largest_module
    return [
        StageEstimate("DDP (ZeRO-0)", weights, grads, adam_ddp, reference, 0, 0),
        StageEstimate("ZeRO-1", weights, grads, adam_deepspeed / n, reference, 0, 0),
        StageEstimate("ZeRO-2", weights, grads / n, adam_deepspeed / n, reference, 0, 0),
        StageEstimate("ZeRO-3", weights / n, grads / n, adam_deepspeed / n, reference / n, gathered, 0),
        StageEstimate(
            "ZeRO-3 + CPU offload", 0, 0, 0, 0, gathered, (weights + grads + adam_deepspeed + reference) / n
        ),
    ]


def _unit(largest: float) -> tuple[str, float]:
    return ("GiB", 2**30) if largest >= 2**30 else ("MiB", 2**20)


def report(recipe: Recipe, world_size: int) -> str:
    """The printed report: parameter counts, then one row per stage."""
    counts = count_parameters(recipe)
    rows = estimate(counts, recipe.model.dtype, world_size)
    unit, scale = _unit(rows[0].total)
    if recipe.reference.precomputed_path:
        reference = "precomputed log-probs (no model)"
    elif recipe.model.lora.enabled:
        reference = "the policy with adapters disabled (no copy)"
    elif counts.reference:
        reference = f"a frozen copy ({counts.reference:,} parameters)"
    else:
        reference = "none (no DPO/BCO term)"
    lines = [
        f"model {recipe.model.name_or_path} ({recipe.model.dtype} weights), world size {world_size}",
        f"parameters: {counts.total:,} (vision {counts.vision:,}, projector {counts.projector:,}, "
        f"language {counts.language:,}); trainable {counts.trainable:,}; largest module {counts.largest_module:,}",
        f"reference: {reference}",
        f"per-GPU model states in {unit} (activations, buffers and the CUDA context come on top):",
        f"{'stage':<22}{'params':>10}{'grads':>10}{'optimizer':>11}{'reference':>11}{'gathered':>10}{'total':>10}{'CPU/proc':>10}",
    ]
    for row in rows:
        values = (row.params, row.grads, row.optimizer, row.reference, row.gathered, row.total, row.cpu)
        widths = (10, 10, 11, 11, 10, 10, 10)
        lines.append(f"{row.name:<22}" + "".join(f"{v / scale:>{width}.2f}" for v, width in zip(values, widths)))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mpo memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe", help="the training recipe (YAML)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, as for training")
    parser.add_argument("--world-size", type=int, required=True, help="processes (GPUs) in the run")
    # Intermixed: overrides may come before or after --world-size.
    args = parser.parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    if args.world_size < 1:
        raise DataError(f"must be at least 1, got {args.world_size}", field="--world-size")
    print(report(load_recipe(args.recipe, args.overrides), args.world_size))
    return 0


if __name__ == "__main__":
    from mpo.cli import exit_on_data_error

    sys.exit(exit_on_data_error(main))
