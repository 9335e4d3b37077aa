"""``reference.name_or_path``: a frozen reference from another checkpoint than the starting one.

Iterative training starts each round from the previous round's model and may keep the first
round's model as the reference (``mpo iterate``, ``iterate.reference: initial``). The rewards are
then beta * (log pi_policy - log pi_reference) with two different models, so at step 1 they are
no longer 0: they equal beta times the difference of the two models' log-probs of the same batch,
each read from a run that trains that model as the policy (the first step's batch and the
log-probs before the first update are the same in every run of the same seed and data).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mpo.config import recipe_from_dict
from mpo.errors import DataError
from mpo.model.tiny import build_tiny_model

BETA = 0.1


@pytest.fixture(scope="module")
def other_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Same sizes and tokenizer as ``tiny_model_dir``, other weights."""
    return build_tiny_model(tmp_path_factory.mktemp("other") / "model", size="tiny", seed=1)


def _recipe(make_recipe, model: Path, data: Path, out: Path, **reference) -> dict:
    recipe = make_recipe(model, data, out, max_steps=1)
    recipe["loss"] = {"beta": BETA}
    if reference:
        recipe["reference"] = reference
    return recipe


def test_rewards_at_step_one_are_beta_times_the_two_models_difference(
    tiny_model_dir, other_model, tiny_mmpr_dir, tmp_path, make_recipe, run_trainer, train_in_process
):
    [own] = run_trainer(_recipe(make_recipe, tiny_model_dir, tiny_mmpr_dir, tmp_path / "own"))
    [other] = run_trainer(_recipe(make_recipe, other_model, tiny_mmpr_dir, tmp_path / "other"))
    trainer = train_in_process(_recipe(make_recipe, tiny_model_dir, tiny_mmpr_dir, tmp_path / "mixed", name_or_path=str(other_model)))
    [mixed] = _rows(tmp_path / "mixed")
    assert own["rewards/chosen"] == 0.0 and own["rewards/rejected"] == 0.0  # its own copy: policy == reference
    assert mixed["logps/chosen"] == pytest.approx(own["logps/chosen"], rel=1e-6)  # the same policy and batch
    for side in ("chosen", "rejected"):
        expected = BETA * (own[f"logps/{side}"] - other[f"logps/{side}"])
        assert abs(expected) > 1e-3  # the two models differ, so the check has something to see
        assert mixed[f"rewards/{side}"] == pytest.approx(expected, rel=1e-4, abs=1e-6)
    # another checkpoint's vision tower encodes the images itself
    assert trainer.reuse_features is False


def test_precomputed_log_probs_come_from_the_named_reference(
    tiny_model_dir, other_model, tiny_mmpr_dir, tmp_path, make_recipe, run_trainer, accelerate_reset
):
    from mpo.train.precompute import compute

    live = run_trainer(_recipe(make_recipe, tiny_model_dir, tiny_mmpr_dir, tmp_path / "live", name_or_path=str(other_model)))
    recipe = recipe_from_dict(_recipe(make_recipe, tiny_model_dir, tiny_mmpr_dir, tmp_path / "pre", name_or_path=str(other_model)))
    try:
        path = compute(recipe, tmp_path / "reference_logps.safetensors")
    finally:
        accelerate_reset()
    stored = run_trainer(_recipe(make_recipe, tiny_model_dir, tiny_mmpr_dir, tmp_path / "stored", name_or_path=str(other_model),
                                 precomputed_path=str(path)))
    for key in ("rewards/chosen", "rewards/rejected", "loss/dpo", "loss"):
        assert stored[0][key] == pytest.approx(live[0][key], rel=1e-5, abs=1e-7), key


def test_another_vocabulary_is_refused(tiny_model_dir, tiny_mmpr_dir, tmp_path, make_recipe, train_in_process):
    foreign = build_tiny_model(tmp_path / "foreign", size="tiny", seed=0, corpus=["an entirely different corpus of words"])
    with pytest.raises(DataError, match="has another vocabulary than") as error:
        train_in_process(_recipe(make_recipe, tiny_model_dir, tiny_mmpr_dir, tmp_path / "run", name_or_path=str(foreign)))
    assert error.value.field == "reference.name_or_path"


def test_lora_keeps_its_own_reference(tiny_model_dir, tiny_mmpr_dir, tmp_path, make_recipe):
    recipe = _recipe(make_recipe, tiny_model_dir, tiny_mmpr_dir, tmp_path / "run", name_or_path=str(tiny_model_dir))
    recipe["model"]["lora"] = {"enabled": True}
    with pytest.raises(DataError, match="LoRA run's reference is its base model"):
        recipe_from_dict(recipe)


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
