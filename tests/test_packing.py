"""Shared-prefix and packed layouts: exact tensors, log-probs equal to separate forwards, no
cross-pair attention, one vision pass per pair, and training identical to the plain layout."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from torch.testing import assert_close
from transformers import AutoModelForImageTextToText, AutoProcessor

from mpo.data.layouts import build_collator, collate_plain
from mpo.config import DataConfig, ForwardConfig, recipe_from_dict
from mpo.data.dataset import PreferenceDataset
from mpo.data.records import load_records
from mpo.model.forward import PreferenceForward, attention_kernel
from mpo.data.layouts import collate_packed, collate_shared_prefix, pack_rows
from mpo.model.pair_attention import flex_block_mask, may_attend, pair_blocks, pair_sdpa_attention
from mpo.model.reference import FrozenModelReference
from mpo.types import EncodedPair

# Records of examples/tiny_mmpr in meta.json order: shapes 0-9, multi 10-15, text 16-20, video 21-23.
KINDS = {"single_image": 0, "multi_image": 10, "text_only": 16, "video": 21}


def _pair(prompt, chosen, rejected, tiles=None) -> EncodedPair:
    return EncodedPair(prompt, chosen, rejected, tiles)


DOC_PAIRS = [_pair([5, 6], [8], [3, 3]), _pair([7], [9, 9], [4]), _pair([2], [6], [7])]


def dense_mask(batch) -> torch.Tensor:
    """``[R, 1, T, T]`` "may attend" from the layout's rule, as a plain SDPA mask would be."""
    pairs, parts = batch.pair_ids, batch.part_ids
    positions = torch.arange(pairs.shape[-1])
    rule = may_attend(pairs[:, :, None], parts[:, :, None], pairs[:, None, :], parts[:, None, :], positions[:, None], positions)
    return rule[:, None]


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    return AutoProcessor.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def pairs(tiny_mmpr_dir, processor) -> list[EncodedPair]:
    config = DataConfig(meta_path=str(tiny_mmpr_dir / "meta.json"), video_frames=4)
    dataset = PreferenceDataset(load_records(config, seed=0), processor, config)
    return [dataset[index] for index in KINDS.values()]


def test_shared_prefix_docstring_example_exact_tensors():
    """mpo/packing.py's first example, tensor for tensor."""
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


def test_packed_docstring_example_exact_tensors():
    """mpo/packing.py's second example: lengths 5, 4, 3 into rows of 8 -> rows [0, 2] and [1]."""
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


def test_auto_attention_is_sdpa_on_cpu_and_flex_on_cuda():
    assert attention_kernel("auto", torch.device("cpu")) == "sdpa"
    assert attention_kernel("auto", torch.device("cuda")) == "flex"
    assert attention_kernel("sdpa", torch.device("cuda")) == "sdpa"


def test_both_kernels_compute_the_attention_of_the_rule():
    """The FlexAttention block mask (GPU kernel) and the per-pair SDPA calls (CPU kernel) give the
    attention of a dense mask built from :func:`may_attend`, on a packed batch with grouped-query
    heads and blocks that cross FlexAttention's 128-token tiles (eager flex_attention on CPU)."""
    from torch.nn.attention.flex_attention import flex_attention

    lengths = [(40, 9, 13), (150, 20, 7), (3, 1, 1), (70, 30, 30)]
    pairs = [_pair(list(range(1, p + 1)), [1] * c, [2] * r) for p, c, r in lengths]
    batch = collate_packed(pairs, pad_id=0, pack_length=260)
    rows, length = batch.input_ids.shape
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(rows, 4, length, 8, generator=generator)
    key, value = (torch.randn(rows, 2, length, 8, generator=generator) for _ in range(2))
    repeat = dict(repeats=2, dim=1)
    expected = torch.nn.functional.scaled_dot_product_attention(
        query, key.repeat_interleave(**repeat), value.repeat_interleave(**repeat), attn_mask=dense_mask(batch)
    ).transpose(1, 2)
    flex = flex_attention(query, key, value, block_mask=flex_block_mask(batch.pair_ids, batch.part_ids), enable_gqa=True)
    per_pair, _ = pair_sdpa_attention(None, query, key, value, None, pair_blocks=pair_blocks(batch.pair_ids, batch.part_ids))
    real = batch.pair_ids >= 0
    assert_close(flex.transpose(1, 2)[real], expected[real], atol=1e-5, rtol=1e-5)
    assert_close(per_pair[real], expected[real], atol=1e-5, rtol=1e-5)
    assert not per_pair[~real].any()  # padding gets zeros


