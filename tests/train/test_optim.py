"""The optimizer (per-part rates, no decay on 1-D weights, the fused kernel) and what a text-only
step does to the vision weights: no vision pass in one process, zero gradients, so AdamW decays
them and nothing else."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForImageTextToText

from mpo.data.layouts import collate_plain
from mpo.config import recipe_from_dict
from mpo.model.forward import PreferenceForward, text_only_vision
from mpo.train.optim import build_optimizer, zero_missing_gradients
from mpo.types import EncodedPair


def test_vision_and_projector_rates_no_decay_groups_and_the_fused_kernel(tiny_model_dir, tiny_mmpr_dir, tmp_path, make_recipe):
    """Each part gets its peak rate; 1-D weights get no decay; every trainable weight is in one
    group; the CPU gets torch's fused AdamW (not the per-tensor loop)."""
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    recipe = recipe_from_dict(make_recipe(tiny_model_dir, tiny_mmpr_dir, tmp_path, lr=1e-4, vision_lr=3e-4, projector_lr=2e-4))
    optimizer = build_optimizer(model, recipe, master_weights=False, device=torch.device("cpu"))
    ids = {id(p): n for n, p in model.named_parameters()}
    seen = {}
    for group in optimizer.param_groups:
        assert group["fused"] is True
        for p in group["params"]:
            seen[ids[id(p)]] = (group["lr"], group["weight_decay"])
    assert set(seen) == set(ids.values())
    for name, (lr, decay) in seen.items():
        part_lr = 3e-4 if "vision_tower" in name else 2e-4 if "multi_modal_projector" in name else 1e-4
        assert lr == part_lr, name
        assert decay == (0.0 if model.get_parameter(name).ndim < 2 else 0.05), name
    assert optimizer.param_groups[0]["lr"] == 1e-4  # the language model's rate is the logged one
    # a device without a fused kernel keeps torch's own choice
    assert build_optimizer(model, recipe, master_weights=False, device=torch.device("meta")).defaults["fused"] is None


@pytest.mark.parametrize(("processes", "zero", "trained", "expected"), [
    (1, None, True, "skip"),
    (2, None, True, "zero_grads"),  # DDP
    (2, {"stage": 1}, True, "zero_grads"),
    (2, {"stage": 1, "overlap_comm": True}, True, "blank_tile"),
    (2, {"stage": 2}, True, "blank_tile"),
    (2, {"stage": 3}, True, "blank_tile"),
    (1, {"stage": 3}, False, "blank_tile"),  # ZeRO-3 gathers need the frozen reference's tower to run
    (2, {"stage": 2}, False, "skip"),
])
def test_text_only_vision_per_launch(processes, zero, trained, expected):
    assert text_only_vision(processes, zero, trained) == expected


def test_a_text_only_step_decays_the_vision_weights_without_running_the_tower(tiny_model_dir, tiny_mmpr_dir, tmp_path, make_recipe):
    """One process, one text-only pair: the vision tower never runs, yet the step hands AdamW
    zero gradients for it (mpo.train.optim's decision), so a 2-D vision weight becomes exactly
    ``w * (1 - lr * weight_decay)`` (Adam's update is 0 / (0 + eps) on a first step) and a 1-D one
    (no decay) stays put, while the language model moves by decay plus Adam's first step, ``lr * g / (|g| + eps)``."""
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=torch.float32)
    calls = []
    model.model.vision_tower.register_forward_hook(lambda *args: calls.append(1))
    forward = PreferenceForward(model, text_only_vision(1, None)).train()
    recipe = recipe_from_dict(make_recipe(tiny_model_dir, tiny_mmpr_dir, tmp_path, lr=1e-3))
    optimizer = build_optimizer(forward, recipe, master_weights=False, device=torch.device("cpu"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    logps = forward(collate_plain([EncodedPair([5, 6, 7, 8], [9, 10], [11], None)], pad_id=0)).logps
    (logps.chosen_logps - logps.rejected_logps).sum().neg().backward()
    assert calls == []
    zero_missing_gradients(forward)
    optimizer.step()
    vision = {n: p for n, p in model.named_parameters() if "vision_tower" in n or "multi_modal_projector" in n}
    assert vision and all(model.get_parameter(n).grad is not None and not model.get_parameter(n).grad.any() for n in vision)
    for name, parameter in vision.items():
        decay = 1 - 1e-3 * 0.05 if parameter.ndim >= 2 else 1.0
        torch.testing.assert_close(parameter.detach(), before[name] * decay, rtol=0, atol=1e-9, msg=name)
    query = "model.language_model.layers.0.self_attn.q_proj.weight"
    moved = before[query] - model.get_parameter(query).detach()
    grad = model.get_parameter(query).grad
    assert grad.abs().max() > 1e-4  # it did learn
    expected = before[query] * 1e-3 * 0.05 + 1e-3 * grad / (grad.abs() + 1e-8)
    torch.testing.assert_close(moved, expected, rtol=1e-4, atol=1e-9)
