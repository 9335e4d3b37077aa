"""Prefix sharing and packing: a pair's prompt (images included) is encoded once.

The ``shared_prefix`` layout puts each pair in one row ``[prompt | chosen | rejected]``. The
rejected tokens may not attend to the chosen ones, and their position ids restart at the prompt
length, so every rejected token sees exactly what it would see in its own row ``[prompt |
rejected]``; the first rejected token is predicted from the prompt's last position. Log-probs equal
those of two separate forwards (``tests/test_packing.py`` checks 1e-5 per token in float32), while
the prompt, often thousands of image tokens, is encoded once instead of twice.

The ``packed`` layout puts several such pairs in one row, up to ``pack_length`` tokens (first-fit
decreasing), with block-diagonal attention (no pair sees another) and position ids restarting at 0
for each pair, so micro-batches are not mostly padding.

Example with pad id 0, two text-only pairs (prompt ids ``[5, 6]`` / ``[7]``, chosen ``[8]`` /
``[9, 9]``, rejected ``[3, 3]`` / ``[4]``; the same pairs as :mod:`mpo.collate`'s example)::

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

The "may attend" rule (:func:`may_attend`) for row 0 (query rows, key columns)::

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

``tests/test_packing.py`` checks exactly these tensors. The batch carries the per-token
``pair_ids`` / ``part_ids`` rather than a ``[R, 1, T, T]`` mask, and the forward realises the rule
with one of two kernels (``forward.attention``), neither of which materialises a dense mask:

* ``flex`` (default on CUDA): a FlexAttention ``BlockMask`` (:func:`flex_block_mask`), built on
  the device; the fused kernel skips the blocks no query attends to.
* ``sdpa`` (default elsewhere): :func:`pair_sdpa_attention`, two SDPA calls per pair block.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from mpo.config import DataConfig, ForwardConfig
from mpo.types import EncodedPair, PreferenceBatch

PROMPT, CHOSEN, REJECTED = 0, 1, 2
PAD_PAIR = -1


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
    predict, targets, segments = [], [], []
    for segment, (positions, ids) in enumerate(chosen + rejected):
        predict.extend(positions)
        targets.extend(ids)
        segments.extend([segment] * len(ids))
    return PreferenceBatch(
        input_ids=input_ids,
        attention_mask=None,
        pair_ids=pair_ids,
        part_ids=part_ids,
        position_ids=position_ids,
        pixel_values=torch.cat(tiles) if tiles else None,
        pair_tile_counts=[p.num_tiles for p in pairs],
        predict_index=torch.tensor(predict, dtype=torch.long),
        target_ids=torch.tensor(targets, dtype=torch.long),
        segment_ids=torch.tensor(segments, dtype=torch.long),
        num_pairs=num_pairs,
        layout=layout,
        feature_repeat=1,
        sources=[p.source for p in pairs],
        attention=attention,
    )


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


def build_prefix_collator(forward: ForwardConfig, data: DataConfig, pad_id: int) -> Callable[[list[EncodedPair]], PreferenceBatch]:
    """The ``shared_prefix``, ``packed`` or ``auto`` collator of a recipe."""
    pack_length = forward.pack_length or data.max_length
    if forward.layout == "shared_prefix":
        return partial(collate_shared_prefix, pad_id=pad_id, attention=forward.attention)
    if forward.layout == "packed":
        return partial(collate_packed, pad_id=pad_id, pack_length=pack_length, attention=forward.attention)
    if forward.layout == "auto":
        return partial(collate_auto, pad_id=pad_id, pack_length=pack_length, attention=forward.attention)
    raise ValueError(f"no prefix collator for layout {forward.layout!r}")


def may_attend(query_pair, query_part, key_pair, key_part, query, key):
    """The layout's attention rule, elementwise over broadcastable tensors.

    A query attends to a key of the same pair at or before it, except a rejected query to a chosen
    key. Padding is one more "pair" (id -1), so a pad query always sees itself: no softmax row is
    empty, and no NaN can reach the gradients of real tokens.
    """
    hidden = (query_part == REJECTED) & (key_part == CHOSEN)
    return (query_pair == key_pair) & (key <= query) & ~hidden


def flex_block_mask(pair_ids: torch.Tensor, part_ids: torch.Tensor):
    """The same rule as a FlexAttention ``BlockMask``, built on the ids' device.

    Blocks where no query sees any key (other pairs of a packed row, the chosen block seen from
    the rejected block, everything above the diagonal) are skipped by the kernel instead of being
    computed and masked, so a packed row costs what its pairs cost separately.
    """
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(batch, head, query, key):
        return may_attend(pair_ids[batch, query], part_ids[batch, query], pair_ids[batch, key], part_ids[batch, key], query, key)

    rows, length = pair_ids.shape
    return create_block_mask(mask_mod, B=rows, H=None, Q_LEN=length, KV_LEN=length, device=pair_ids.device)


def pair_blocks(pair_ids: torch.Tensor, part_ids: torch.Tensor) -> list[tuple[int, int, int, int, int]]:
    """``(row, start, prompt, chosen, rejected)`` of every pair block, in row order.

    For the docstring's packed example: ``[(0, 0, 2, 1, 2), (0, 5, 1, 1, 1), (1, 0, 1, 2, 1)]``.
    """
    blocks = []
    for row, (pairs, parts) in enumerate(zip(pair_ids.cpu(), part_ids.cpu())):
        ids, lengths = torch.unique_consecutive(pairs, return_counts=True)
        segment = torch.repeat_interleave(torch.arange(len(ids)), lengths)
        counts = torch.zeros(len(ids), 3, dtype=torch.long).index_put_((segment, parts), torch.ones_like(parts), accumulate=True)
        starts = torch.cumsum(lengths, 0) - lengths
        for pair, start, (prompt, chosen, rejected) in zip(ids.tolist(), starts.tolist(), counts.tolist()):
            if pair != PAD_PAIR:
                blocks.append((row, start, prompt, chosen, rejected))
    return blocks


def pair_sdpa_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, pair_blocks=None, **kwargs):
    """Attention of shared-prefix and packed rows as SDPA calls per pair block (the CPU kernel).

    Registered with transformers' ``AttentionInterface`` as ``"mpo_pair_sdpa"``; the forward
    passes the blocks as the ``pair_blocks`` keyword, which transformers hands to the attention
    function of every layer. Per block, ``[prompt | chosen]`` attends causally (plain causal SDPA,
    no mask) and the rejected queries attend to ``[prompt | rejected]`` keys under a small
    lower-right causal mask. Nothing else is computed: a dense ``[T, T]`` mask over a packed row
    would spend most of its attention on pairs that may not see each other (CPU SDPA computes
    masked blocks), and would hold ``R*T*T`` mask entries. Padding gets zeros.

    Args:
        query: ``[R, heads, T, head_dim]``; ``key``/``value``: ``[R, kv_heads, T, head_dim]``.
        attention_mask: unused with ``pair_blocks`` (the blocks are the mask).
        pair_blocks: :func:`pair_blocks` of the batch; without them the call is plain SDPA.

    Returns:
        ``([R, T, heads, head_dim], None)`` as transformers' attention functions do.
    """
    if pair_blocks is None:
        # Any other call on the model (generation, evaluation) is transformers' own SDPA, with
        # the mask transformers builds for it (the mask function is registered below too).
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)  # grouped-query heads
    length = query.shape[2]
    by_row: list[list[tuple[int, int, int, int]]] = [[] for _ in range(query.shape[0])]
    for row, start, prompt, chosen, rejected in pair_blocks:
        by_row[row].append((start, prompt, chosen, rejected))
    # Rows and blocks are cut with unbind and split, never by slicing: the backward of a slice
    # writes its gradient into a zero tensor as large as what was sliced, so slicing every block
    # out of a row (every row out of the batch) costs rows x blocks x the row's size, 16 blocks
    # of 100 tokens 2.4x the attention itself; a split's backward is one concatenation.
    outputs = []
    for q_row, k_row, v_row, blocks in zip(query.unbind(0), key.unbind(0), value.unbind(0), by_row):
        sizes, end = [], 0
        for start, prompt, chosen, rejected in blocks:
            sizes += [prompt + chosen, rejected]
            end = start + prompt + chosen + rejected
        sizes.append(length - end)  # padding
        q_parts, k_parts, v_parts = (t.split(sizes, dim=1) for t in (q_row, k_row, v_row))
        parts = []
        for i, (start, prompt, chosen, rejected) in enumerate(blocks):
            q_head, k_head, v_head = q_parts[2 * i], k_parts[2 * i], v_parts[2 * i]
            parts.append(F.scaled_dot_product_attention(q_head, k_head, v_head, dropout_p=dropout, is_causal=True, scale=scaling))
            keys = torch.cat([k_head[:, :prompt], k_parts[2 * i + 1]], dim=1)
            values = torch.cat([v_head[:, :prompt], v_parts[2 * i + 1]], dim=1)
            # rejected token i sees the whole prompt and rejected tokens 0..i
            allowed = torch.arange(prompt + rejected, device=q_row.device)[None, :] <= prompt + torch.arange(rejected, device=q_row.device)[:, None]
            parts.append(F.scaled_dot_product_attention(q_parts[2 * i + 1], keys, values, attn_mask=allowed, dropout_p=dropout, scale=scaling))
        parts.append(q_row.new_zeros(q_row.shape[0], length - end, q_row.shape[2]))
        outputs.append(torch.cat(parts, dim=1))
    return torch.stack(outputs).transpose(1, 2).contiguous(), None


# Registered at import (mpo.forward imports this module) so that set_attn_implementation can name
# it; the mask function is transformers' SDPA one, for calls without pair blocks.
PAIR_SDPA = "mpo_pair_sdpa"
AttentionInterface.register(PAIR_SDPA, pair_sdpa_attention)
AttentionMaskInterface.register(PAIR_SDPA, sdpa_mask)
