"""Evaluation during training: the held-out split, the exact means, and that it changes no
training number (delta, losses, weights) even when training draws random numbers (LoRA dropout)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from mpo.losses import bco_pair_loss, dpo_sigmoid_loss
from mpo.model.forward import PreferenceForward
from mpo.model.loading import load_reference
from mpo.train.evaluation import improves
from safetensors.torch import load_file

# Per-step values that depend on wall time, not on the numbers trained.
TIMING = {"tokens_per_s", "pairs_per_s"}


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def with_eval(recipe: dict, data_dir: Path, **train_keys) -> dict:
    """``recipe`` evaluated on the 5 text-only pairs of the example data."""
    recipe = json.loads(json.dumps(recipe))
    recipe["data"]["eval_jsonl_path"] = str(data_dir / "annotations" / "text_prefix_pair_sr0.5_wo_image.jsonl")
    recipe["data"]["eval_image_root"] = str(data_dir)
    recipe["train"].update(train_keys)
    return recipe


def test_best_is_replaced_only_by_a_strictly_better_value():
    assert improves(3.0, None, "min") and not improves(float("nan"), None, "min")
    assert improves(0.5, 1.0, "min") and not improves(1.0, 1.0, "min") and not improves(2.0, 1.0, "min")
    assert improves(2.0, 1.0, "max") and not improves(0.5, 1.0, "max")
    assert not improves(float("nan"), 1.0, "max")


def test_evaluation_changes_no_training_number(tiny_model_dir, tiny_mmpr_dir, tmp_path, make_recipe, train_in_process):
    """LoRA with dropout draws random numbers at every step; evaluating after every step (a
    DataLoader per evaluation, which draws from the global RNG) must leave every logged training
    value, the reward shift delta and the trained adapter bit-identical."""
    base = make_recipe(tiny_model_dir, tiny_mmpr_dir, tmp_path / "plain", max_steps=3, save_every=0)
    base["model"]["lora"] = {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.1}
    base["train"]["lr"] = 2e-2
    plain = train_in_process(base)
    evaluated = train_in_process(with_eval(dict(base, output_dir=str(tmp_path / "eval")), tiny_mmpr_dir, eval_every=1))

    a, b = rows(tmp_path / "plain"), rows(tmp_path / "eval")
    assert [sorted(k for k in r if k.startswith("eval/")) for r in b] == [sorted(k for k in b[0] if k.startswith("eval/"))] * 3
    assert all("eval/loss" in r for r in b) and not any("eval/loss" in r for r in a)
    for before, after in zip(a, b):
        assert {k: v for k, v in before.items() if k not in TIMING} == {k: v for k, v in after.items() if k not in TIMING and not k.startswith("eval/")}
    assert plain.reward_shift.state_dict() == evaluated.reward_shift.state_dict()
    assert plain.reward_shift.value != 0.0
    adapter_a = load_file(tmp_path / "plain" / "final" / "adapter_model.safetensors")
    adapter_b = load_file(tmp_path / "eval" / "final" / "adapter_model.safetensors")
    assert all(torch.equal(adapter_a[k], adapter_b[k]) for k in adapter_a)
    assert a[0]["loss/dpo"] != a[2]["loss/dpo"]  # dropout and training really moved the numbers


@pytest.mark.parametrize("sft_reduction", ["sequence", "token"])
def test_eval_metrics_are_exact_means_over_held_out_pairs(tiny_model_dir, tiny_mmpr_dir, tmp_path, sft_reduction, make_recipe, train_in_process):
    """The logged eval/* of the last step equal a by-hand evaluation of the final model, pair by
    pair: DPO, BCO (with the final delta) and SFT of each of the 5 held-out pairs, averaged over
    pairs (SFT ``token``: over chosen tokens). The trainer scored them in micro-batches of 2, 2
    and 1, so a mean of micro-batch means would be off. The best checkpoint by eval/loss is kept."""
    out = tmp_path / "run"
    recipe = with_eval(make_recipe(tiny_model_dir, tiny_mmpr_dir, out, max_steps=2, save_every=1, keep_last=5),
                       tiny_mmpr_dir, eval_every=1, save_best="eval/loss")
    recipe["loss"] = {"sft_reduction": sft_reduction}
    trainer = train_in_process(recipe)
    last = rows(out)[-1]
    assert last["eval/pairs"] == 5.0

    from transformers import AutoModelForImageTextToText

    policy = PreferenceForward(AutoModelForImageTextToText.from_pretrained(out / "final")).eval()
    reference = PreferenceForward(load_reference(trainer.recipe.model)).eval()
    pairs = [trainer.eval_dataset[i] for i in range(len(trainer.eval_dataset))]
    with torch.no_grad():
        scored = [(policy(trainer.collate([p])).logps, reference(trainer.collate([p])).logps) for p in pairs]
    beta, delta = trainer.recipe.loss.beta, trainer.reward_shift.value
    chosen = torch.cat([beta * (p.chosen_logps - r.chosen_logps) for p, r in scored]).double()
    rejected = torch.cat([beta * (p.rejected_logps - r.rejected_logps) for p, r in scored]).double()
    logps = torch.cat([p.chosen_logps for p, _ in scored]).double()
    counts = torch.cat([p.chosen_token_counts for p, _ in scored]).double()
    sft = -logps.sum() / counts.sum() if sft_reduction == "token" else (-logps / counts).mean()
    expected = {
        "eval/loss/dpo": dpo_sigmoid_loss(chosen, rejected).mean(),
        "eval/loss/bco": bco_pair_loss(chosen, rejected, delta).mean(),
        "eval/loss/sft": sft,
        "eval/rewards/chosen": chosen.mean(),
        "eval/rewards/margins": (chosen - rejected).mean(),
        "eval/rewards/accuracies": (chosen > rejected).double().mean(),
        "eval/logps/rejected": torch.cat([p.rejected_logps for p, _ in scored]).double().mean(),
    }
    expected["eval/loss"] = 0.8 * expected["eval/loss/dpo"] + 0.2 * expected["eval/loss/bco"] + expected["eval/loss/sft"]
    for key, value in expected.items():
        assert last[key] == pytest.approx(float(value), rel=1e-5, abs=1e-6), key
    # The micro-batches' unweighted mean, what an exact mean must not be: the test can tell.
    by_batch = [dpo_sigmoid_loss(chosen[s], rejected[s]).mean() for s in (slice(0, 2), slice(2, 4), slice(4, 5))]
    assert abs(float(sum(by_batch) / 3) - last["eval/loss/dpo"]) > 1e-3

    losses = [r["eval/loss"] for r in rows(out)]
    best = json.loads((out / "best" / "best.json").read_text())
    assert best == {"step": 1 + losses.index(min(losses)), "metric": "eval/loss", "value": min(losses)}
    kept = load_file(out / "best" / "model.safetensors")
    at_step = load_file(out / "checkpoints" / f"step-{best['step']:08d}" / "model.safetensors")
    assert kept.keys() == at_step.keys() and all(torch.equal(kept[k], at_step[k]) for k in kept)
    assert math.isfinite(best["value"])
