"""``mpo memory``: parameter counts from the config alone, and the per-GPU bytes of each ZeRO stage
derived by hand (ZeRO paper, Rajbhandari et al. 2020, Sec. 5: weights 2, gradients 2, Adam 12
bytes per parameter in mixed precision; stage k partitions the first k of optimizer state,
gradients, weights)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mpo.config import load_recipe
from mpo.memory import count_parameters, estimate, main

REPO = Path(__file__).resolve().parents[1]
RECIPE_8B = REPO / "recipes" / "internvl3_8b_lora.yaml"
CONFIG_8B = REPO / "examples" / "model_configs" / "InternVL3-8B-hf"
TINY = REPO / "recipes" / "tiny_cpu.yaml"


def test_counts_match_the_real_tiny_model(tiny_model_dir):
    from transformers import AutoModelForImageTextToText

    from mpo.modeling import count_parameters as count_loaded
    from mpo.modeling import load_policy

    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    counts = count_parameters(load_recipe(TINY, [f"model.name_or_path={tiny_model_dir}"]))
    assert counts.total == counts.trainable == counts.reference == sum(p.numel() for p in model.parameters())
    assert counts.vision == sum(p.numel() for p in model.model.vision_tower.parameters())
    assert counts.vision + counts.projector + counts.language == counts.total  # tied LM head counted once

    lora = load_recipe(TINY, [f"model.name_or_path={tiny_model_dir}", "model.lora.enabled=true", "model.freeze_vision=true"])
    counts = count_parameters(lora)
    assert (counts.trainable, counts.total) == count_loaded(load_policy(lora.model))
    assert counts.reference == 0  # the policy with adapters disabled


def test_internvl3_8b_full_fine_tuning_by_hand():
    """InternVL3-8B: P = 7,944,373,760 parameters (InternViT-300M + projector + Qwen2.5-7B with an
    untied 151,674 x 3,584 LM head, the largest module: L = 543,599,616). bf16, 8 GPUs:

    * DDP: 2P weights + 2P grads + 4P AdamW (2 bf16 moments) + 2P reference = 10P
    * ZeRO-1: 2P + 2P + 12P/8 + 2P;  ZeRO-2: 2P + 2P/8 + 12P/8 + 2P
    * ZeRO-3: (2 + 2 + 12 + 2)P/8 + 2L (the largest module, gathered whole) = 18.96e9 B = 17.66 GiB
    """
    recipe = load_recipe(RECIPE_8B, [f"model.name_or_path={CONFIG_8B}", "model.lora.enabled=false", "model.freeze_vision=false"])
    counts = count_parameters(recipe)
    P, L = 7_944_373_760, 543_599_616
    assert (counts.total, counts.trainable, counts.reference, counts.largest_module) == (P, P, P, L)
    assert counts.vision == 304_012_288 and counts.projector == 27_540_480
    ddp, zero1, zero2, zero3, offload = estimate(counts, "bfloat16", world_size=8)
    assert ddp.total == 10 * P
    assert zero1.total == pytest.approx(2 * P + 2 * P + 12 * P / 8 + 2 * P)
    assert zero2.total == pytest.approx(2 * P + 2 * P / 8 + 12 * P / 8 + 2 * P)
    assert zero3.total == pytest.approx(18 * P / 8 + 2 * L)
    assert zero3.total / 2**30 == pytest.approx(17.66, abs=0.01)
    assert offload.total == 2 * L and offload.cpu == pytest.approx(18 * P / 8)


def test_lora_recipe_holds_no_reference_copy():
    counts = count_parameters(load_recipe(RECIPE_8B, [f"model.name_or_path={CONFIG_8B}"]))
    assert counts.reference == 0
    # r=16 on q,k,v,o,gate,up,down of 28 layers: r * (in + out) per adapted linear
    per_layer = 16 * ((3584 + 3584) * 2 + (3584 + 512) * 2 + (3584 + 18944) * 2 + (18944 + 3584))
    assert counts.trainable == 28 * per_layer


def test_cli_prints_every_stage(tiny_model_dir, capsys):
    assert main([str(TINY), "--world-size", "2", f"model.name_or_path={tiny_model_dir}"]) == 0
    out = capsys.readouterr().out
    for stage in ("DDP (ZeRO-0)", "ZeRO-1", "ZeRO-2", "ZeRO-3", "ZeRO-3 + CPU offload"):
        assert f"\n{stage} " in out
    assert "world size 2" in out and "reference: a frozen copy" in out
