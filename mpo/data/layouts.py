"""Lays encoded pairs out in rows for one forward pass: ``plain``, ``shared_prefix``, ``packed``, ``auto``.

Every layout produces the same scoring index (``predict_index``, ``target_ids``, ``segment_ids``),
so log-probs are computed the same way for each; the attention kernels that realise the
shared-prefix and packed rules live in :mod:`mpo.model.pair_attention`.

The ``plain`` layout is the peers' concatenated forward: one row per chosen response and one per
rejected response, chosen rows first, right-padded. Example with pad id 0, two text-only pairs
(prompt ids ``[5, 6]`` / ``[7]``, chosen ``[8]`` / ``[9, 9]``, rejected ``[3, 3]`` / ``[4]``)::

    input_ids      = [[5, 6, 8, 0],     # pair 0 chosen
                      [7, 9, 9, 0],     # pair 1 chosen
                      [5, 6, 3, 3],     # pair 0 rejected
                      [7, 4, 0, 0]]     # pair 1 rejected
    attention_mask = [[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]]
    predict_index  = [1, 4, 5, 9, 10, 12]   # flat index (row * 4 + col) of the predicting state
    target_ids     = [8, 9, 9, 3, 3, 4]
    segment_ids    = [0, 1, 1, 2, 2, 3]     # pair j chosen -> j, pair j rejected -> 2 + j

With prefix sharing and packing a pair's prompt (images included) is encoded once. The
``shared_prefix`` layout puts each pair in one row ``[prompt | chosen | rejected]``. The
rejected tokens may not attend to the chosen ones, and their position ids restart at the prompt
length, so every rejected token sees exactly what it would see in its own row ``[prompt |
rejected]``; the first rejected token is predicted from the prompt's last position. Log-probs equal
those of two separate forwards (``tests/model/test_pair_attention.py`` checks 1e-5 per token in float32), while
the prompt, often thousands of image tokens, is encoded once instead of twice.

The ``packed`` layout puts several such pairs in one row, up to ``pack_length`` tokens (first-fit
decreasing), with block-diagonal attention (no pair sees another) and position ids restarting at 0
for each pair, so micro-batches are not mostly padding.

Example with pad id 0, two text-only pairs (prompt ids ``[5, 6]`` / ``[7]``, chosen ``[8]`` /
``[9, 9]``, rejected ``[3, 3]`` / ``[4]``; the same pairs as the plain example)::

    collate_shared_prefix(pairs, pad_id=0)
    input_ids    = [[5, 6, 8, 3, 3],    # pair 0: prompt 5 6 | chosen 8 | rejected 3 3
                    [7, 9, 9, 4, 0]]    # pair 1: prompt 7 | chosen 9 9 | rejected 4 | pad
    position_ids = [[0, 1, 2, 2, 3],    # rejected restarts at the prompt length
                    [0, 1, 2, 1, 0]]
    pair_ids     = [[0, 0, 0, 0, 0], [1, 1, 1, 1, -1]]   # -1: padding
    part_ids     = [[0, 0, 1, 2, 2], [0, 1, 1, 2, 0]]    # 0 prompt, 1 chosen, 2 rejected
    predict_index = [1, 5, 6, 1, 3, 5]  # flat index (row * 5 + col); "3" after the prompt <- 1
    target_ids    = [8, 9, 9, 3, 3, 4]  # the same as the plain layout's
    segment_ids   = [0, 1, 1, 2, 2, 3]  # likewise

The "may attend" rule (:func:`mpo.model.pair_attention.may_attend`) for row 0 (query rows, key columns)::

    [[1, 0, 0, 0, 0],
     [1, 1, 0, 0, 0],
     [1, 1, 1, 0, 0],    # chosen 8 sees the prompt
     [1, 1, 0, 1, 0],    # rejected 3 sees the prompt, not the chosen 8
     [1, 1, 0, 1, 1]]

Packing three pairs (the two above plus prompt ``[2]``, chosen ``[6]``, rejected ``[7]``) into rows
of at most 8 tokens: the pairs are 5, 4 and 3 tokens long; pair 0 opens row 0, pair 1 does not
fit beside it and opens row 1, pair 2 fits in row 0::

    collate_packed(pairs, pad_id=0, pack_length=8)
    input_ids    = [[5, 6, 8, 3, 3, 2, 6, 7],
                    [7, 9, 9, 4, 0, 0, 0, 0]]
    position_ids = [[0, 1, 2, 2, 3, 0, 1, 1],
                    [0, 1, 2, 1, 0, 0, 0, 0]]
    pair_ids     = [[0, 0, 0, 0, 0, 2, 2, 2], [1, 1, 1, 1, -1, -1, -1, -1]]
    part_ids     = [[0, 0, 1, 2, 2, 0, 1, 2], [0, 1, 1, 2, 0, 0, 0, 0]]
    predict_index = [1, 8, 9, 5, 1, 3, 8, 5]
    target_ids    = [8, 9, 9, 6, 3, 3, 4, 7]
    segment_ids   = [0, 1, 1, 2, 3, 3, 4, 5]

``tests/data/test_layouts.py`` and ``tests/model/test_pair_attention.py`` check exactly these tensors. The batch
carries the per-token ``pair_ids`` / ``part_ids`` rather than a ``[R, 1, T, T]`` mask; the forward
realises the rule (:func:`mpo.model.pair_attention.may_attend`) without materialising a dense mask.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch

from mpo.config import DataConfig, ForwardConfig
from mpo.types import EncodedPair, PreferenceBatch

PROMPT, CHOSEN, REJECTED = 0, 1, 2
"""The ``part_ids`` of a shared-prefix or packed row."""
PAD_PAIR = -1
"""The ``pair_ids`` of padding."""


def collate_plain(pairs: list[EncodedPair], pad_id: int, dedupe_vision: bool = True) -> PreferenceBatch:
    """Chosen rows then rejected rows, right-padded (see the module docstring).

    Args:
        pairs: the micro-batch.
        pad_id: the tokenizer's pad id (masked out, never scored).
        dedupe_vision: keep each pair's tiles once; the forward computes their features once and
            uses them for both rows. Off, the tiles are repeated for the rejected rows, the way
            the peers run the vision tower twice per pair.
    """
    rows = [p.prompt_ids + p.chosen_ids for p in pairs] + [p.prompt_ids + p.rejected_ids for p in pairs]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    responses = [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs]
    scored = []
    for row, (ids, response) in enumerate(zip(rows, responses)):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
        start = len(ids) - len(response)
        # token t is predicted by the hidden state at t - 1
        scored.append(([row * width + t - 1 for t in range(start, len(ids))], response))
    tiles = [p.pixel_values for p in pairs if p.pixel_values is not None]
    if tiles and not dedupe_vision:
        tiles = tiles + tiles
    return _batch(pairs, scored, tiles, input_ids=input_ids, attention_mask=attention_mask, pair_ids=None,
                  part_ids=None, position_ids=None, layout="plain", feature_repeat=2 if dedupe_vision else 1)


def _batch(pairs: list[EncodedPair], scored: list[tuple[list[int], list[int]]], tiles: list[torch.Tensor],
           **rows) -> PreferenceBatch:
    """The part of a batch every layout fills the same way: the scoring index and the pairs' tiles.

    Args:
        pairs: the micro-batch.
        scored: per response, in segment order (pair j's chosen response is segment j, its
            rejected response ``num_pairs + j``): the flat positions of the hidden states that
            predict its tokens, and the tokens.
        tiles: the pixel values of the image runs, in the order the rows hold them.
        rows: the layout's own fields of :class:`PreferenceBatch` (ids, masks, positions, layout).
    """
    predict, targets, segments = [], [], []
    for segment, (positions, ids) in enumerate(scored):
        predict.extend(positions)
        targets.extend(ids)
        segments.extend([segment] * len(ids))
    return PreferenceBatch(
        pixel_values=torch.cat(tiles) if tiles else None,
        pair_tile_counts=[p.num_tiles for p in pairs],
        predict_index=torch.tensor(predict, dtype=torch.long),
        target_ids=torch.tensor(targets, dtype=torch.long),
        segment_ids=torch.tensor(segments, dtype=torch.long),
        num_pairs=len(pairs),
        sources=[p.source for p in pairs],
        **rows,
    )


def pair_length(pair: EncodedPair) -> int:
    """Tokens one pair takes in a shared-prefix row."""
    return len(pair.prompt_ids) + len(pair.chosen_ids) + len(pair.rejected_ids)


def pack_rows(lengths: list[int], pack_length: int) -> list[list[int]]:
    """First-fit decreasing: pair indices per row, each row at most ``pack_length`` tokens.

    A pair longer than ``pack_length`` gets a row of its own (it is never cut: truncation is the
    dataset's job, under ``data.max_length``). Ties keep the input order, so the result is a pure
    function of the lengths.
    """
    rows: list[list[int]] = []
    used: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for row, filled in enumerate(used):
            if filled + lengths[index] <= pack_length:
                rows[row].append(index)
                used[row] += lengths[index]
                break
        else:
            rows.append([index])
            used.append(lengths[index])
    return rows


def collate_rows(rows: list[list[int]], pairs: list[EncodedPair], pad_id: int, layout: str, attention: str = "auto") -> PreferenceBatch:
    """Lays pairs out as ``[prompt | chosen | rejected]`` blocks, ``rows[r]`` holding the pair
    indices of row ``r`` in order (see the module docstring).

    Args:
        rows: pair indices per row; every pair exactly once.
        pairs: the micro-batch.
        pad_id: the tokenizer's pad id.
        layout: recorded in the batch (``shared_prefix`` or ``packed``).
        attention: the recipe's ``forward.attention`` (``auto``, ``sdpa`` or ``flex``).
    """
    num_pairs = len(pairs)
    width = max(sum(pair_length(pairs[j]) for j in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    pair_ids = torch.full((len(rows), width), PAD_PAIR, dtype=torch.long)
    part_ids = torch.full((len(rows), width), PROMPT, dtype=torch.long)
    # per pair: (flat predicting positions, targets) of its chosen and of its rejected response
    chosen: list[tuple[list[int], list[int]]] = [([], [])] * num_pairs
    rejected: list[tuple[list[int], list[int]]] = [([], [])] * num_pairs
    tiles = []
    for r, row in enumerate(rows):
        start = 0
        for j in row:
            pair = pairs[j]
            prompt, n_chosen, n_rejected = len(pair.prompt_ids), len(pair.chosen_ids), len(pair.rejected_ids)
            end = start + prompt + n_chosen + n_rejected
            input_ids[r, start:end] = torch.tensor(pair.prompt_ids + pair.chosen_ids + pair.rejected_ids)
            position_ids[r, start:end] = torch.cat(
                [torch.arange(prompt + n_chosen), torch.arange(prompt, prompt + n_rejected)]
            )
            pair_ids[r, start:end] = j
            part_ids[r, start + prompt : start + prompt + n_chosen] = CHOSEN
            part_ids[r, start + prompt + n_chosen : end] = REJECTED
            base = r * width + start
            # chosen token t sits at prompt + t and is predicted by the state before it
            chosen[j] = ([base + prompt + t - 1 for t in range(n_chosen)], pair.chosen_ids)
            # rejected token t sits at prompt + chosen + t; the first one is predicted by the
            # prompt's last state, since the rejected block continues the prompt, not the chosen
            first = prompt + n_chosen
            rejected[j] = ([base + prompt - 1] + [base + first + t - 1 for t in range(1, n_rejected)], pair.rejected_ids)
            if pair.pixel_values is not None:
                tiles.append(pair.pixel_values)  # the image runs' order in the rows, row-major
            start = end
    return _batch(pairs, chosen + rejected, tiles, input_ids=input_ids, attention_mask=None, pair_ids=pair_ids,
                  part_ids=part_ids, position_ids=position_ids, layout=layout, feature_repeat=1, attention=attention)


def collate_shared_prefix(pairs: list[EncodedPair], pad_id: int, attention: str = "auto") -> PreferenceBatch:
    """One row ``[prompt | chosen | rejected]`` per pair, right-padded (module docstring)."""
    return collate_rows([[j] for j in range(len(pairs))], pairs, pad_id, "shared_prefix", attention)


def collate_packed(pairs: list[EncodedPair], pad_id: int, pack_length: int, attention: str = "auto") -> PreferenceBatch:
    """Shared-prefix blocks packed into rows of at most ``pack_length`` tokens (module docstring)."""
    rows = pack_rows([pair_length(p) for p in pairs], pack_length)
    return collate_rows(rows, pairs, pad_id, "packed", attention)


def collate_auto(pairs: list[EncodedPair], pad_id: int, pack_length: int, attention: str = "auto") -> PreferenceBatch:
    """``packed`` when it feeds fewer token slots (rows x width) than ``shared_prefix``, else
    ``shared_prefix``; the batch's ``layout`` says which.

    The two compute the same attention (:func:`may_attend`) and the same log-probs; packing only
    drops padding, which the linear layers would compute. Pairs of equal length, a single pair,
    or pairs too long to share a row feed as many slots either way and keep one row per pair.
    For the docstring's three pairs (5, 4 and 3 tokens) and rows of 8: packed 2 x 8 = 16 slots,
    shared-prefix 3 x 5 = 15, so shared-prefix; with rows of 12: packed 1 x 12, so packed.
    """
    lengths = [pair_length(p) for p in pairs]
    rows = pack_rows(lengths, pack_length)
    packed_slots = len(rows) * max(sum(lengths[j] for j in row) for row in rows)
    if packed_slots < len(pairs) * max(lengths):
        return collate_rows(rows, pairs, pad_id, "packed", attention)
    return collate_shared_prefix(pairs, pad_id, attention)


def build_collator(forward: ForwardConfig, data: DataConfig, pad_id: int) -> Callable[[list[EncodedPair]], PreferenceBatch]:
    """The recipe's layout as a ``pairs -> PreferenceBatch`` function."""
    pack_length = forward.pack_length or data.max_length
    if forward.layout == "plain":
        return partial(collate_plain, pad_id=pad_id, dedupe_vision=forward.dedupe_vision)
    if forward.layout == "shared_prefix":
        return partial(collate_shared_prefix, pad_id=pad_id, attention=forward.attention)
    if forward.layout == "packed":
        return partial(collate_packed, pad_id=pad_id, pack_length=pack_length, attention=forward.attention)
    return partial(collate_auto, pad_id=pad_id, pack_length=pack_length, attention=forward.attention)
