"""One forward pass over a :class:`PreferenceBatch` -> summed log-probs of every response.

:class:`PreferenceForward` wraps the HF InternVL model so that the whole computation (vision
features, language model, LM head on response positions only, log-softmax) runs inside the
``forward`` that DDP or DeepSpeed wraps: their gradient hooks and ZeRO-3 parameter gathering see
one ordinary module call. The logits are fp32 whatever the weights' dtype (:mod:`mpo.head`).

The vision tower runs once per pair (``feature_repeat`` copies its features into the chosen and the
rejected rows), and features computed by the policy can be handed to the reference when both share
a frozen vision tower and projector, so one vision pass can serve the whole step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from mpo.head import use_float32_head
from mpo.packing import PAIR_SDPA, flex_block_mask, pair_blocks
from mpo.types import PreferenceBatch, SequenceLogps


@dataclass
class ForwardOutput:
    """Log-probs of a micro-batch plus the image features used (to share with the reference)."""

    logps: SequenceLogps
    image_features: torch.Tensor | None


def base_model(model: nn.Module) -> nn.Module:
    """The ``InternVLForConditionalGeneration`` under a peft wrapper (adapters stay injected)."""
    from peft import PeftModel

    return model.get_base_model() if isinstance(model, PeftModel) else model


def attention_kernel(requested: str, device: torch.device) -> str:
    """How a shared-prefix or packed batch's attention is computed: ``flex`` or ``sdpa``.

    ``auto`` picks FlexAttention on CUDA (a block mask and a fused kernel that skips the blocks no
    token attends to) and per-pair SDPA elsewhere (FlexAttention has no backward on CPU); see
    :mod:`mpo.packing`.
    """
    if requested == "auto":
        return "flex" if device.type == "cuda" else "sdpa"
    if requested not in ("sdpa", "flex"):
        raise ValueError(f"forward.attention must be auto, sdpa or flex, got {requested!r}")
    return requested


def attention_inputs(batch: PreferenceBatch, kernel: str) -> dict:
    """The language model's attention arguments: the 2D padding mask (plain layout), a
    FlexAttention ``BlockMask`` (``flex``), or the pair blocks that :func:`mpo.packing.pair_sdpa_attention`
    reads (``sdpa``, passed through transformers to every layer's attention function)."""
    if batch.pair_ids is None:
        return {"attention_mask": batch.attention_mask}
    if kernel == "flex":
        return {"attention_mask": flex_block_mask(batch.pair_ids, batch.part_ids)}
    # An all-ones 2D mask lets transformers skip building a mask of its own (a missing one would
    # make it read the restarting position ids as packed sequences and build a dense mask).
    ones = torch.ones_like(batch.input_ids)
    return {"attention_mask": ones, "pair_blocks": pair_blocks(batch.pair_ids, batch.part_ids)}


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
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        # Scored positions get fp32 logits whatever the weights' dtype (see mpo.head).
        use_float32_head(base_model(model))
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
    def _blank_tile(hf: nn.Module, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        size = hf.config.vision_config.image_size
        height, width = (size, size) if isinstance(size, int) else size
        return torch.zeros(1, 3, height, width, dtype=dtype, device=device)

    def forward(self, batch: PreferenceBatch, image_features: torch.Tensor | None = None) -> ForwardOutput:
        """Scores every response token of the batch.

        Args:
            batch: the micro-batch, on the model's device.
            image_features: features of ``batch.pixel_values`` computed elsewhere (the policy's,
                for a reference with the same frozen vision tower); computed here when ``None``.
        """
        hf = base_model(self.model)
        dtype = hf.get_input_embeddings().weight.dtype
        text_only = batch.pixel_values is None
        if image_features is None:
            # A text-only micro-batch still runs the vision tower, on one blank tile whose features
            # feed no token (as the official InternVL trainer does): every process then uses every
            # weight at every step, which DDP's and ZeRO-2's gradient reduction and ZeRO-3's
            # per-layer gathers need whenever another process's micro-batch has images.
            pixels = self._blank_tile(hf, dtype, batch.input_ids.device) if text_only else batch.pixel_values
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
        logits = hf.lm_head(scored)  # fp32
        token_logps = logits.gather(-1, batch.target_ids[:, None]).squeeze(-1) - logits.logsumexp(-1)
        if text_only:
            # Exactly 0, but it puts the blank tile's vision weights in the graph (zero gradients).
            token_logps = token_logps + 0.0 * image_features.sum()
        return ForwardOutput(sequence_logps(token_logps, batch.segment_ids, batch.num_pairs), image_features)