def _token_logps(forward: PreferenceForward, batch) -> torch.Tensor:
    """Per-token log-probs in scoring-index order: the LM head's output (called with the targets),
    read with a hook."""
    captured = []
    handle = forward.model.lm_head.register_forward_hook(lambda module, args, output: captured.append(output))
    try:
        with torch.no_grad():
            forward(batch)
    finally:
        handle.remove()
    return captured[0]


def _separate_token_logps(model, pairs: list[EncodedPair]) -> torch.Tensor:
    """The peers' reference: one plain HF call per sequence, chosen responses first."""
    out = []
    for responses in ([p.chosen_ids for p in pairs], [p.rejected_ids for p in pairs]):
        for pair, response in zip(pairs, responses):
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([pair.prompt_ids + response]), pixel_values=pair.pixel_values).logits[0]
            logps = logits.float().log_softmax(-1)[len(pair.prompt_ids) - 1 : -1]
            out.append(logps.gather(-1, torch.tensor(response)[:, None]).squeeze(-1))
    return torch.cat(out)


@pytest.mark.parametrize("layout", ["shared_prefix", "packed_one_row", "packed_tight"])
def test_token_logps_equal_separate_forwards(model, pairs, processor, layout):
    """Single-image, multi-image, text-only and video pairs in one micro-batch: every response
    token's log-prob equals that of a separate forward within 1e-5 (float32)."""
    pad = processor.tokenizer.pad_token_id
    if layout == "shared_prefix":
        batch = collate_shared_prefix(pairs, pad)
    else:
        longest = max(len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
        batch = collate_packed(pairs, pad, pack_length=10**6 if layout == "packed_one_row" else longest + 40)
        assert (batch.input_ids.shape[0] == 1) == (layout == "packed_one_row")
    got = _token_logps(PreferenceForward(model), batch)
    expected = _separate_token_logps(model, pairs)
    for segment, kind in enumerate(list(KINDS) * 2):
        where = batch.segment_ids == segment
        assert_close(got[where], expected[where], atol=1e-5, rtol=0, msg=lambda m: f"{layout} {kind}: {m}")


def test_packed_pairs_never_see_each_other(model, pairs, processor):
    """Perturbing pair A (its prompt text, its responses, its image) leaves every other pair of the
    same packed row bit-identical."""
    pad = processor.tokenizer.pad_token_id
    forward = PreferenceForward(model)
    a = pairs[0]
    changed = dataclasses.replace(
        a,
        prompt_ids=[t if t == model.config.image_token_id or i < 3 else (t * 7 + 1) % 200 + 10 for i, t in enumerate(a.prompt_ids)],
        chosen_ids=[(t + 5) % 200 + 10 for t in a.chosen_ids],
        rejected_ids=[(t + 9) % 200 + 10 for t in a.rejected_ids],
        pixel_values=a.pixel_values.flip(-1) + 0.5,
    )
    with torch.no_grad():
        before = forward(collate_packed(pairs, pad, pack_length=10**6)).logps
        after = forward(collate_packed([changed] + pairs[1:], pad, pack_length=10**6)).logps
    assert not torch.equal(before.chosen_logps[0], after.chosen_logps[0])
    assert torch.equal(before.chosen_logps[1:], after.chosen_logps[1:])
    assert torch.equal(before.rejected_logps[1:], after.rejected_logps[1:])


@pytest.mark.parametrize("layout", ["shared_prefix", "packed"])
def test_vision_runs_once_per_pair_and_the_reference_reuses_it(tiny_model_dir, pairs, processor, layout):
    """Forward hooks count the tiles each vision tower encodes in one step: the policy encodes each
    pair's tiles once; a reference with a frozen vision tower encodes none (it takes the policy's
    features), one without reuse encodes each pair's tiles once more."""
    image_pairs = [p for p in pairs if p.pixel_values is not None]
    tiles = sum(p.num_tiles for p in image_pairs)
    collate = build_collator(ForwardConfig(layout=layout), DataConfig(), processor.tokenizer.pad_token_id)
    batch = collate(image_pairs)
    policy_model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=torch.float32)
    reference_model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    seen = {"policy": [], "reference": []}
    for name, hf in (("policy", policy_model), ("reference", reference_model)):
        hf.model.vision_tower.register_forward_hook(
            lambda module, args, kwargs, output, name=name: seen[name].append(kwargs["pixel_values"].shape[0]), with_kwargs=True
        )
    policy = PreferenceForward(policy_model)
    out = policy(batch)
    assert seen["policy"] == [tiles]
    reused = FrozenModelReference(PreferenceForward(reference_model), reuse_policy_features=True)(batch, out.image_features)
    assert seen["reference"] == []
    own = FrozenModelReference(PreferenceForward(reference_model), reuse_policy_features=False)(batch, out.image_features)
    assert seen["reference"] == [tiles]
    assert_close(reused.chosen_logps, own.chosen_logps)
    out.logps.chosen_logps.sum().backward()  # one graph, one backward through the shared features
    assert policy_model.model.vision_tower.embeddings.patch_embeddings.projection.weight.grad is not None


