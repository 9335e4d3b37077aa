"""Recipe values that would train the wrong thing without an error are refused at load, the key named."""

from __future__ import annotations

import pytest

from mpo.config import TrainConfig, recipe_from_dict, save_best_direction
from mpo.config_ranges import RANGES
from mpo.errors import DataError

MINIMAL = {"model": {"name_or_path": "tiny"}, "data": {"meta_path": "examples/tiny_mmpr/meta.json"}}


def _recipe(overrides: list[str]):
    return recipe_from_dict(MINIMAL, overrides, source="r.yaml")


@pytest.mark.parametrize(
    "override, line",
    [
        ("loss.beta=0", "r.yaml: loss.beta: must be > 0, got 0.0 (0 makes every reward 0 (MPO becomes SFT), "
                        "< 0 rewards the rejected responses)"),
        ("loss.beta=-0.1", "r.yaml: loss.beta: must be > 0, got -0.1"),
        ("loss.dpo_weight=-0.8", "r.yaml: loss.dpo_weight: must be >= 0, got -0.8"),
        ("loss.sft_weight=-1", "r.yaml: loss.sft_weight: must be >= 0, got -1.0"),
        ("loss.delta_ema_decay=1", "r.yaml: loss.delta_ema_decay: must be in (0, 1), got 1.0"),
        ("loss.delta_ema_decay=0", "r.yaml: loss.delta_ema_decay: must be in (0, 1), got 0.0"),
        ("train.warmup_ratio=1", "r.yaml: train.warmup_ratio: must be in [0, 1), got 1.0"),
        ("train.warmup_ratio=-0.05", "r.yaml: train.warmup_ratio: must be in [0, 1), got -0.05"),
        ("train.lr=-1e-6", "r.yaml: train.lr: must be >= 0, got -1e-06"),
        ("train.vision_lr=-1e-6", "r.yaml: train.vision_lr: must be >= 0 (0: train.lr), got -1e-06"),
        ("train.weight_decay=-0.05", "r.yaml: train.weight_decay: must be >= 0, got -0.05"),
        ("train.adam_beta2=1.0", "r.yaml: train.adam_beta2: must be in [0, 1), got 1.0"),
        ("train.keep_last=0", "r.yaml: train.keep_last: must be at least 1, got 0"),
        ("train.log_every=0", "r.yaml: train.log_every: must be at least 1, got 0"),
        ("model.lora.r=0", "r.yaml: model.lora.r: must be at least 1, got 0"),
        ("model.lora.dropout=1.0", "r.yaml: model.lora.dropout: must be in [0, 1), got 1.0"),
        ("data.num_workers=-1", "r.yaml: data.num_workers: must be >= 0, got -1"),
        ("train.lr=.nan", "r.yaml: train.lr: must be a finite number, got nan"),
        ("loss.beta=.inf", "r.yaml: loss.beta: must be a finite number, got inf"),
    ],
)
def test_out_of_range_values_are_refused_with_the_key_named(override, line):
    with pytest.raises(DataError) as caught:
        _recipe([override])
    assert str(caught.value).startswith(line)
    assert "\n" not in str(caught.value)


def test_edges_of_each_range_are_accepted():
    """0 is a valid weight (the term is removed), a rate of 0 and no warm-up are valid, and
    max_grad_norm takes any value: <= 0 or .inf mean no clipping."""
    recipe = _recipe(["loss.dpo_weight=0", "train.lr=0", "train.warmup_ratio=0", "train.adam_beta1=0",
                      "loss.delta_ema_decay=0.999", "train.max_grad_norm=0"])
    assert (recipe.loss.dpo_weight, recipe.train.lr, recipe.train.max_grad_norm) == (0.0, 0.0, 0.0)
    assert _recipe(["train.max_grad_norm=-1"]).train.max_grad_norm == -1.0
    assert _recipe(["train.max_grad_norm=.inf"]).train.max_grad_norm == float("inf")


def test_every_range_names_a_real_key_and_accepts_its_default():
    """A rule on a key that does not exist would never run; a default outside its own range would
    refuse every recipe."""
    recipe = _recipe([])
    for rule in RANGES:
        node = recipe
        for part in rule.key.split("."):
            node = getattr(node, part)
        assert rule.valid(node), rule.key


@pytest.mark.parametrize(
    "metric, direction",
    [
        ("eval/loss", "min"), ("eval/loss/dpo", "min"), ("eval/loss/sft", "min"),
        ("eval/rewards/margins", "max"), ("eval/rewards/accuracies", "max"), ("eval/rewards/chosen", "max"),
        ("eval/rewards/rejected", "min"), ("eval/logps/chosen", "max"), ("eval/logps/rejected", "min"),
    ],
)
def test_save_best_follows_the_metric_unless_set(metric, direction):
    """``auto`` (the default): a margin is kept at its highest, a loss at its lowest; a mode set in
    the recipe wins."""
    assert TrainConfig().save_best_mode == "auto"
    assert save_best_direction(TrainConfig(save_best=metric)) == direction
    other = {"min": "max", "max": "min"}[direction]
    assert save_best_direction(TrainConfig(save_best=metric, save_best_mode=other)) == other
