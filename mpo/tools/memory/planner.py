"""Per-GPU memory of a training run under each launch config, before renting any GPU.

    mpo memory RECIPE.yaml --world-size N [--tiles T] [--response-tokens R] [key.sub=value ...]
    mpo memory --mask-table      # the block mask's measured memory (mpo.tools.memory.mask_table)

Only the model's config is read: the model is built on the meta device (no weights, no memory),
with the recipe's freezing and LoRA adapters applied, and its parameters counted. Communication
buckets of ZeRO, the CUDA context and the allocator's fragmentation come on top.

Model states, per parameter (w: the size of ``model.dtype``):

* without DeepSpeed (one process, DDP): the weights in their dtype; a 16-bit trainable weight has
  a 16-bit gradient and, in the optimizer, an fp32 master copy and two fp32 moments (12 bytes,
  :mod:`mpo.train.precision`); an fp32 one (peft's LoRA adapters always are) a 4-byte gradient and 8
  bytes of moments. DDP keeps a second copy of the gradients in its reduction buckets. At the
  step the 16-bit gradients become fp32 ones (+2 bytes each), once the activations are freed.
* DeepSpeed casts every weight (adapters included) to 16 bits under bf16/fp16 mixed precision and
  keeps 12 bytes of optimizer state per trainable parameter (fp32 master + 2 moments, the ZeRO
  paper's K); ZeRO-1 partitions the optimizer state over the N processes, ZeRO-2 also the
  gradients, ZeRO-3 also the weights (the reference's too), gathering one module at a time
  ("gathered": the largest, held whole while it runs). ZeRO-3 + offload keeps weights, gradients
  and optimizer state in CPU RAM, shown per process in the last column.
* the reference: a frozen copy (the weights' size again); none with LoRA (the policy with
  adapters disabled) or with precomputed log-probs.

Activations (per process, the same under every stage): :mod:`mpo.tools.memory.activations`, for one
micro-batch of ``train.micro_batch_size`` pairs of the recipe's worst case unless given: every
pair with ``data.max_dynamic_patch`` tiles (+ the thumbnail) and responses that fill
``data.max_length``.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

from torch import nn

from mpo.tools.memory.activations import ActivationEstimate, estimate_activations, recipe_shape
from mpo.config import Recipe, load_recipe
from mpo.errors import DataError

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass
class ParameterCounts:
    """Parameter counts of the policy as the recipe builds it."""

    total: int
    trainable: int
    adapters: int
    """LoRA adapter parameters (all of them trainable, fp32 outside DeepSpeed)."""
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
    activations: float
    step: float
    """Allocated at the optimizer step, when the activations are already freed."""
    cpu: float
    """CPU RAM per process for offloaded states (0 without offload)."""

    @property
    def total(self) -> float:
        states = self.params + self.grads + self.optimizer + self.reference + self.gathered
        return states + max(self.activations, self.step)


def _numel(module: nn.Module, recurse: bool = True) -> int:
    return sum(p.numel() for p in module.parameters(recurse=recurse))


def read_config(recipe: Recipe):
    """The checkpoint's ``InternVLConfig`` (config.json only)."""
    from transformers import AutoConfig

    from mpo.model.loading import resolve_model_path

    try:
        return AutoConfig.from_pretrained(resolve_model_path(recipe.model.name_or_path), trust_remote_code=recipe.model.trust_remote_code)
    except OSError as error:
        first_line = str(error).strip().splitlines()[0]
        raise DataError(f"cannot read the model config ({first_line}); point it at a directory with config.json", field="model.name_or_path") from None


