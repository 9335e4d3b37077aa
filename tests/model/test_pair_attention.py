"""The shared-prefix and packed attention: both kernels compute the layout's rule, log-probs equal
separate forwards, no cross-pair attention, one vision pass per pair, and training identical to the
plain layout (the layouts' tensors themselves: ``tests/data/test_layouts.py``)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close
from transformers import AutoModelForImageTextToText

from mpo.config import DataConfig, ForwardConfig
from mpo.data.layouts import build_collator, collate_packed, collate_shared_prefix
from mpo.model.forward import PreferenceForward, attention_kernel
from mpo.model.pair_attention import flex_block_mask, pair_blocks, pair_sdpa_attention
from mpo.model.reference import FrozenModelReference
from mpo.types import EncodedPair


@pytest.fixture(scope="module")
def pairs(tiny_pairs) -> list[EncodedPair]:
    """A single-image, a two-image, a text-only and a video pair of the example data."""
    return list(tiny_pairs.values())


def test_auto_attention_is_sdpa_on_cpu_and_flex_on_cuda():
    assert attention_kernel("auto", torch.device("cpu")) == "sdpa"
    assert attention_kernel("auto", torch.device("cuda")) == "flex"
    assert attention_kernel("sdpa", torch.device("cuda")) == "sdpa"


def test_both_kernels_compute_the_attention_of_the_rule(dense_mask):
    """The FlexAttention block mask (GPU kernel) and the per-pair SDPA calls (CPU kernel) give the
    attention of a dense mask built from :func:`may_attend`, on a packed batch with grouped-query
    heads and blocks that cross FlexAttention's 128-token tiles (eager flex_attention on CPU)."""
    from torch.nn.attention.flex_attention import flex_attention

    lengths = [(40, 9, 13), (150, 20, 7), (3, 1, 1), (70, 30, 30)]
    pairs = [EncodedPair(list(range(1, p + 1)), [1] * c, [2] * r, None) for p, c, r in lengths]
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
def test_token_logps_equal_separate_forwards(tiny_hf_model, tiny_pairs, pairs, tiny_processor, layout):
    """Single-image, multi-image, text-only and video pairs in one micro-batch: every response
    token's log-prob equals that of a separate forward within 1e-5 (float32)."""
    pad = tiny_processor.tokenizer.pad_token_id
    if layout == "shared_prefix":
        batch = collate_shared_prefix(pairs, pad)
    else:
        longest = max(len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
        batch = collate_packed(pairs, pad, pack_length=10**6 if layout == "packed_one_row" else longest + 40)
        assert (batch.input_ids.shape[0] == 1) == (layout == "packed_one_row")
    got = _token_logps(PreferenceForward(tiny_hf_model), batch)
    expected = _separate_token_logps(tiny_hf_model, pairs)
    for segment, kind in enumerate(list(tiny_pairs) * 2):
        where = batch.segment_ids == segment
        assert_close(got[where], expected[where], atol=1e-5, rtol=0, msg=lambda m: f"{layout} {kind}: {m}")


def test_packed_pairs_never_see_each_other(tiny_hf_model, pairs, tiny_processor):
    """Perturbing pair A (its prompt text, its responses, its image) leaves every other pair of the
    same packed row bit-identical."""
    pad = tiny_processor.tokenizer.pad_token_id
    forward = PreferenceForward(tiny_hf_model)
    a = pairs[0]
    changed = dataclasses.replace(
        a,
        prompt_ids=[t if t == tiny_hf_model.config.image_token_id or i < 3 else (t * 7 + 1) % 200 + 10 for i, t in enumerate(a.prompt_ids)],
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
def test_vision_runs_once_per_pair_and_the_reference_reuses_it(tiny_model_dir, pairs, tiny_processor, layout):
    """Forward hooks count the tiles each vision tower encodes in one step: the policy encodes each
    pair's tiles once; a reference with a frozen vision tower encodes none (it takes the policy's
    features), one without reuse encodes each pair's tiles once more."""
    image_pairs = [p for p in pairs if p.pixel_values is not None]
    tiles = sum(p.num_tiles for p in image_pairs)
    collate = build_collator(ForwardConfig(layout=layout), DataConfig(), tiny_processor.tokenizer.pad_token_id)
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


def _train(run_trainer, tiny_model_dir: Path, tiny_mmpr_dir: Path, out: Path, layout: str) -> list[dict]:
    recipe = {
        "model": {"name_or_path": str(tiny_model_dir), "dtype": "float32"},
        "data": {"meta_path": str(tiny_mmpr_dir / "meta.json"), "max_dynamic_patch": 4, "video_frames": 4},
        "forward": {"layout": layout},
        "train": {"lr": 2e-3, "warmup_ratio": 0.0, "lr_scheduler": "constant", "micro_batch_size": 4,
                  "gradient_accumulation_steps": 1, "max_steps": 2, "mixed_precision": "no"},
        "output_dir": str(out),
        "seed": 3,
    }
    return run_trainer(recipe)


def test_two_training_steps_log_the_same_losses_as_plain(tiny_model_dir, tiny_mmpr_dir, tmp_path, run_trainer):
    """Same pairs, same weights: the shared-prefix layout trains exactly like the plain one through
    the real trainer (step 2 checks the gradients and the optimizer step too). The packed layout
    runs the same code per pair block; its log-probs are checked token by token above."""
    plain = _train(run_trainer, tiny_model_dir, tiny_mmpr_dir, tmp_path / "plain", "plain")
    shared = _train(run_trainer, tiny_model_dir, tiny_mmpr_dir, tmp_path / "shared", "shared_prefix")
    for key in ("loss", "loss/dpo", "loss/bco", "loss/sft", "rewards/margins", "logps/chosen", "logps/rejected", "grad_norm"):
        assert [r[key] for r in shared] == pytest.approx([r[key] for r in plain], rel=1e-4, abs=1e-5), key
    assert shared[1]["rewards/margins"] != 0.0  # the second step trained a moved policy


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention trains on CUDA only")
def test_flex_path_matches_sdpa_on_cuda(tiny_model_dir, pairs, tiny_processor):
    """GPU only: the FlexAttention path gives the SDPA path's log-probs and gradients flow."""
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=torch.float32).cuda()
    forward = PreferenceForward(model)
    batch = collate_packed(pairs, tiny_processor.tokenizer.pad_token_id, pack_length=10**6)
    flex = forward(dataclasses.replace(batch, attention="flex").to("cuda")).logps
    assert model.config.text_config._attn_implementation == "flex_attention"
    (flex.chosen_logps.sum() + flex.rejected_logps.sum()).backward()
    with torch.no_grad():
        sdpa = forward(dataclasses.replace(batch, attention="sdpa").to("cuda")).logps
    assert_close(flex.chosen_logps.detach(), sdpa.chosen_logps, atol=1e-3, rtol=1e-5)
    assert_close(flex.rejected_logps.detach(), sdpa.rejected_logps, atol=1e-3, rtol=1e-5)
