"""Activation memory of one training micro-batch, estimated from the recipe and the model config.

What autograd keeps for the backward of one micro-batch, counted tensor by tensor from the
transformers implementation of InternVL (InternViT layers, pixel-shuffle projector, Qwen2 decoder
layers), mpo's forward (LM head on the scored positions, fp32 logits) and peft's LoRA layers.
``tests/tools/test_memory.py`` checks the count against the tensors autograd really saves on the tiny
model; the README compares the estimate with peaks measured at InternVL3-1B size.

Bytes per token and layer, ``a`` being the activation size (2 in bf16 or under autocast, else 4),
``r`` the residual stream's (the weights' dtype), h / m the hidden / MLP sizes, n the heads:

* trainable decoder layer: two RMSNorms, each an fp32 copy of its input (4h), 1/rms (4) and the
  normalised input (rh); q, k, v (GQA heads expanded) and the attention output (4ah) plus its
  log-sum-exp (4n); the inputs of the projections (2ah + am); SiLU's input, its output and the up
  projection (3am). With LoRA the frozen base layers keep no input, each adapter keeps its own
  (upcast) input ((6h + m)c, c the adapters' compute size) and its rank-r output; dropout adds
  its mask (1 byte per element on CUDA, 4 on the CPU).
* trainable InternViT layer: LayerNorm inputs (2ah, their statistics 16), q, k, v and the output
  (4ah, log-sum-exp 4n), the layer-scale inputs (2ah), the inputs of the linear layers
  (2ah + am) and GELU's (am); the patch embedding keeps the tile's pixels. A frozen tower without
  adapters keeps nothing (it is not in the graph, see ``mpo.modeling.load_policy``).
* the plain layout pads each row to the micro-batch's longest: every SDPA call then converts the
  [rows, 1, T, T] padding mask to the activation dtype and keeps it.
* FlexAttention (shared-prefix and packed rows on GPU): the block mask, built from the pair
  blocks at tile resolution (:func:`mpo.model.block_mask.block_mask_bytes`, kilobytes to a few
  MiB; the reference's forward builds its own and frees it before the backward).
* LM head: the scored hidden states, their target ids and fp32 log-sum-exps (``mpo.model.fp32_head`` keeps
  no [scored, vocab] logits); its backward recomputes one fp32 [scored, chunk] block of logits at
  a time, with fp32 copies of the hidden states and of their gradient.

With ``model.gradient_checkpointing`` each layer keeps only its input, and one layer's activations
are recomputed at a time during the backward (counted twice in the working set: the activations
and their gradients).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mpo.config import Recipe
from mpo.model.block_mask import block_mask_bytes
from mpo.model.forward import attention_kernel
from mpo.model.fp32_head import DEFAULT_CHUNK as HEAD_CHUNK

LN_STATS = 8
"""Bytes per token of a LayerNorm's mean and 1/std: two fp32 values (also for a bf16 input on
GPU; the CPU kernel keeps them in bf16, 4 bytes)."""


@dataclass(frozen=True)
class MicroBatchShape:
    """The sequences of one micro-batch on one process."""

    pairs: int
    tiles: int
    """448-px tiles per pair (thumbnail included)."""
    prompt_tokens: int
    """Per pair, image tokens included."""
    chosen_tokens: int
    rejected_tokens: int


@dataclass
class ActivationEstimate:
    """Bytes kept for backward by one micro-batch, by part, and the backward's working set."""

    vision: float
    projector: float
    language: float
    head: float
    transient: float
    """Allocated on top during the backward (the head's recomputed logits, one recomputed layer)."""
    mask: float = 0.0
    """The FlexAttention block mask of the policy's forward, kept for its backward (its builder's
    peak, :func:`mpo.model.block_mask.block_mask_bytes`); none on the other kernels."""

    @property
    def kept(self) -> float:
        return self.vision + self.projector + self.language + self.head + self.mask

    @property
    def peak(self) -> float:
        return self.kept + self.transient


def tile_side(vision_config) -> int:
    """A tile's side in pixels (configs write it as one number or as [height, width])."""
    size = vision_config.image_size
    return size[0] if isinstance(size, list) else size


