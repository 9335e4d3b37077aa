"""The layouts: exact tensors of every layout (the module docstring's examples), vision dedupe,
padding invariance, masking of prompt tokens, packing and the recipe's choice of collator."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from mpo.config import DataConfig, ForwardConfig
from mpo.data.layouts import build_collator, collate_packed, collate_plain, collate_shared_prefix, pack_rows
from mpo.model.forward import PreferenceForward
from mpo.model.pair_attention import pair_blocks
from mpo.types import EncodedPair, PreferenceBatch


@pytest.fixture(scope="module")
def forward(tiny_hf_model):
    return PreferenceForward(tiny_hf_model)


@pytest.fixture(scope="module")
def pairs(tiny_pairs) -> list[EncodedPair]:
    """A single-image, a two-image, a text-only and a video pair of the example data."""
    return list(tiny_pairs.values())


def _pair(prompt, chosen, rejected, tiles=None) -> EncodedPair:
    return EncodedPair(prompt, chosen, rejected, tiles)


def test_docstring_example_exact_tensors():
    """The example of mpo/data/layouts.py's docstring, tensor for tensor."""
    batch = collate_plain([_pair([5, 6], [8], [3, 3]), _pair([7], [9, 9], [4])], pad_id=0)
    assert_close(batch.input_ids, torch.tensor([[5, 6, 8, 0], [7, 9, 9, 0], [5, 6, 3, 3], [7, 4, 0, 0]]))
    assert_close(batch.attention_mask, torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]]))
    assert_close(batch.predict_index, torch.tensor([1, 4, 5, 9, 10, 12]))
    assert_close(batch.target_ids, torch.tensor([8, 9, 9, 3, 3, 4]))
    assert_close(batch.segment_ids, torch.tensor([0, 1, 1, 2, 2, 3]))
    assert batch.num_pairs == 2 and batch.layout == "plain"
    assert batch.pixel_values is None and batch.pair_ids is None and batch.position_ids is None
    assert batch.pair_tile_counts == [0, 0]
    assert batch.num_tokens == 12  # 3 + 3 + 4 + 2 real tokens


def test_pad_id_fills_the_padding():
    """Pad id 2: every padded slot holds 2 and is masked; real tokens are untouched."""
    batch = collate_plain([_pair([5, 6], [8], [3, 3]), _pair([7], [9, 9], [4])], pad_id=2)
    assert_close(batch.input_ids, torch.tensor([[5, 6, 8, 2], [7, 9, 9, 2], [5, 6, 3, 3], [7, 4, 2, 2]]))


def test_dedupe_vision_keeps_tiles_once():
    """Pairs with 3 and 2 tiles (filled with their pair index): dedupe keeps the 5 tiles once and
    asks the forward to repeat the features twice; without dedupe the tiles are repeated for the
    rejected rows, [pair0, pair1, pair0, pair1], 10 tiles, features used once."""
    tiles0, tiles1 = torch.zeros(3, 3, 4, 4), torch.ones(2, 3, 4, 4)
    pairs = [_pair([5], [8], [3], tiles0), _pair([7], [9], [4], tiles1)]
    on = collate_plain(pairs, pad_id=0, dedupe_vision=True)
    off = collate_plain(pairs, pad_id=0, dedupe_vision=False)
    assert on.pixel_values.shape == (5, 3, 4, 4) and on.feature_repeat == 2
    assert off.pixel_values.shape == (10, 3, 4, 4) and off.feature_repeat == 1
    assert_close(on.pixel_values, torch.cat([tiles0, tiles1]))
    assert_close(off.pixel_values, torch.cat([tiles0, tiles1, tiles0, tiles1]))
    assert on.pair_tile_counts == off.pair_tile_counts == [3, 2]


def test_text_only_pairs_between_image_pairs():
    """A text-only pair contributes no tiles; the image pairs' tiles stay in order."""
    pairs = [_pair([5], [8], [3], torch.zeros(1, 3, 4, 4)), _pair([6], [8], [3]), _pair([7], [8], [3], torch.ones(2, 3, 4, 4))]
    batch = collate_plain(pairs, pad_id=0)
    assert batch.pair_tile_counts == [1, 0, 2]
    assert_close(batch.pixel_values[:, 0, 0, 0], torch.tensor([0.0, 1.0, 1.0]))