def count_parameters(recipe: Recipe) -> ParameterCounts:
    """Builds the recipe's policy on the meta device (config only) and counts its parameters."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForImageTextToText

    from mpo.model.loading import base_model
    from mpo.model.loading import add_lora, apply_freezing

    config = read_config(recipe)
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
    adapters = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    separate_reference = not (recipe.model.lora.enabled or recipe.reference.precomputed_path)
    needs_reference = recipe.loss.dpo_weight != 0 or recipe.loss.bco_weight != 0
    return ParameterCounts(
        total=total,
        trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
        adapters=adapters,
        vision=_numel(inner.model.vision_tower),
        projector=_numel(inner.model.multi_modal_projector),
        language=_numel(inner.model.language_model) + _numel(inner.lm_head) * (not config.tie_word_embeddings),
        largest_module=max(_numel(m, recurse=False) for m in model.modules()),
        # The reference is the base model: no adapters.
        reference=total - adapters if separate_reference and needs_reference else 0,
    )


def estimate(counts: ParameterCounts, dtype: str, mixed_precision: str, world_size: int, activations: float = 0.0) -> list[StageEstimate]:
    """Per-GPU bytes of weights, gradients, optimizer state, reference and activations per stage.

    Args:
        counts: :func:`count_parameters`.
        dtype: ``model.dtype``.
        mixed_precision: ``train.mixed_precision`` (DeepSpeed casts the weights to 16 bits under it).
        world_size: processes.
        activations: bytes of one micro-batch's activations (:mod:`mpo.tools.memory.activations`).
    """
    w, n = _DTYPE_BYTES[dtype], world_size
    # Without DeepSpeed: 16-bit trainable weights get fp32 masters; adapters are fp32.
    trainable16 = counts.trainable - counts.adapters if w == 2 else 0
    trainable32 = counts.trainable - trainable16
    grads = 2 * trainable16 + 4 * trainable32
    buckets = grads if n > 1 else 0  # DDP's reduction buckets (gradient_as_bucket_view off)
    ddp = StageEstimate(
        "DDP (ZeRO-0)", w * (counts.total - counts.adapters) + 4 * counts.adapters, grads + buckets,
        12 * trainable16 + 8 * trainable32, w * counts.reference, 0, activations, 2 * trainable16, 0,
    )  # fmt: skip
    d = 2 if mixed_precision in ("bf16", "fp16") else w
    weights, grads, optimizer, reference = d * counts.total, d * counts.trainable, 12 * counts.trainable, d * counts.reference
    step = 4 * counts.trainable / n  # the fp32 gradients of this process's partition
    gathered = d * counts.largest_module
    return [
        ddp,
        StageEstimate("ZeRO-1", weights, grads, optimizer / n, reference, 0, activations, step, 0),
        StageEstimate("ZeRO-2", weights, grads / n, optimizer / n, reference, 0, activations, step, 0),
        StageEstimate("ZeRO-3", weights / n, grads / n, optimizer / n, reference / n, gathered, activations, step, 0),
        StageEstimate("ZeRO-3 + CPU offload", 0, 0, 0, 0, gathered, activations, 0, (weights + grads + optimizer + reference) / n),
    ]


def _unit(largest: float) -> tuple[str, float]:
    return ("GiB", 2**30) if largest >= 2**30 else ("MiB", 2**20)


def _activation_lines(recipe: Recipe, parts: ActivationEstimate, shape, scale: float, unit: str) -> list[str]:
    checkpointing = "on" if recipe.model.gradient_checkpointing else "off"
    return [
        f"activations of one micro-batch ({shape.pairs} pair(s) of {shape.tiles} tiles, prompt {shape.prompt_tokens} tokens, "
        f"responses {shape.chosen_tokens}; layout {recipe.forward.layout}, checkpointing {checkpointing}) in {unit}: "
        f"vision {parts.vision / scale:.2f}, projector {parts.projector / scale:.2f}, language {parts.language / scale:.2f}, "
        f"LM head {parts.head / scale:.2f}, FlexAttention block mask {parts.mask / scale:.3f}, "
        f"backward working set {parts.transient / scale:.2f}",
    ]


def report(recipe: Recipe, world_size: int, tiles: int | None = None, response_tokens: int | None = None, text_tokens: int = 64) -> str:
    """The printed report: parameter counts, activations, then one row per stage."""
    counts = count_parameters(recipe)
    config = read_config(recipe)
    shape = recipe_shape(recipe, config.image_seq_length, tiles, response_tokens, text_tokens)
    parts = estimate_activations(recipe, config, shape)
    rows = estimate(counts, recipe.model.dtype, recipe.train.mixed_precision, world_size, parts.peak)
    unit, scale = _unit(max(row.total for row in rows))
    if recipe.reference.precomputed_path:
        reference = "precomputed log-probs (no model)"
    elif recipe.model.lora.enabled:
        reference = "the policy with adapters disabled (no copy)"
    elif counts.reference:
        reference = f"a frozen copy ({counts.reference:,} parameters)"
    else:
        reference = "none (no DPO/BCO term)"
    lines = [
        f"model {recipe.model.name_or_path} ({recipe.model.dtype} weights, mixed precision {recipe.train.mixed_precision}), world size {world_size}",
        f"parameters: {counts.total:,} (vision {counts.vision:,}, projector {counts.projector:,}, "
        f"language {counts.language:,}); trainable {counts.trainable:,}; largest module {counts.largest_module:,}",
        f"reference: {reference}",
        *_activation_lines(recipe, parts, shape, scale, unit),
        f"per-GPU memory in {unit} (communication buckets of ZeRO and the CUDA context come on top):",
        f"{'stage':<22}{'params':>9}{'grads':>9}{'optimizer':>11}{'reference':>11}{'gathered':>10}{'activations':>13}{'total':>9}{'CPU/proc':>10}",
    ]
    for row in rows:
        values = (row.params, row.grads, row.optimizer, row.reference, row.gathered, row.activations, row.total, row.cpu)
        widths = (9, 9, 11, 11, 10, 13, 9, 10)
        lines.append(f"{row.name:<22}" + "".join(f"{v / scale:>{width}.2f}" for v, width in zip(values, widths)))
    return "\n".join(lines)


def measured(recipe: Recipe, tiles: int | None, response_tokens: int | None, text_tokens: int) -> str:
    """Runs :func:`mpo.memory_measure.measure` and sets it beside the estimate."""
    import torch

    from mpo.tools.memory.measure import measure

    config = read_config(recipe)
    shape = recipe_shape(recipe, config.image_seq_length, tiles, response_tokens, text_tokens)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    parts = estimate_activations(recipe, config, shape, device.type)
    ddp, *_ = estimate(count_parameters(recipe), recipe.model.dtype, recipe.train.mixed_precision, 1, parts.peak)
    result = measure(recipe, config, shape, device)
    unit, scale = _unit(result.step)
    return (
        f"measured on {device.type} ({result.seconds:.0f} s): policy + reference weights {result.models / scale:.2f} {unit} "
        f"(estimate {(ddp.params + ddp.reference) / scale:.2f}); forward + reference + backward peak {result.step / scale:.2f} {unit} "
        f"above them (estimate: gradients {ddp.grads / scale:.2f} + activations {parts.kept / scale:.2f} kept "
        f"+ {parts.transient / scale:.2f} working = {(ddp.grads + parts.peak) / scale:.2f})"
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--mask-table" in argv:
        from mpo.tools.memory.mask_table import main as mask_table

        return mask_table(argv)
    parser = argparse.ArgumentParser(prog="mpo memory", description=__doc__.split("\n\n")[0],
                                     epilog="mpo memory --mask-table [--model M] [--lengths ...]: the FlexAttention block "
                                            "mask's memory beside a training step's (mpo.tools.memory.mask_table)")
    parser.add_argument("recipe", help="the training recipe (YAML)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, as for training")
    parser.add_argument("--world-size", type=int, required=True, help="processes (GPUs) in the run")
    parser.add_argument("--tiles", type=int, help="tiles per pair (default: data.max_dynamic_patch + the thumbnail)")
    parser.add_argument("--response-tokens", type=int, help="tokens per response (default: what data.max_length leaves after the prompt)")
    parser.add_argument("--text-tokens", type=int, default=64, help="prompt tokens besides the image tokens (default 64)")
    parser.add_argument("--measure", action="store_true", help="also run one micro-batch of this shape on a random model of the config's size and print its peak")
    # Intermixed: overrides may come before or after the options.
    args = parser.parse_intermixed_args(argv)
    for name in ("world_size", "tiles", "response_tokens"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise DataError(f"must be at least 1, got {value}", field="--" + name.replace("_", "-"))
    recipe = load_recipe(args.recipe, args.overrides)
    print(report(recipe, args.world_size, args.tiles, args.response_tokens, args.text_tokens))
    if args.measure:
        print(measured(recipe, args.tiles, args.response_tokens, args.text_tokens))
    return 0

