"""``data.max_length`` never cuts image tokens: a pair whose prompt (every image's and video
frame's tokens included) does not fit is skipped and counted, in both ``overlong`` modes; one
whose prompt fits keeps every image token and has only its responses cut (``truncate``).

Checked for each kind of the example data (one image, two images, a video of 4 frames) through
the dataset, and through a training run whose ``max_length`` lies between the text-only prompts
and the image prompts.
"""

from __future__ import annotations

import json

import pytest

from mpo.config import DataConfig
from mpo.data.dataset import PreferenceDataset
from mpo.data.records import load_records
from mpo.errors import OverlongPair

TOKENS_PER_TILE = 16
FIRST = {"single_image": 0, "multi_image": 10, "video": 21}  # the first record of each kind (conftest's TINY_KINDS)
# Image tokens of each kind's prompt: 96x64 at 6 tiles (2x1 grid + thumbnail), two 64x64 images
# (1 tile each), 4 video frames (1 tile each).
IMAGE_TOKENS = {"single_image": 3 * TOKENS_PER_TILE, "multi_image": 2 * TOKENS_PER_TILE, "video": 4 * TOKENS_PER_TILE}


@pytest.fixture(scope="module")
def records(tiny_mmpr_dir):
    return load_records(DataConfig(meta_path=str(tiny_mmpr_dir / "meta.json")), seed=0)


def encode(records, processor, kind: str, **config):
    return PreferenceDataset(records, processor, DataConfig(video_frames=4, **config))[FIRST[kind]]


@pytest.mark.parametrize("kind", sorted(IMAGE_TOKENS))
def test_image_tokens_are_never_cut(records, tiny_processor, kind):
    full = encode(records, tiny_processor, kind, max_length=100_000)
    prompt = len(full.prompt_ids)
    assert full.prompt_ids.count(tiny_processor.image_token_id) == IMAGE_TOKENS[kind]
    for overlong in ("truncate", "drop"):
        # One token short of the prompt: skipped, whatever the mode, with the image tokens named.
        short = encode(records, tiny_processor, kind, max_length=prompt - 1, overlong=overlong)
        assert isinstance(short, OverlongPair)
        assert short.reason == (f"prompt alone is {prompt} tokens > max_length {prompt - 1} "
                                f"({IMAGE_TOKENS[kind]} of them image tokens, which are never cut)")
    # Room for two response tokens: the whole prompt is kept, the responses are cut to two.
    cut = encode(records, tiny_processor, kind, max_length=prompt + 2, overlong="truncate")
    assert cut.prompt_ids == full.prompt_ids and cut.truncated
    assert cut.chosen_ids == full.chosen_ids[:2] and cut.rejected_ids == full.rejected_ids[:2]
    assert cut.num_tiles == full.num_tiles


def test_a_run_skips_the_pairs_whose_images_do_not_fit(tiny_model_dir, tiny_mmpr_dir, tmp_path, make_recipe, train_in_process):
    """max_length 90 fits every text-only prompt (48-50 tokens; their responses are cut) but no
    image or video prompt (126-177): each image pair met is skipped, listed in skipped.jsonl with
    its image tokens named, and replaced by the next text pair; none is trained cut."""
    out = tmp_path / "run"
    recipe = make_recipe(tiny_model_dir, tiny_mmpr_dir, out, max_steps=2, micro_batch_size=2, gradient_accumulation_steps=2)
    recipe["data"].update(max_length=90, overlong="truncate")
    trainer = train_in_process(recipe)
    skipped = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert len(skipped) == trainer.skip_log.count >= 4
    for entry in skipped:
        assert entry["field"] == "question"
        assert entry["error"].startswith("prompt alone is ") and entry["error"].endswith("image tokens, which are never cut)")
    assert trainer.fetch.truncated_count > 0  # the text pairs trained, their responses cut to fit