def _pad_right(batch: PreferenceBatch, extra: int, pad_id: int) -> PreferenceBatch:
    """The same batch with ``extra`` more padding columns (scoring index remapped)."""
    width = batch.input_ids.shape[1]
    row, col = batch.predict_index // width, batch.predict_index % width
    return dataclasses.replace(
        batch,
        input_ids=F.pad(batch.input_ids, (0, extra), value=pad_id),
        attention_mask=F.pad(batch.attention_mask, (0, extra), value=0),
        predict_index=row * (width + extra) + col,
    )


def test_extra_right_padding_does_not_change_logps(forward, pairs, tiny_processor):
    """Extra pad columns, and padding forced by a longer pair in the batch, leave every
    response's summed log-prob unchanged (padding comes after the scored tokens under a causal
    mask and is masked out). Sums of ~30 float32 log-probs near -7 carry ~1e-5 of rounding, so
    they are compared with atol 1e-4."""
    pad_id = tiny_processor.tokenizer.pad_token_id
    with torch.no_grad():
        batch = collate_plain(pairs, pad_id)
        base = forward(batch).logps
        padded = forward(_pad_right(batch, 7, pad_id)).logps
        alone = forward(collate_plain(pairs[2:3], pad_id)).logps  # the short text pair, unpadded
    assert_close(padded.chosen_logps, base.chosen_logps, atol=1e-4, rtol=0)
    assert_close(padded.rejected_logps, base.rejected_logps, atol=1e-4, rtol=0)
    assert_close(alone.chosen_logps, base.chosen_logps[2:3], atol=1e-4, rtol=0)
    assert_close(alone.rejected_logps, base.rejected_logps[2:3], atol=1e-4, rtol=0)
    # the padded text-only rows really were padded in the batch
    assert batch.input_ids.shape[1] > len(pairs[2].prompt_ids) + len(pairs[2].rejected_ids)


def test_prompt_tokens_are_never_scored(pairs, tiny_processor):
    """For real pairs (one image, two images, text only, video), the scored positions of each row
    are exactly its response positions: no prompt token, image token or pad is a target."""
    pad_id = tiny_processor.tokenizer.pad_token_id
    batch = collate_plain(pairs, pad_id)
    width = batch.input_ids.shape[1]
    positions = batch.predict_index % width + 1  # the token predicted by each hidden state
    rows = batch.predict_index // width
    responses = [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs]
    for row, response in enumerate(responses):
        prompt_length = len(pairs[row % len(pairs)].prompt_ids)
        scored = positions[rows == row].tolist()
        assert scored == list(range(prompt_length, prompt_length + len(response)))
        assert batch.target_ids[rows == row].tolist() == response
    assert_close(batch.target_ids, batch.input_ids[rows, positions])
    image_token = tiny_processor.tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    assert image_token not in batch.target_ids.tolist()
    assert len(batch.target_ids) == sum(len(r) for r in responses)
    assert_close(torch.bincount(batch.segment_ids), torch.tensor([len(r) for r in responses]))


DOC_PAIRS = [_pair([5, 6], [8], [3, 3]), _pair([7], [9, 9], [4]), _pair([2], [6], [7])]


def test_shared_prefix_docstring_example_exact_tensors(dense_mask):
    """mpo/model/pair_attention.py's first example, tensor for tensor."""
    batch = collate_shared_prefix(DOC_PAIRS[:2], pad_id=0)
    assert_close(batch.input_ids, torch.tensor([[5, 6, 8, 3, 3], [7, 9, 9, 4, 0]]))
    assert_close(batch.position_ids, torch.tensor([[0, 1, 2, 2, 3], [0, 1, 2, 1, 0]]))
    assert_close(batch.pair_ids, torch.tensor([[0, 0, 0, 0, 0], [1, 1, 1, 1, -1]]))
    assert_close(batch.part_ids, torch.tensor([[0, 0, 1, 2, 2], [0, 1, 1, 2, 0]]))
    assert_close(batch.predict_index, torch.tensor([1, 5, 6, 1, 3, 5]))
    assert_close(batch.target_ids, torch.tensor([8, 9, 9, 3, 3, 4]))
    assert_close(batch.segment_ids, torch.tensor([0, 1, 1, 2, 2, 3]))
    assert batch.attention_mask is None and batch.pixel_values is None
    assert batch.layout == "shared_prefix" and batch.num_pairs == 2 and batch.feature_repeat == 1
    assert batch.num_tokens == 9
    assert pair_blocks(batch.pair_ids, batch.part_ids) == [(0, 0, 2, 1, 2), (1, 0, 1, 2, 1)]
    mask = dense_mask(batch)
    assert mask.shape == (2, 1, 5, 5) and mask.dtype == torch.bool
    row0 = [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 0, 1, 0], [1, 1, 0, 1, 1]]
    assert_close(mask[0, 0].long(), torch.tensor(row0))
    # row 1: prompt 7 | chosen 9 9 | rejected 4 | pad; the pad sees only itself
    row1 = [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 0, 0, 1, 0], [0, 0, 0, 0, 1]]
    assert_close(mask[1, 0].long(), torch.tensor(row1))


