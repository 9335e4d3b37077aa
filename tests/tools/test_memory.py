"""``mpo memory``: parameter counts from the config alone, the per-GPU bytes of each ZeRO stage
derived by hand (ZeRO paper, Rajbhandari et al. 2020, Sec. 5: weights 2, gradients 2, Adam 12
bytes per parameter in mixed precision; stage k partitions the first k of optimizer state,
gradients, weights), and activations checked against what autograd really keeps."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoProcessor

from mpo.tools.memory.activations import MicroBatchShape, estimate_activations
from mpo.config import load_recipe, recipe_from_dict
from mpo.tools.memory.planner import count_parameters, estimate, main

REPO = Path(__file__).resolve().parents[2]
RECIPE_8B = REPO / "recipes" / "internvl3_8b_lora.yaml"
CONFIG_8B = REPO / "examples" / "model_configs" / "InternVL3-8B-hf"
CONFIG_1B = REPO / "examples" / "model_configs" / "InternVL3-1B-hf"
TINY = REPO / "recipes" / "tiny_cpu.yaml"


def test_counts_match_the_real_tiny_model(tiny_model_dir):
    from transformers import AutoModelForImageTextToText

    from mpo.model.loading import count_parameters as count_loaded
    from mpo.model.loading import load_policy

    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    counts = count_parameters(load_recipe(TINY, [f"model.name_or_path={tiny_model_dir}"]))
    assert counts.total == counts.trainable == counts.reference == sum(p.numel() for p in model.parameters())
    assert counts.vision == sum(p.numel() for p in model.model.vision_tower.parameters())
    assert counts.vision + counts.projector + counts.language == counts.total  # tied LM head counted once
    assert counts.adapters == 0

    lora = load_recipe(TINY, [f"model.name_or_path={tiny_model_dir}", "model.lora.enabled=true", "model.freeze_vision=true"])
    counts = count_parameters(lora)
    assert (counts.trainable, counts.total) == count_loaded(load_policy(lora.model))
    assert counts.adapters == counts.trainable and counts.reference == 0  # the policy with adapters disabled


def test_internvl3_8b_full_fine_tuning_by_hand():
    """InternVL3-8B: P = 7,944,373,760 parameters (InternViT-300M + projector + Qwen2.5-7B with an
    untied 151,674 x 3,584 LM head, the largest module: L = 543,599,616). bf16 weights, bf16
    mixed precision, 8 GPUs, activations left out here:

    * DDP: 2P weights + 2P grads + 2P DDP buckets + 12P (fp32 master + 2 fp32 moments) + 2P
      reference = 20P; at the step the bf16 gradients become fp32: +2P
    * ZeRO-1: 2P + 2P + 12P/8 + 2P;  ZeRO-2: 2P + 2P/8 + 12P/8 + 2P; each + 4P/8 fp32 gradients at the step
    * ZeRO-3: (2 + 2 + 12 + 2)P/8 + 2L (the largest module, gathered whole) + 4P/8 = 21.36 GiB
    """
    recipe = load_recipe(RECIPE_8B, [f"model.name_or_path={CONFIG_8B}", "model.lora.enabled=false", "model.freeze_vision=false"])
    counts = count_parameters(recipe)
    P, L = 7_944_373_760, 543_599_616
    assert (counts.total, counts.trainable, counts.reference, counts.largest_module) == (P, P, P, L)
    assert counts.vision == 304_012_288 and counts.projector == 27_540_480
    ddp, zero1, zero2, zero3, offload = estimate(counts, "bfloat16", "bf16", world_size=8)
    assert (ddp.params, ddp.grads, ddp.optimizer, ddp.reference, ddp.step) == (2 * P, 4 * P, 12 * P, 2 * P, 2 * P)
    assert ddp.total == 22 * P
    assert zero1.total == pytest.approx(2 * P + 2 * P + 12 * P / 8 + 2 * P + 4 * P / 8)
    assert zero2.total == pytest.approx(2 * P + 2 * P / 8 + 12 * P / 8 + 2 * P + 4 * P / 8)
    assert zero3.total == pytest.approx(18 * P / 8 + 2 * L + 4 * P / 8)
    assert zero3.total / 2**30 == pytest.approx(21.36, abs=0.01)
    assert offload.total == 2 * L and offload.cpu == pytest.approx(18 * P / 8)


def test_lora_recipe_holds_no_reference_copy_and_fp32_adapters():
    """r=16 on q, k, v, o, gate, up, down of 28 layers: r * (in + out) per adapted linear = A
    adapter parameters. Outside DeepSpeed peft keeps them in fp32 (4 bytes, 4-byte gradients
    twice with DDP's buckets, 8 bytes of moments, no master); DeepSpeed casts them to bf16 with a
    12-byte master + moments."""
    counts = count_parameters(load_recipe(RECIPE_8B, [f"model.name_or_path={CONFIG_8B}"]))
    assert counts.reference == 0
    per_layer = 16 * ((3584 + 3584) * 2 + (3584 + 512) * 2 + (3584 + 18944) * 2 + (18944 + 3584))
    A, P = 28 * per_layer, counts.total
    assert counts.trainable == counts.adapters == A
    ddp, zero1, *_ = estimate(counts, "bfloat16", "bf16", world_size=8)
    assert (ddp.params, ddp.grads, ddp.optimizer, ddp.step) == (2 * (P - A) + 4 * A, 8 * A, 8 * A, 0)
    assert (zero1.params, zero1.grads, zero1.optimizer) == (2 * P, 2 * A, 12 * A / 8)


def _tiny_recipe(model_dir, data_dir, **model):
    return recipe_from_dict({
        "model": {"name_or_path": str(model_dir), "dtype": "bfloat16", **model},
        "data": {"meta_path": str(data_dir / "meta.json"), "max_dynamic_patch": 4, "video_frames": 4},
        "train": {"mixed_precision": "bf16", "max_steps": 1},
    })  # fmt: skip


@pytest.mark.parametrize(
    "model",
    [
        {},
        {"freeze_vision": True},
        {"freeze_language": True},
        {"freeze_vision": True, "lora": {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0}},
        {"freeze_vision": True, "lora": {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.05, "vision": True}},
    ],
    ids=["full", "frozen-vision", "frozen-language", "lora", "lora-vision-dropout"],
)
@pytest.mark.parametrize("layout", ["plain", "shared_prefix"])
def test_activation_estimate_is_what_autograd_keeps(tiny_model_dir, tiny_mmpr_dir, model, layout):
    """One image pair through the policy in bf16 (autocast, as the recipes train): the bytes of
    every tensor saved for backward (parameters aside, each storage once) equal the estimate
    within 5 %, whatever is frozen or adapted and whatever the layout (CPU kernels)."""
    from mpo.data.layouts import build_collator
    from mpo.data.dataset import PreferenceDataset
    from mpo.data.records import load_records
    from mpo.model.forward import PreferenceForward
    from mpo.model.loading import load_policy

    recipe = _tiny_recipe(tiny_model_dir, tiny_mmpr_dir, **model)
    recipe.forward.layout = layout
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    pair = PreferenceDataset(load_records(recipe.data, seed=0), processor, recipe.data)[0]
    policy = PreferenceForward(load_policy(recipe.model)).train()
    parameters = {p.untyped_storage().data_ptr() for p in policy.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    batch = build_collator(recipe.forward, recipe.data, processor.tokenizer.pad_token_id)([pair])
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), torch.autocast("cpu", dtype=torch.bfloat16):
        policy(batch)
    shape = MicroBatchShape(1, pair.num_tiles, len(pair.prompt_ids), len(pair.chosen_ids), len(pair.rejected_ids))
    estimated = estimate_activations(recipe, AutoConfig.from_pretrained(tiny_model_dir), shape, "cpu")
    assert estimated.kept == pytest.approx(sum(saved.values()), rel=0.05)


def test_internvl3_1b_activations_by_hand():
    """InternVL3-1B, full fine-tuning in bf16, one pair of 5 tiles, prompt 1,344 tokens (5 x 256
    image tokens + 64), responses of 256 tokens, plain layout (2 rows of T = 1,600):

    * vision, per tile: 24 layers x 1,025 tokens x ((10 x 1024 + 2 x 4096) x 2 + 2 x 8 + 4 x 16)
      bytes + the pixels (3 x 448^2 x 2) = 0.85 GiB;
    * language, per token and layer: 24h + 8m + 4 x heads + 8 = 60,480 bytes (h 896, m 4,864, 14
      heads), i.e. 1.38 MiB per token over 24 layers, + the padding mask, 2 x T^2 x 2 bytes per
      layer; the final norm 6h + 4 and the token id (8) per token;
    * LM head: the 512 scored hidden states (2h), their target ids (8) and log-sum-exps (4); its
      backward one fp32 block of 512 x 16,384 recomputed logits and two fp32 copies of the states.
    """
    recipe = load_recipe(REPO / "recipes" / "internvl3_1b_mpo.yaml", [f"model.name_or_path={CONFIG_1B}", "forward.layout=plain"])
    shape = MicroBatchShape(pairs=1, tiles=5, prompt_tokens=1344, chosen_tokens=256, rejected_tokens=256)
    parts = estimate_activations(recipe, AutoConfig.from_pretrained(CONFIG_1B), shape)
    per_tile = 24 * 1025 * ((10 * 1024 + 2 * 4096) * 2 + 16 + 64) + 3 * 448 * 448 * 2
    assert parts.vision == 5 * per_tile and per_tile / 2**30 == pytest.approx(0.85, abs=0.005)
    tokens = 2 * 1600
    assert parts.language == 24 * (60_480 * tokens + 2 * 1600 * 1600 * 2) + (6 * 896 + 4 + 8) * tokens
    assert parts.head == 512 * (2 * 896 + 12)
    assert parts.transient == 4 * 512 * 16_384 + 8 * 896 * 512


def test_cli_prints_every_stage_and_measures(tiny_model_dir, capsys):
    assert main([str(TINY), "--world-size", "2", f"model.name_or_path={tiny_model_dir}", "--tiles", "3", "--response-tokens", "40", "--measure"]) == 0
    out = capsys.readouterr().out
    for stage in ("DDP (ZeRO-0)", "ZeRO-1", "ZeRO-2", "ZeRO-3", "ZeRO-3 + CPU offload"):
        assert f"\n{stage} " in out
    assert "world size 2" in out and "reference: a frozen copy" in out
    assert "activations of one micro-batch (2 pair(s) of 3 tiles, prompt 112 tokens, responses 40" in out
    assert "\nmeasured on cpu (" in out