def recipe_shape(recipe: Recipe, image_seq_length: int, tiles: int | None, response_tokens: int | None, text_tokens: int) -> MicroBatchShape:
    """The recipe's worst case unless given: ``data.max_dynamic_patch`` tiles plus the thumbnail,
    responses filling ``data.max_length`` after the prompt."""
    patches = recipe.data.max_dynamic_patch
    tiles = tiles if tiles is not None else patches + (patches > 1)
    prompt = tiles * image_seq_length + text_tokens
    response = response_tokens if response_tokens is not None else max(1, recipe.data.max_length - prompt)
    return MicroBatchShape(recipe.train.micro_batch_size, tiles, prompt, response, response)


def _adapters(inputs: int, count: int, a: int, recipe: Recipe, device_type: str) -> float:
    """Bytes per token kept by ``count`` LoRA adapters whose inputs total ``inputs`` elements.

    peft upcasts each adapter's input to its fp32 weights; under autocast the adapter's matmul
    keeps a 16-bit copy of it. Dropout keeps its mask: one byte per element on CUDA, the input's
    4 bytes on the CPU (there it multiplies by a float mask).
    """
    lora = recipe.model.lora
    c = a if recipe.train.mixed_precision != "no" else 4
    mask = (1 if device_type == "cuda" else 4) * (lora.dropout > 0)
    return inputs * (c + mask) + count * lora.r * c


def _decoder_layer(h: int, m: int, heads: int, a: int, r: int, recipe: Recipe, trainable: bool, device_type: str) -> float:
    """Bytes per token kept by one Qwen2 decoder layer, its attention kernel's aside."""
    mlp = 3 * a * m
    attention = 4 * heads  # the log-sum-exp; q, k, v and the output: _attention
    if recipe.model.lora.enabled:
        return 2 * (4 * h + 4) + attention + mlp + _adapters(6 * h + m, 7, a, recipe, device_type)
    if not trainable:  # frozen, still backpropagated through (to a trainable vision side)
        return 2 * (4 * h + 4) + attention + mlp
    return 2 * (4 * h + 4 + r * h) + attention + 2 * a * h + a * m + mlp


def _vision_layer(h: int, m: int, heads: int, a: int, recipe: Recipe, device_type: str) -> float:
    """Bytes per token kept by one InternViT layer of a tower in the graph."""
    lora = recipe.model.lora
    if recipe.model.freeze_vision and lora.enabled and lora.vision:
        adapters = _adapters(5 * h + m, 6, a, recipe, device_type)
        return 2 * a * h + 2 * LN_STATS + 4 * a * h + 4 * heads + a * m + adapters
    return (10 * h + 2 * m) * a + 2 * LN_STATS + 4 * heads