def test_scoring_targets_and_segments_match_the_plain_layout():
    """Every layout scores the same tokens in the same order; only the predicting positions move."""
    plain = collate_plain(DOC_PAIRS, pad_id=0)
    for batch in (collate_shared_prefix(DOC_PAIRS, pad_id=0), collate_packed(DOC_PAIRS, pad_id=0, pack_length=8)):
        assert_close(batch.target_ids, plain.target_ids)
        assert_close(batch.segment_ids, plain.segment_ids)
        assert_close(batch.input_ids.flatten()[batch.predict_index + 1][:4], torch.tensor([8, 9, 9, 6]))


def test_packed_docstring_example_exact_tensors(dense_mask):
    """mpo/model/pair_attention.py's second example: lengths 5, 4, 3 into rows of 8 -> rows [0, 2] and [1]."""
    assert pack_rows([5, 4, 3], 8) == [[0, 2], [1]]
    batch = collate_packed(DOC_PAIRS, pad_id=0, pack_length=8)
    assert_close(batch.input_ids, torch.tensor([[5, 6, 8, 3, 3, 2, 6, 7], [7, 9, 9, 4, 0, 0, 0, 0]]))
    assert_close(batch.position_ids, torch.tensor([[0, 1, 2, 2, 3, 0, 1, 1], [0, 1, 2, 1, 0, 0, 0, 0]]))
    assert_close(batch.pair_ids, torch.tensor([[0, 0, 0, 0, 0, 2, 2, 2], [1, 1, 1, 1, -1, -1, -1, -1]]))
    assert_close(batch.part_ids, torch.tensor([[0, 0, 1, 2, 2, 0, 1, 2], [0, 1, 1, 2, 0, 0, 0, 0]]))
    assert_close(batch.predict_index, torch.tensor([1, 8, 9, 5, 1, 3, 8, 5]))
    assert_close(batch.target_ids, torch.tensor([8, 9, 9, 6, 3, 3, 4, 7]))
    assert_close(batch.segment_ids, torch.tensor([0, 1, 1, 2, 3, 3, 4, 5]))
    assert batch.layout == "packed" and batch.num_pairs == 3 and batch.num_tokens == 12
    assert pair_blocks(batch.pair_ids, batch.part_ids) == [(0, 0, 2, 1, 2), (0, 5, 1, 1, 1), (1, 0, 1, 2, 1)]
    mask = dense_mask(batch)[0, 0]
    assert not mask[5:, :5].any() and not mask[:5, 5:].any()  # block diagonal: pairs 0 and 2 apart


def test_pack_rows_gives_an_overlong_pair_its_own_row():
    assert pack_rows([3, 20, 4, 5], 10) == [[1], [3, 2], [0]]


def test_tiles_follow_the_image_runs_of_the_rows():
    """Packing reorders pairs; pixel_values must follow the rows so features meet their tokens."""
    tiles = [torch.full((n, 3, 2, 2), float(i)) for i, n in enumerate((1, 2, 3))]
    pairs = [_pair([1] * length, [2], [3], t) for length, t in zip((2, 6, 1), tiles)]
    batch = collate_packed(pairs, pad_id=0, pack_length=10)  # lengths 4, 8, 3 -> rows [1], [0, 2]
    assert batch.pixel_values[:, 0, 0, 0].tolist() == [1, 1, 0, 2, 2, 2]
    assert batch.pair_tile_counts == [1, 2, 3]


def test_build_collator_reads_the_recipe():
    data = DataConfig(max_length=8)
    packed = build_collator(ForwardConfig(layout="packed", attention="sdpa"), data, pad_id=0)(DOC_PAIRS)
    assert packed.layout == "packed" and packed.input_ids.shape == (2, 8) and packed.attention == "sdpa"
    packed = build_collator(ForwardConfig(layout="packed", pack_length=12), data, pad_id=0)(DOC_PAIRS)
    assert packed.input_ids.shape == (1, 12)
    shared = build_collator(ForwardConfig(layout="shared_prefix"), data, pad_id=0)(DOC_PAIRS)
    assert shared.layout == "shared_prefix" and shared.input_ids.shape == (3, 5)
