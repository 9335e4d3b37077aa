"""Encoding: tiles and image tokens, video frames and over-long pairs."""

from __future__ import annotations

import pytest

from mpo.config import DataConfig
from mpo.data.dataset import PreferenceDataset
from mpo.data.records import load_records
from mpo.errors import DataError

TOKENS_PER_TILE = 16  # the tiny model: 64-px tiles, 8-px patches, pixel shuffle 0.5


@pytest.fixture(scope="module")
def tiny_records(tiny_mmpr_dir):
    return load_records(DataConfig(meta_path=str(tiny_mmpr_dir / "meta.json")), seed=0)


def _count(ids: list[int], tiny_processor, token: str) -> int:
    return ids.count(tiny_processor.tokenizer.convert_tokens_to_ids(token))


def test_tiles_and_image_tokens(tiny_records, tiny_processor):
    """96x64 image with 4 tiles allowed: a 2x1 grid plus a thumbnail = 3 tiles; two 64x64 images:
    1 tile each (no thumbnail for a single tile); text-only: none. Every tile is 16 image tokens,
    and each image sits in one <img>...</img> run."""
    dataset = PreferenceDataset(tiny_records, tiny_processor, DataConfig())
    single, multi, text = dataset[0], dataset[10], dataset[16]
    assert tuple(single.pixel_values.shape) == (3, 3, 64, 64)
    assert tuple(multi.pixel_values.shape) == (2, 3, 64, 64)
    assert text.pixel_values is None and text.num_tiles == 0
    for pair, tiles, images in ((single, 3, 1), (multi, 2, 2), (text, 0, 0)):
        assert _count(pair.prompt_ids, tiny_processor, "<IMG_CONTEXT>") == tiles * TOKENS_PER_TILE
        assert _count(pair.prompt_ids, tiny_processor, "<img>") == images
    end_of_turn = tiny_processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert single.chosen_ids[-1] == end_of_turn and single.rejected_ids[-1] == end_of_turn
    assert tiny_processor.tokenizer.decode(single.chosen_ids[:-1]) == tiny_records[0].chosen
    assert tiny_processor.tokenizer.decode(single.prompt_ids).endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("frames", [4, 8])
def test_video_record_has_video_frames_tiles(tiny_records, tiny_processor, frames):
    """A clip of 8 frame PNGs sampled to ``video_frames`` frames, one tile each, each announced
    as ``FrameK: <img>...</img>`` in the prompt."""
    dataset = PreferenceDataset(tiny_records, tiny_processor, DataConfig(video_frames=frames))
    pair = dataset[21]
    assert tuple(pair.pixel_values.shape) == (frames, 3, 64, 64)
    assert _count(pair.prompt_ids, tiny_processor, "<IMG_CONTEXT>") == frames * TOKENS_PER_TILE
    prompt = tiny_processor.tokenizer.decode(pair.prompt_ids)
    assert f"Frame{frames}: <img>" in prompt and f"Frame{frames + 1}:" not in prompt


@pytest.fixture(scope="module")
def full_pair(tiny_records, tiny_processor):
    """The first shapes pair with no length limit."""
    return PreferenceDataset(tiny_records, tiny_processor, DataConfig(max_length=100_000))[0]


def test_overlong_truncate_cuts_responses_only(tiny_records, tiny_processor, full_pair):
    """max_length = prompt + 5: the prompt (all 3 * 16 image tokens included) is kept whole and
    both responses keep their first 5 tokens."""
    prompt_length = len(full_pair.prompt_ids)
    assert min(len(full_pair.chosen_ids), len(full_pair.rejected_ids)) > 5
    config = DataConfig(max_length=prompt_length + 5, overlong="truncate")
    pair = PreferenceDataset(tiny_records, tiny_processor, config)[0]
    assert pair.prompt_ids == full_pair.prompt_ids
    assert _count(pair.prompt_ids, tiny_processor, "<IMG_CONTEXT>") == 3 * TOKENS_PER_TILE
    assert pair.chosen_ids == full_pair.chosen_ids[:5]
    assert pair.rejected_ids == full_pair.rejected_ids[:5]
    assert pair.pixel_values.shape == full_pair.pixel_values.shape


def test_overlong_truncate_leaves_a_fitting_response_alone(tiny_records, tiny_processor, full_pair):
    """Budget = the shorter response's length: it stays whole, the longer one is cut to it."""
    chosen, rejected = full_pair.chosen_ids, full_pair.rejected_ids
    assert len(rejected) < len(chosen)  # 29 and 32 tokens
    config = DataConfig(max_length=len(full_pair.prompt_ids) + len(rejected))
    pair = PreferenceDataset(tiny_records, tiny_processor, config)[0]
    assert pair.rejected_ids == rejected
    assert pair.chosen_ids == chosen[: len(rejected)]


def test_overlong_drop_returns_an_error(tiny_records, tiny_processor, full_pair):
    longest = len(full_pair.prompt_ids) + max(len(full_pair.chosen_ids), len(full_pair.rejected_ids))
    source = tiny_records[0].source.rsplit(":", 1)[0]
    error = PreferenceDataset(tiny_records, tiny_processor, DataConfig(max_length=longest - 1, overlong="drop"))[0]
    assert isinstance(error, DataError)
    assert str(error) == f"{source}:1: chosen/rejected: pair is {longest} tokens > max_length {longest - 1}"
    fits = PreferenceDataset(tiny_records, tiny_processor, DataConfig(max_length=longest, overlong="drop"))[0]
    assert fits.chosen_ids == full_pair.chosen_ids and fits.rejected_ids == full_pair.rejected_ids


@pytest.mark.parametrize("overlong", ["truncate", "drop"])
def test_prompt_longer_than_max_length_is_never_cut(tiny_records, tiny_processor, full_pair, overlong):
    """A prompt that alone fills max_length is dropped in both modes: image tokens are never cut."""
    prompt_length = len(full_pair.prompt_ids)
    config = DataConfig(max_length=prompt_length, overlong=overlong)
    error = PreferenceDataset(tiny_records, tiny_processor, config)[0]
    assert isinstance(error, DataError) and error.field == "question" and error.line == 1
    assert f"prompt alone is {prompt_length} tokens > max_length {prompt_length}" in str(error)