def _attention(kernel: str, text, a: int, shape: MicroBatchShape, tokens: int, row: int) -> float:
    """Bytes one decoder layer's attention keeps: q, k, v and the output, and the kernel's extras.

    * ``plain`` (transformers' SDPA over padded rows): k and v expanded to every query head, and
      the [rows, 1, T, T] padding mask converted to the activation dtype;
    * ``flex`` (shared-prefix / packed rows on GPU): k and v at their key-value heads;
    * ``sdpa`` (shared-prefix / packed rows on CPU, :func:`mpo.model.pair_attention.pair_sdpa_attention`):
      k and v at their key-value heads (SDPA takes the grouped heads itself), the rejected blocks'
      ``[prompt | rejected]`` keys and values concatenated, the output once per block and once joined.
    """
    h, kv = text.hidden_size, text.num_key_value_heads * (text.hidden_size // text.num_attention_heads)
    if kernel == "plain":
        return 4 * a * h * tokens + 2 * shape.pairs * row * row * a
    if kernel == "flex":
        return (2 * h + 2 * kv) * a * tokens
    return (3 * h + 2 * kv) * a * tokens + 2 * shape.pairs * (shape.prompt_tokens + shape.rejected_tokens) * kv * a


def _vision(recipe: Recipe, config, shape: MicroBatchShape, a: int, r: int, device_type: str) -> tuple[float, float, float]:
    """(vision tower bytes, projector bytes, one vision layer's bytes) kept for the micro-batch."""
    model, vision = recipe.model, config.vision_config
    lora_vision = model.lora.enabled and model.lora.vision
    vision_in_graph = not model.freeze_vision or lora_vision
    projector_trainable = not model.freeze_projector and not model.lora.enabled  # peft freezes all but adapters
    # Once per pair with dedupe_vision, else once per row.
    side, patch = tile_side(vision), vision.patch_size[0] if isinstance(vision.patch_size, list) else vision.patch_size
    tiles = shape.pairs * shape.tiles * (1 if recipe.forward.dedupe_vision else 2)
    tokens = tiles * ((side // patch) ** 2 + 1)
    tower = layer = projector = 0.0
    if vision_in_graph:
        layer = _vision_layer(vision.hidden_size, vision.intermediate_size, vision.num_attention_heads, a, recipe, device_type) * tokens
        pixels = 3 * side * side * a * tiles * (not model.freeze_vision)
        layers = vision.num_hidden_layers
        tower = pixels + (layers * r * vision.hidden_size * tokens if model.gradient_checkpointing else layers * layer)
    if vision_in_graph or projector_trainable:
        shuffled, out = vision.hidden_size * 4, config.text_config.hidden_size  # pixel shuffle 0.5: 4 patches a token
        kept = 2 * shuffled + 2 * out if projector_trainable else shuffled + out  # frozen: inputs for the input gradient
        projector = (kept * a + LN_STATS) * tiles * config.image_seq_length
    return tower, projector, layer


def _language(recipe: Recipe, text, shape: MicroBatchShape, a: int, r: int, device_type: str) -> tuple[float, float]:
    """(language model bytes, one decoder layer's bytes) kept for the micro-batch."""
    model = recipe.model
    h, m, heads = text.hidden_size, text.intermediate_size, text.num_attention_heads
    # plain: a chosen and a rejected row per pair, padded to the longer; otherwise one row per pair.
    row = shape.prompt_tokens + max(shape.chosen_tokens, shape.rejected_tokens)
    plain = recipe.forward.layout == "plain"
    rows = 2 * shape.pairs if plain else shape.pairs
    tokens = rows * row if plain else shape.pairs * (shape.prompt_tokens + shape.chosen_tokens + shape.rejected_tokens)
    trainable = not model.freeze_language and not model.lora.enabled
    kernel = "plain" if plain else attention_kernel(recipe.forward.attention, torch.device(device_type))
    layer = _decoder_layer(h, m, heads, a, r, recipe, trainable, device_type) * tokens + _attention(kernel, text, a, shape, tokens, row)
    layers = text.num_hidden_layers
    if model.gradient_checkpointing:
        kept = layers * r * h * tokens + (rows * row * row if plain else 0)  # the layers' inputs, the bool mask
    else:
        kept = layers * layer
    final_norm = (4 * h + 4 + r * h * trainable) * tokens
    return kept + final_norm + 8 * tokens * trainable, layer  # + the token ids, for the embedding's gradient


def estimate_activations(recipe: Recipe, config, shape: MicroBatchShape, device_type: str = "cuda") -> ActivationEstimate:
    """Activation bytes of one training micro-batch.

    Args:
        recipe: the training recipe (freezing, LoRA, checkpointing, precision, layout).
        config: the checkpoint's ``InternVLConfig``.
        shape: the micro-batch (:func:`recipe_shape`).
        device_type: where it runs, which picks the attention kernel of shared-prefix and packed
            rows (``forward.attention: auto``) and the size of dropout masks.
    """
    model, text = recipe.model, config.text_config
    a = 2 if model.dtype != "float32" or recipe.train.mixed_precision != "no" else 4
    r = 2 if model.dtype != "float32" else 4
    vision, projector, vision_layer = _vision(recipe, config, shape, a, r, device_type)
    language, layer = _language(recipe, text, shape, a, r, device_type)
    flex = recipe.forward.layout != "plain" and attention_kernel(recipe.forward.attention, torch.device(device_type)) == "flex"
    # One shared-prefix row per pair (packed rows hold the same tiles, fewer of them empty).
    mask = block_mask_bytes(shape.pairs, shape.prompt_tokens + shape.chosen_tokens + shape.rejected_tokens) if flex else 0
    scored = shape.pairs * (shape.chosen_tokens + shape.rejected_tokens)
    head = (r * text.hidden_size + 8 + 4) * scored
    # The head's backward holds one [scored, chunk] fp32 block and two fp32 [scored, hidden]
    # tensors; with checkpointing each layer's backward then holds its recomputed activations
    # and their gradients.
    head_backward = 4 * scored * min(HEAD_CHUNK, text.vocab_size) + 8 * text.hidden_size * scored
    recomputed = 2 * max(layer, vision_layer) if model.gradient_checkpointing else 0.0
    return ActivationEstimate(vision, projector, language, head, max(head_backward, recomputed), mask)