def _train(tiny_model_dir: Path, tiny_mmpr_dir: Path, out: Path, layout: str) -> list[dict]:
    from mpo.train.trainer import MPOTrainer

    recipe = {
        "model": {"name_or_path": str(tiny_model_dir), "dtype": "float32"},
        "data": {"meta_path": str(tiny_mmpr_dir / "meta.json"), "max_dynamic_patch": 4, "video_frames": 4},
        "forward": {"layout": layout},
        "train": {"lr": 2e-3, "warmup_ratio": 0.0, "lr_scheduler": "constant", "micro_batch_size": 4,
                  "gradient_accumulation_steps": 1, "max_steps": 2, "mixed_precision": "no"},
        "output_dir": str(out),
        "seed": 3,
    }
    try:
        MPOTrainer(recipe_from_dict(recipe)).train()
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_two_training_steps_log_the_same_losses_as_plain(tiny_model_dir, tiny_mmpr_dir, tmp_path):
    """Same pairs, same weights: the shared-prefix layout trains exactly like the plain one through
    the real trainer (step 2 checks the gradients and the optimizer step too). The packed layout
    runs the same code per pair block; its log-probs are checked token by token above."""
    plain = _train(tiny_model_dir, tiny_mmpr_dir, tmp_path / "plain", "plain")
    shared = _train(tiny_model_dir, tiny_mmpr_dir, tmp_path / "shared", "shared_prefix")
    for key in ("loss", "loss/dpo", "loss/bco", "loss/sft", "rewards/margins", "logps/chosen", "logps/rejected", "grad_norm"):
        assert [r[key] for r in shared] == pytest.approx([r[key] for r in plain], rel=1e-4, abs=1e-5), key
    assert shared[1]["rewards/margins"] != 0.0  # the second step trained a moved policy


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention trains on CUDA only")
def test_flex_path_matches_sdpa_on_cuda(tiny_model_dir, pairs, processor):
    """GPU only: the FlexAttention path gives the SDPA path's log-probs and gradients flow."""
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=torch.float32).cuda()
    forward = PreferenceForward(model)
    batch = collate_packed(pairs, processor.tokenizer.pad_token_id, pack_length=10**6)
    flex = forward(dataclasses.replace(batch, attention="flex").to("cuda")).logps
    assert model.config.text_config._attn_implementation == "flex_attention"
    (flex.chosen_logps.sum() + flex.rejected_logps.sum()).backward()
    with torch.no_grad():
        sdpa = forward(dataclasses.replace(batch, attention="sdpa").to("cuda")).logps
    assert_close(flex.chosen_logps.detach(), sdpa.chosen_logps, atol=1e-3, rtol=1e-5)
    assert_close(flex.rejected_logps.detach(), sdpa.rejected_logps, atol=1e-3, rtol=1e-5)
