"""Attention kernels for shared-prefix and packed rows (:mod:`mpo.data.layouts`).

A batch carries the per-token ``pair_ids`` / ``part_ids`` rather than a ``[R, 1, T, T]`` mask, and
the forward realises the rule (:func:`may_attend`) with one of two kernels (``forward.attention``), neither of which materialises a dense mask:

* ``flex`` (default on CUDA): a FlexAttention ``BlockMask`` (:func:`flex_block_mask`), built on
  the device from the pair blocks (:mod:`mpo.model.block_mask`, memory linear in the row's
  tiles); the fused kernel skips the blocks no query attends to.
* ``sdpa`` (default elsewhere): :func:`pair_sdpa_attention`, two SDPA calls per pair block.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from mpo.data.layouts import CHOSEN, PAD_PAIR, REJECTED
from mpo.model.block_mask import pair_block_mask


def may_attend(query_pair, query_part, key_pair, key_part, query, key):
    """The layout's attention rule, elementwise over broadcastable tensors.

    A query attends to a key of the same pair at or before it, except a rejected query to a chosen
    key. Padding is one more "pair" (id -1), so a pad query always sees itself: no softmax row is
    empty, and no NaN can reach the gradients of real tokens.
    """
    hidden = (query_part == REJECTED) & (key_part == CHOSEN)
    return (query_pair == key_pair) & (key <= query) & ~hidden


def pair_mask_mod(pair_ids: torch.Tensor, part_ids: torch.Tensor):
    """The rule as a FlexAttention ``mask_mod``: :func:`may_attend` of the two tokens, looked up
    in the batch's ``[rows, T]`` ids (the kernel evaluates it on the partial tiles only)."""

    def mask_mod(batch, head, query, key):
        return may_attend(pair_ids[batch, query], part_ids[batch, query], pair_ids[batch, key], part_ids[batch, key], query, key)

    return mask_mod


def flex_block_mask(pair_ids: torch.Tensor, part_ids: torch.Tensor, blocks: list[tuple[int, int, int, int, int]] | None = None):
    """The same rule as a FlexAttention ``BlockMask``, built on the ids' device from the pair
    blocks (:func:`mpo.model.block_mask.pair_block_mask`: the tensors ``create_block_mask`` would
    make, in memory linear in the row's tiles, not in ``T x T``).

    Blocks where no query sees any key (other pairs of a packed row, the chosen block seen from
    the rejected block, everything above the diagonal) are skipped by the kernel instead of being
    computed and masked, so a packed row costs what its pairs cost separately.

    Args:
        pair_ids, part_ids: the batch's ``[R, T]`` ids.
        blocks: :func:`pair_blocks` of the ids when the caller has them (computed here otherwise:
            one copy of the ids to the host).
    """
    rows, length = pair_ids.shape
    if blocks is None:
        blocks = pair_blocks(pair_ids, part_ids)
    return pair_block_mask(blocks, rows, length, pair_mask_mod(pair_ids, part_ids), pair_ids.device)


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
        query: ``[R, heads, T, head_dim]``; ``key``/``value``: ``[R, kv_heads, T, head_dim]``
            (``heads`` a multiple of ``kv_heads``).
        attention_mask: unused with ``pair_blocks`` (the blocks are the mask).
        pair_blocks: :func:`pair_blocks` of the batch; without them the call is plain SDPA.

    Returns:
        ``([R, T, heads, head_dim], None)`` as transformers' attention functions do.
    """
    if pair_blocks is None:
        # Any other call on the model (generation, evaluation) is transformers' own SDPA, with
        # the mask transformers builds for it (the mask function is registered below too).
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    # Grouped-query heads are left to SDPA (enable_gqa): expanding the keys and values first would
    # copy them to every query head, and the backward would keep the copies.
    gqa = query.shape[1] != key.shape[1]
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
            parts.append(F.scaled_dot_product_attention(q_head, k_head, v_head, dropout_p=dropout, is_causal=True, scale=scaling,
                                                        enable_gqa=gqa))
            keys = torch.cat([k_head[:, :prompt], k_parts[2 * i + 1]], dim=1)
            values = torch.cat([v_head[:, :prompt], v_parts[2 * i + 1]], dim=1)
            # rejected token i sees the whole prompt and rejected tokens 0..i
            allowed = torch.arange(prompt + rejected, device=q_row.device)[None, :] <= prompt + torch.arange(rejected, device=q_row.device)[:, None]
            parts.append(F.scaled_dot_product_attention(q_parts[2 * i + 1], keys, values, attn_mask=allowed, dropout_p=dropout,
                                                        scale=scaling, enable_gqa=gqa))
        parts.append(q_row.new_zeros(q_row.shape[0], length - end, q_row.shape[2]))
        outputs.append(torch.cat(parts, dim=1))
    return torch.stack(outputs).transpose(1, 2).contiguous(), None


# Registered at import (mpo.model.forward imports this module) so that set_attn_implementation can name
# it; the mask function is transformers' SDPA one, for calls without pair blocks.
PAIR_SDPA = "mpo_pair_sdpa"
AttentionInterface.register(PAIR_SDPA, pair_sdpa_attention)
AttentionMaskInterface.register(PAIR_SDPA, sdpa_mask)
