"""The FlexAttention block mask built from the pair blocks: the same tensors as
``create_block_mask`` and the same attention (its memory: ``tests/tools/test_mask_table.py``)."""

from __future__ import annotations

import random

import pytest
import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
from torch.nn.functional import scaled_dot_product_attention

from mpo.data.layouts import collate_packed, collate_shared_prefix
from mpo.model.block_mask import attention_regions, pair_block_mask, tile_counts
from mpo.model.pair_attention import flex_block_mask, may_attend, pair_blocks, pair_mask_mod
from mpo.tools.memory.mask_table import layout_ids
from mpo.types import EncodedPair

TENSORS = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices", "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices")


def _pair(prompt: int, chosen: int, rejected: int) -> EncodedPair:
    return EncodedPair([1] * prompt, [2] * chosen, [3] * rejected, None)


def _ids(batch) -> tuple[torch.Tensor, torch.Tensor]:
    return batch.pair_ids, batch.part_ids


DOC_PAIRS = [EncodedPair([5, 6], [8], [3, 3], None), EncodedPair([7], [9, 9], [4], None), EncodedPair([2], [6], [7], None)]
UNALIGNED = [_pair(*sizes) for sizes in ((40, 9, 13), (150, 20, 7), (3, 1, 1), (70, 30, 30))]
TINY = [_pair(1 + i % 3, 1 + i // 3 % 3, 1 + i // 9 % 3) for i in range(27)]

# (pair_ids, part_ids) of rows of every kind the builder must handle
CASES = {
    "docstring_shared_prefix": _ids(collate_shared_prefix(DOC_PAIRS, pad_id=0)),
    "docstring_packed": _ids(collate_packed(DOC_PAIRS, pad_id=0, pack_length=8)),
    "shared_prefix_rows_of_different_lengths": _ids(collate_shared_prefix(UNALIGNED, pad_id=0)),
    "packed_blocks_across_tiles": _ids(collate_packed(UNALIGNED, pad_id=0, pack_length=260)),
    "packed_tiny_blocks": _ids(collate_packed(TINY, pad_id=0, pack_length=40)),
    "one_pair_one_tile": layout_ids([[(100, 14, 14)]], 128),
    "one_pair_aligned_to_tiles": layout_ids([[(128, 128, 128)]], 384),
    "long_padding": layout_ids([[(5, 2, 2)], [(200, 1, 3), (1, 1, 1)]], 300),
    "empty_responses": layout_ids([[(130, 0, 5), (3, 4, 0)]], 150),
    # not a collator's layout: padding between pairs sees the padding before it
    "padding_between_pairs": (
        torch.tensor([[0, 0, 0, 0, -1, -1, -1, 1, 1, 1, 1, 1, -1, -1], [-1] * 14]),
        torch.tensor([[0, 0, 1, 2, 0, 0, 0, 0, 0, 1, 1, 2, 0, 0], [0] * 14]),
    ),
}


def assert_same_block_mask(ours: BlockMask, theirs: BlockMask) -> None:
    for name in TENSORS:
        assert torch.equal(getattr(ours, name), getattr(theirs, name)), name
    assert ours.seq_lengths == theirs.seq_lengths and ours.BLOCK_SIZE == theirs.BLOCK_SIZE
    assert torch.equal(ours.to_dense(), theirs.to_dense())


def reference_block_mask(pair_ids: torch.Tensor, part_ids: torch.Tensor, block_size: int) -> BlockMask:
    """``create_block_mask`` over the whole ``[R, T, T]`` grid, with the same ``mask_mod``."""
    rows, length = pair_ids.shape
    return create_block_mask(pair_mask_mod(pair_ids, part_ids), B=rows, H=None, Q_LEN=length, KV_LEN=length, device="cpu", BLOCK_SIZE=block_size)


def from_blocks(pair_ids: torch.Tensor, part_ids: torch.Tensor, block_size: int) -> BlockMask:
    """:func:`pair_block_mask` from the ids' pair blocks, with the layout's ``mask_mod``."""
    rows, length = pair_ids.shape
    return pair_block_mask(pair_blocks(pair_ids, part_ids), rows, length, pair_mask_mod(pair_ids, part_ids), "cpu", block_size)


def dense_rule(pair_ids: torch.Tensor, part_ids: torch.Tensor) -> torch.Tensor:
    """``[R, 1, T, T]`` :func:`may_attend` at every (query, key)."""
    positions = torch.arange(pair_ids.shape[-1])
    rule = may_attend(pair_ids[:, :, None], part_ids[:, :, None], pair_ids[:, None, :], part_ids[:, None, :], positions[:, None], positions)
    return rule[:, None]


def test_regions_of_the_docstring_packed_rows():
    pair_ids, part_ids = CASES["docstring_packed"]
    blocks = pair_blocks(pair_ids, part_ids)
    assert attention_regions(blocks, rows=2, length=8) == [
        (0, 0, 3, 0, 3, 1), (0, 3, 5, 0, 2, 0), (0, 3, 5, 3, 5, 1),  # pair 0: prompt 2, chosen 1, rejected 2
        (0, 5, 7, 5, 7, 1), (0, 7, 8, 5, 6, 0), (0, 7, 8, 7, 8, 1),  # pair 2 at 5
        (1, 0, 3, 0, 3, 1), (1, 3, 4, 0, 1, 0), (1, 3, 4, 3, 4, 1),  # pair 1
        (1, 4, 8, 4, 8, 1),  # row 1's padding sees itself causally
    ]  # fmt: skip


@pytest.mark.parametrize("block_size", [3, 128])
@pytest.mark.parametrize("case", sorted(CASES))
def test_tile_counts_are_the_rule_summed_per_tile(case, block_size):
    pair_ids, part_ids = CASES[case]
    rows, length = pair_ids.shape
    num = -(-length // block_size)
    grid = torch.nn.functional.pad(dense_rule(pair_ids, part_ids)[:, 0], (0, num * block_size - length, 0, num * block_size - length))
    expected = grid.view(rows, num, block_size, num, block_size).sum((2, 4))
    regions = attention_regions(pair_blocks(pair_ids, part_ids), rows, length)
    assert torch.equal(tile_counts(regions, rows, length, block_size), expected)


@pytest.mark.parametrize("block_size", [3, 16, 128])
@pytest.mark.parametrize("case", sorted(CASES))
def test_block_mask_equals_create_block_mask(case, block_size):
    pair_ids, part_ids = CASES[case]
    assert_same_block_mask(from_blocks(pair_ids, part_ids, block_size), reference_block_mask(pair_ids, part_ids, block_size))


def test_random_layouts_equal_create_block_mask():
    """Rows of 1 to 4 pairs of 0 to 20 tokens per part (empty responses included), 0 to 10 tokens
    of padding, tiles of 1 to 16 tokens."""
    rng = random.Random(0)
    for _ in range(40):
        rows = [[(rng.randint(1, 20), rng.randint(0, 8), rng.randint(0, 8)) for _ in range(rng.randint(1, 4))] for _ in range(rng.randint(1, 3))]
        length = max(sum(map(sum, row)) for row in rows) + rng.randint(0, 10)
        pair_ids, part_ids = layout_ids(rows, length)
        block_size = rng.choice([1, 2, 3, 5, 8, 16])
        assert_same_block_mask(from_blocks(pair_ids, part_ids, block_size), reference_block_mask(pair_ids, part_ids, block_size))


def _attention_inputs(rows: int, length: int, dtype=torch.float32):
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(rows, 4, length, 8, generator=generator, dtype=dtype)
    key, value = (torch.randn(rows, 2, length, 8, generator=generator, dtype=dtype) for _ in range(2))
    return query, key, value


def _sdpa(query, key, value, pair_ids, part_ids) -> torch.Tensor:
    key, value = (t.repeat_interleave(2, dim=1) for t in (key, value))  # grouped-query heads
    return scaled_dot_product_attention(query, key, value, attn_mask=dense_rule(pair_ids, part_ids))


@pytest.mark.parametrize("case", ["packed_blocks_across_tiles", "long_padding"])
def test_eager_flex_attention_matches_create_block_mask_and_sdpa(case):
    """Eager flex_attention (what runs on CPU without compile) evaluates the mask_mod at every
    entry and does not read the tile lists, so this checks the mask_mod and the mask's shape; the
    compiled test below runs a kernel that skips tiles."""
    pair_ids, part_ids = CASES[case]
    query, key, value = _attention_inputs(*pair_ids.shape)
    output = flex_attention(query, key, value, block_mask=flex_block_mask(pair_ids, part_ids), enable_gqa=True)
    theirs = flex_attention(query, key, value, block_mask=reference_block_mask(pair_ids, part_ids, 128), enable_gqa=True)
    assert torch.equal(output, theirs)
    torch.testing.assert_close(output, _sdpa(query, key, value, pair_ids, part_ids), atol=1e-6, rtol=0)


@pytest.mark.slow
def test_compiled_flex_attention_reads_the_tiles_and_matches_sdpa():
    """torch.compile's CPU FlexAttention kernel visits only the listed tiles, applying the mask_mod
    to the partial ones only: it gives the attention of the rule with this mask, the same output
    as with create_block_mask's, and a wrong one once the full tiles are dropped (so the tile
    lists are what is being tested). Compiling takes about 20 s on two cores."""
    pair_ids, part_ids = CASES["packed_blocks_across_tiles"]
    query, key, value = _attention_inputs(*pair_ids.shape)
    mask = from_blocks(pair_ids, part_ids, 16)
    compiled = torch.compile(flex_attention)
    output = compiled(query, key, value, block_mask=mask, enable_gqa=True)
    assert torch.equal(output, compiled(query, key, value, block_mask=reference_block_mask(pair_ids, part_ids, 16), enable_gqa=True))
    torch.testing.assert_close(output, _sdpa(query, key, value, pair_ids, part_ids), atol=1e-6, rtol=0)
    no_full = BlockMask.from_kv_blocks(
        mask.kv_num_blocks, mask.kv_indices, torch.zeros_like(mask.full_kv_num_blocks), mask.full_kv_indices,
        BLOCK_SIZE=16, mask_mod=mask.mask_mod, seq_lengths=mask.seq_lengths,
    )  # fmt: skip
    assert not torch.allclose(compiled(query, key, value, block_mask=no_full, enable_gqa=True), output)
