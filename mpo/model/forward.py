"""One forward pass over a :class:`PreferenceBatch` -> summed log-probs of every response.

:class:`PreferenceForward` wraps the HF InternVL model so that the whole computation (vision
features, language model, LM head on response positions only, log-softmax) runs inside the
``forward`` that DDP or DeepSpeed wraps: their gradient hooks and ZeRO-3 parameter gathering see
one ordinary module call. The logits are fp32 whatever the weights' dtype (:mod:`mpo.model.fp32_head`).

The vision tower runs once per pair (``feature_repeat`` copies its features into the chosen and the
rejected rows), and features computed by the policy can be handed to the reference when both share
a frozen vision tower and projector, so one vision pass can serve the whole step. A text-only
micro-batch runs no vision tower at all unless the launch needs it (:func:`text_only_vision`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from mpo.model.fp32_head import use_float32_head
from mpo.model.loading import base_model
from mpo.model.pair_attention import PAIR_SDPA, flex_block_mask, pair_blocks
from mpo.types import PreferenceBatch, SequenceLogps


@dataclass
class ForwardOutput:
    """Log-probs of a micro-batch plus the image features used (to share with the reference)."""

    logps: SequenceLogps
    image_features: torch.Tensor | None


def attention_kernel(requested: str, device: torch.device) -> str:
    """How a shared-prefix or packed batch's attention is computed: ``flex`` or ``sdpa``.

    ``auto`` picks FlexAttention on CUDA (a block mask and a fused kernel that skips the blocks no
    token attends to) and per-pair SDPA elsewhere (FlexAttention has no backward on CPU); see
    :mod:`mpo.model.pair_attention`.
    """
    if requested == "auto":
        return "flex" if device.type == "cuda" else "sdpa"
    if requested not in ("sdpa", "flex"):
        raise ValueError(f"forward.attention must be auto, sdpa or flex, got {requested!r}")
    return requested


TEXT_ONLY_VISION = ("skip", "zero_grads", "blank_tile")


def text_only_vision(num_processes: int, zero: dict | None, trained: bool = True) -> str:
    """What a text-only micro-batch does with the vision tower and projector, per launch.

    Every process must take part in the same collectives, and a process whose micro-batch has no
    image still holds the vision weights another process's micro-batch trains. The cheapest way
    that keeps them in step, measured on CPU (the bench model, one text-only micro-batch, forward
    and backward of the vision part only: a blank tile 39 ms, zero gradients 1 ms):

    * ``skip`` (one process, no DeepSpeed): nothing runs; the step gives the untouched weights
      zero gradients (:func:`mpo.optim.zero_missing_gradients`).
    * ``zero_grads`` (DDP; ZeRO-0/1 without ``overlap_comm``): each trainable vision and projector
      weight gets an exactly-zero gradient from one element of it, not from a vision pass.
      DDP's reducer launches its buckets in a fixed order, and ZeRO-1 reduces the gradients at the
      step in parameter order, so only their presence matters.
    * ``blank_tile`` (ZeRO-2, ZeRO-1 with ``overlap_comm``, ZeRO-3): the tower runs on one blank
      tile whose features feed no token, as the official InternVL trainer does. ZeRO-2 reduces
      gradients in buckets filled in the order the backward produces them, which a shortcut
      would change; ZeRO-3 gathers each vision layer's weights in its forward, a collective
      every process must join.

    Every mode gives the vision weights the same zero gradients on a text-only step
    (:mod:`mpo.train.optim` says why that and not none), so the runs agree whatever the launch. A frozen
    model (the reference, ``mpo precompute-ref``) takes no gradient: only ZeRO-3's gathers need
    its tower to run.

    Args:
        num_processes: processes of the launch.
        zero: DeepSpeed's ``zero_optimization`` section (its ``stage``), or ``None`` without
            DeepSpeed.
        trained: whether the model is trained (the policy) or frozen.
    """
    stage = None if zero is None else zero.get("stage", 0)
    if not trained:
        return "blank_tile" if stage == 3 else "skip"
    if zero is None:
        return "skip" if num_processes == 1 else "zero_grads"
    if stage == 3 or stage == 2 or zero.get("overlap_comm", False):
        return "blank_tile"
    return "zero_grads"


def zero_gradient_touch(model: nn.Module) -> torch.Tensor | None:
    """An exact 0 that depends on every trainable vision-tower and projector weight (one element
    of each), so the backward gives each of them a zero gradient; ``None`` when none trains."""
    inner = model.model
    weights = [p for module in (inner.vision_tower, inner.multi_modal_projector) for p in module.parameters() if p.requires_grad]
    if not weights:
        return None
    return 0.0 * torch.stack([w.reshape(-1)[0].float() for w in weights]).sum()


def use_sparse_tied_embedding_gradient(model: nn.Module) -> bool:
    """Makes the input embedding's share of a tied embedding's gradient sparse; returns whether
    the embedding is tied (nothing changes otherwise).

    With tied embeddings the LM head's backward gives the shared weight a dense ``[V, H]``
    gradient, and the embedding lookup another, mostly zeros (a row per distinct input token):
    a second ``[V, H]`` tensor allocated, filled and added at the end of every backward (310 MB
    and about a tenth of a text step on a CPU at InternVL3's vocabulary and hidden size 512). As a
    sparse gradient (``nn.Embedding.sparse``), autograd adds its rows into the head's dense one
    before the weight's gradient is accumulated, so the weight still gets one dense gradient, of
    the same values. Only where that gradient is all that is looked at: one process without
    DeepSpeed (DDP's reducer and ZeRO's hooks expect a sparse-flagged embedding's gradient to
    arrive sparse).
    """
    embedding = model.get_input_embeddings()
    tied = embedding.weight is model.get_output_embeddings().weight
    if tied:
        embedding.sparse = True
    return tied


def attention_inputs(batch: PreferenceBatch, kernel: str) -> dict:
    """The language model's attention arguments: the 2D padding mask (plain layout), a
    FlexAttention ``BlockMask`` (``flex``), or the pair blocks that
    :func:`mpo.model.pair_attention.pair_sdpa_attention` reads (``sdpa``, passed through
    transformers to every layer's attention function). The pair blocks are read off the ids once
    and serve either kernel."""
    if batch.pair_ids is None:
        return {"attention_mask": batch.attention_mask}
    blocks = pair_blocks(batch.pair_ids, batch.part_ids)
    if kernel == "flex":
        return {"attention_mask": flex_block_mask(batch.pair_ids, batch.part_ids, blocks)}
    # An all-ones 2D mask lets transformers skip building a mask of its own (a missing one would
    # make it read the restarting position ids as packed sequences and build a dense mask).
    ones = torch.ones_like(batch.input_ids)
    return {"attention_mask": ones, "pair_blocks": blocks}


def sequence_logps(token_logps: torch.Tensor, segment_ids: torch.Tensor, num_pairs: int) -> SequenceLogps:
    """Sums per-token log-probs into ``[chosen..., rejected...]`` sequences.

    Args:
        token_logps: ``[N]`` log p of each scored token.
        segment_ids: ``[N]`` ``j`` for pair j's chosen tokens, ``num_pairs + j`` for its rejected.
        num_pairs: B.
    """
    sums = token_logps.new_zeros(2 * num_pairs).index_add(0, segment_ids, token_logps)
    counts = torch.bincount(segment_ids, minlength=2 * num_pairs)
    return SequenceLogps(
        chosen_logps=sums[:num_pairs],
        rejected_logps=sums[num_pairs:],
        chosen_token_counts=counts[:num_pairs],
        rejected_token_counts=counts[num_pairs:],
    )


class PreferenceForward(nn.Module):
    """Wraps an InternVL model; ``forward(batch)`` returns summed response log-probs.

    Args:
        model: an ``InternVLForConditionalGeneration`` (or a peft model around one).
        text_only_vision: what a text-only micro-batch does with the vision tower, one of
            :data:`TEXT_ONLY_VISION` (:func:`text_only_vision` picks it for a launch).
        sparse_embedding_gradient: give a tied input embedding a sparse gradient
            (:func:`use_sparse_tied_embedding_gradient`); one process without DeepSpeed only.
    """

    def __init__(self, model: nn.Module, text_only_vision: str = "skip", sparse_embedding_gradient: bool = False):
        super().__init__()
        if text_only_vision not in TEXT_ONLY_VISION:
            raise ValueError(f"text_only_vision must be one of {TEXT_ONLY_VISION}, got {text_only_vision!r}")
        self.model = model
        self.text_only_vision = text_only_vision
        # Scored positions get fp32 logits whatever the weights' dtype (see mpo.model.fp32_head).
        use_float32_head(base_model(model))
        if sparse_embedding_gradient:
            use_sparse_tied_embedding_gradient(base_model(model))
        # The language model's attention as loaded; shared-prefix and packed batches switch it to
        # the kernel their mask needs (transformers' public set_attn_implementation), plain
        # batches switch it back.
        self.loaded_text_attention = base_model(model).config.text_config._attn_implementation

    def use_attention_for(self, batch: PreferenceBatch) -> str:
        """Sets the language model's attention implementation for ``batch``; returns the kernel
        (``plain``, ``sdpa`` or ``flex``). The vision tower keeps its own implementation."""
        hf = base_model(self.model)
        if batch.pair_ids is None:
            kernel, wanted = "plain", self.loaded_text_attention
        else:
            kernel = attention_kernel(batch.attention, batch.input_ids.device)
            wanted = "flex_attention" if kernel == "flex" else PAIR_SDPA
        if hf.config.text_config._attn_implementation != wanted:
            hf.set_attn_implementation({"text_config": wanted})
        return kernel

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[tiles, tokens_per_tile, hidden]`` projected features of the tiles."""
        hf = base_model(self.model)
        return hf.model.get_image_features(pixel_values=pixel_values, return_dict=True).pooler_output

    @staticmethod
    def _blank_tile(hf: nn.Module, device: torch.device) -> torch.Tensor:
        # float32: get_image_features casts pixels to the tower's dtype. Reading a weight's dtype
        # here instead would, under ZeRO-3, gather that weight on this process alone (a partitioned
        # parameter is gathered when read), a collective the processes with images never join.
        size = hf.config.vision_config.image_size
        height, width = (size, size) if isinstance(size, int) else size
        return torch.zeros(1, 3, height, width, device=device)

    def forward(self, batch: PreferenceBatch, image_features: torch.Tensor | None = None) -> ForwardOutput:
        """Scores every response token of the batch.

        Args:
            batch: the micro-batch, on the model's device.
            image_features: features of ``batch.pixel_values`` computed elsewhere (the policy's,
                for a reference with the same frozen vision tower); computed here when ``None``.
        """
        hf = base_model(self.model)
        text_only = batch.pixel_values is None
        touch = None
        if text_only and self.text_only_vision == "zero_grads" and torch.is_grad_enabled():
            # Made before the language model runs, so the backward reaches these weights last,
            # where a vision pass would have: only the gradients' presence is changed.
            touch = zero_gradient_touch(hf)
        if image_features is None and (not text_only or self.text_only_vision == "blank_tile"):
            pixels = self._blank_tile(hf, batch.input_ids.device) if text_only else batch.pixel_values
            image_features = self.image_features(pixels)
        encoder_outputs = None
        if not text_only:
            features = image_features.repeat(batch.feature_repeat, 1, 1) if batch.feature_repeat > 1 else image_features
            encoder_outputs = {"image": BaseModelOutputWithPooling(pooler_output=features)}
        hidden = hf.model(
            input_ids=batch.input_ids,
            position_ids=batch.position_ids,
            mm_encoder_outputs=encoder_outputs,
            use_cache=False,
            **attention_inputs(batch, self.use_attention_for(batch)),
        ).last_hidden_state
        # The LM head runs on the response positions only: prompts are mostly image tokens,
        # and a [rows, T, vocab] logits tensor would dominate memory for nothing.
        scored = hidden.flatten(0, 1)[batch.predict_index]
        token_logps = hf.lm_head(scored, targets=batch.target_ids)  # fp32, no [N, vocab] tensor kept
        if text_only and image_features is not None:
            # Exactly 0, but it puts the blank tile's vision weights in the graph (zero gradients).
            token_logps = token_logps + 0.0 * image_features.sum()
        if touch is not None:
            token_logps = token_logps + touch
        return ForwardOutput(sequence_logps(token_logps, batch.segment_ids, batch.num_pairs), image_features)
