"""Typed containers passed between the data, forward and loss stages (never bare tuples)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class PreferenceRecord:
    """One MMPR line, validated, with image paths resolved inside their root.

    Attributes:
        question: the user turn, one ``<image>`` per image (added when the line had none).
        chosen: the preferred response text.
        rejected: the dispreferred response text.
        images: absolute image paths (empty for text-only records).
        video: absolute video path (or frame directory), or ``None``.
        source: ``"<annotation file>:<line number>"``, for error messages and reports.
        max_dynamic_patch: the tile budget for this record's images.
        system_prompt: the system message text, or ``None`` for no system turn.
        rendered_prompt: the prompt as the data gave it already rendered (a TRL string prompt
            holding the chat template's tokens, :mod:`mpo.data.rendered`), which the checkpoint's
            template must reproduce; ``None`` for every other record.
    """

    question: str
    chosen: str
    rejected: str
    images: list[str] = field(default_factory=list)
    video: str | None = None
    source: str = ""
    max_dynamic_patch: int = 12
    system_prompt: str | None = None
    rendered_prompt: str | None = None


@dataclass
class EncodedPair:
    """A tokenized preference pair.

    Attributes:
        prompt_ids: the chat-formatted prompt, image placeholders already expanded to
            ``<img><IMG_CONTEXT>*N</img>``, ending with the assistant header.
        chosen_ids: chosen response tokens followed by the end-of-turn token.
        rejected_ids: rejected response tokens followed by the end-of-turn token.
        pixel_values: ``[tiles, 3, H, W]`` for every image of the prompt in order, or ``None``.
        source: where the record came from (``file:line``).
        truncated: the responses were cut to fit ``data.max_length``.
    """

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    pixel_values: torch.Tensor | None
    source: str = ""
    truncated: bool = False

    @property
    def num_tiles(self) -> int:
        return 0 if self.pixel_values is None else int(self.pixel_values.shape[0])


@dataclass
class PreferenceBatch:
    """A micro-batch laid out for one forward pass, whatever the layout.

    The rows hold ``num_pairs`` pairs in one of the layouts of :mod:`mpo.data.layouts` (``plain``: a
    chosen row and a rejected row per pair; ``shared_prefix``: ``[prompt | chosen | rejected]``
    per pair; ``packed``: several such pairs per row). The scoring index says, for every response
    token, which hidden state predicts it and which sequence it belongs to, so log-probs are
    computed the same way for every layout and the LM head runs on response positions only.

    Attributes:
        input_ids: ``[R, T]`` token ids, right-padded with the pad id.
        attention_mask: ``[R, T]`` 1 for real tokens (plain layout), or ``None`` for the
            shared-prefix and packed layouts.
        pair_ids: ``[R, T]`` the pair each token belongs to, -1 for padding (shared-prefix and
            packed layouts), else ``None``. With ``part_ids`` it defines who may attend to whom
            (:func:`mpo.packing.may_attend`); the ``[R, 1, T, T]`` mask is built on the device
            by the forward, never collated and copied.
        part_ids: ``[R, T]`` 0 prompt, 1 chosen, 2 rejected (shared-prefix and packed layouts).
        position_ids: ``[R, T]``, or ``None`` for the default ``0..T-1``.
        pixel_values: ``[tiles, 3, H, W]`` for every ``<IMG_CONTEXT>`` run in row-major order.
        pair_tile_counts: tiles per pair (the tiles of one pair's prompt), in pair order. The
            packed layout may place pairs out of order, so its ``pixel_values`` follow the rows,
            not this list.
        predict_index: ``[N]`` flat index into ``R*T`` of the hidden state that predicts each
            scored token.
        target_ids: ``[N]`` the scored tokens.
        segment_ids: ``[N]`` ``j`` for a token of pair j's chosen response, ``num_pairs + j`` for
            its rejected response.
        num_pairs: pairs in this micro-batch.
        layout: which layout built it.
        feature_repeat: copies of the image features of ``pixel_values`` (in order) that fill the
            image runs of the rows: 2 in the plain layout with ``dedupe_vision`` (tiles kept once,
            features used by the chosen rows and again by the rejected rows), else 1.
        sources: ``file:line`` of each pair, for reports and precomputed reference keys.
        attention: the recipe's ``forward.attention`` (``auto``, ``sdpa`` or ``flex``): how the
            forward realises the mask of a shared-prefix or packed batch.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    pair_ids: torch.Tensor | None
    part_ids: torch.Tensor | None
    position_ids: torch.Tensor | None
    pixel_values: torch.Tensor | None
    pair_tile_counts: list[int]
    predict_index: torch.Tensor
    target_ids: torch.Tensor
    segment_ids: torch.Tensor
    num_pairs: int
    layout: str
    feature_repeat: int
    sources: list[str] = field(default_factory=list)
    attention: str = "auto"

    @property
    def num_tokens(self) -> int:
        """Real tokens in the batch (pads excluded), for throughput figures."""
        if self.attention_mask is not None:
            return int(self.attention_mask.sum())
        return int((self.pair_ids >= 0).sum())

    def to(self, device: torch.device | str) -> "PreferenceBatch":
        def move(t):
            return None if t is None else t.to(device, non_blocking=True)

        return PreferenceBatch(
            input_ids=move(self.input_ids),
            attention_mask=move(self.attention_mask),
            pair_ids=move(self.pair_ids),
            part_ids=move(self.part_ids),
            position_ids=move(self.position_ids),
            pixel_values=move(self.pixel_values),
            pair_tile_counts=self.pair_tile_counts,
            predict_index=move(self.predict_index),
            target_ids=move(self.target_ids),
            segment_ids=move(self.segment_ids),
            num_pairs=self.num_pairs,
            layout=self.layout,
            feature_repeat=self.feature_repeat,
            sources=self.sources,
            attention=self.attention,
        )


@dataclass
class SequenceLogps:
    """Per-sequence log-probs of a micro-batch, summed over response tokens.

    Attributes:
        chosen_logps: ``[B]`` sum of log p(chosen token) over each chosen response.
        rejected_logps: ``[B]`` the same for the rejected responses.
        chosen_token_counts: ``[B]`` response tokens per chosen response.
        rejected_token_counts: ``[B]`` response tokens per rejected response.
    """

    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    chosen_token_counts: torch.Tensor
    rejected_token_counts: torch.Tensor


@dataclass
class MPOLossOutput:
    """What :class:`mpo.losses.MPOLoss` returns.

    Attributes:
        loss: the weighted scalar to backpropagate.
        terms: unweighted value of each computed term, keyed ``dpo``, ``bco``, ``sft``.
        chosen_rewards: ``[B]`` beta-scaled log-ratios, or ``None`` without a reference.
        rejected_rewards: ``[B]`` likewise.
    """

    loss: torch.Tensor
    terms: dict[str, torch.Tensor]
    chosen_rewards: torch.Tensor | None
    rejected_rewards: torch.Tensor | None
