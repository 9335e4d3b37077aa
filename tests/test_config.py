"""Recipes: every shipped YAML validates; strict keys, typed values, overrides, cross-field rules."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from mpo.config import LossConfig, Recipe, TrainConfig, load_recipe, recipe_from_dict
from mpo.errors import DataError

REPO = Path(__file__).resolve().parents[1]
MINIMAL = {"model": {"name_or_path": "tiny"}, "data": {"meta_path": "examples/tiny_mmpr/meta.json"}}


def _recipe_files(root: Path) -> list[Path]:
    """Every YAML under ``root``, however deep (a flat listdir would miss sub-folders)."""
    return sorted(p for pattern in ("*.yaml", "*.yml") for p in root.rglob(pattern))


def _minimal(**sections) -> dict:
    data = {key: dict(value) for key, value in MINIMAL.items()}
    for key, value in sections.items():
        if isinstance(value, dict):
            data.setdefault(key, {}).update(value)
        else:
            data[key] = value
    return data


def _check_recipe(path: Path) -> Recipe:
    """Loads a recipe, and checks that it survives a round trip through its own dict."""
    recipe = load_recipe(path)
    assert recipe_from_dict(recipe.to_dict()) == recipe
    for data_path in (recipe.data.meta_path, recipe.data.jsonl_path):
        if data_path.startswith("examples/"):  # data shipped in the repository must be there
            assert (REPO / data_path).is_file(), f"{path}: {data_path} does not exist"
    return recipe


def test_every_shipped_recipe_loads():
    for path in _recipe_files(REPO / "recipes"):
        _check_recipe(path)


def test_recipe_discovery_is_recursive_and_checks_what_it_finds(tmp_path):
    """The same discovery and check as above, on a tree this test builds (so it means something
    before any recipe ships): a nested recipe is found, loads, and keeps its values."""
    nested = tmp_path / "recipes" / "internvl3" / "8b_mpo.yaml"
    nested.parent.mkdir(parents=True)
    nested.write_text(yaml.safe_dump(_minimal(train={"lr": 5e-6, "max_steps": 3}, loss={"sft_reduction": "token"})))
    (tmp_path / "recipes" / "top.yaml").write_text(yaml.safe_dump(_minimal()))
    found = _recipe_files(tmp_path / "recipes")
    assert [p.name for p in found] == ["8b_mpo.yaml", "top.yaml"]
    recipe = _check_recipe(found[0])
    assert (recipe.train.lr, recipe.train.max_steps, recipe.loss.sft_reduction) == (5e-6, 3, "token")


def test_defaults_are_the_papers():
    """w_p 0.8, w_q 0.2, w_g 1.0, beta 0.1, SFT per sequence, delta a cumulative mean."""
    recipe = recipe_from_dict(_minimal())
    assert dataclasses.astuple(recipe.loss) == (0.1, 0.8, 0.2, 1.0, "sequence", "cumulative", 0.99)
    assert (recipe.train.weight_decay, recipe.train.adam_beta1, recipe.train.adam_beta2) == (0.05, 0.9, 0.999)


# ---------------------------------------------------------------- unknown keys


def test_unknown_key_lists_the_valid_keys_of_its_section(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(_minimal(train={"lrr": 1e-5})))
    with pytest.raises(DataError) as caught:
        load_recipe(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: unknown key train.lrr: did you mean train.lr?; valid keys here: train.lr,")
    assert "\n" not in message
    for name in (f.name for f in dataclasses.fields(TrainConfig)):
        assert f"train.{name}" in message
    assert "loss.beta" not in message  # only the section's own keys


def test_unknown_top_level_and_nested_keys():
    with pytest.raises(DataError, match=r"unknown key optimizer; valid keys here: model, reference, data, loss"):
        recipe_from_dict(_minimal(optimizer={"name": "adamw"}))
    with pytest.raises(DataError, match=r"unknown key model\.lora\.rank: did you mean model\.lora\.r\?; .*model\.lora\.r,"):
        recipe_from_dict(_minimal(model={"lora": {"rank": 8}}))


def test_unknown_key_in_an_override():
    with pytest.raises(DataError, match=r"unknown key loss\.betta: did you mean loss\.beta\?; .*loss\.beta"):
        recipe_from_dict(_minimal(), ["loss.betta=0.2"])


# ---------------------------------------------------------------- value types


@pytest.mark.parametrize(
    "section, key, value, match",
    [
        ("train", "lr", "fast", r"train\.lr: expected a number, got 'fast'"),
        ("train", "lr", True, r"train\.lr: expected a number"),
        ("train", "micro_batch_size", 1.5, r"train\.micro_batch_size: expected an integer"),
        ("train", "micro_batch_size", True, r"train\.micro_batch_size: expected an integer"),
        ("model", "freeze_vision", "yes", r"model\.freeze_vision: expected true or false"),
        ("loss", "sft_reduction", "mean", r"loss\.sft_reduction: must be one of \['sequence', 'token'\]"),
        ("data", "overlong", "cut", r"data\.overlong: must be one of \['truncate', 'drop'\]"),
        ("model", "lora", 3, r"model\.lora: expected a mapping"),
    ],
)
def test_wrong_type_names_the_key(section, key, value, match):
    with pytest.raises(DataError, match=match):
        recipe_from_dict(_minimal(**{section: {key: value}}))


def test_wrong_list_type_names_the_key():
    with pytest.raises(DataError, match=r"model\.lora\.target_modules: expected a list"):
        recipe_from_dict(_minimal(model={"lora": {"target_modules": "q_proj"}}))


def test_lossless_conversions():
    """An int where a float is declared becomes a float; PyYAML's 1e-5 (a string under YAML 1.1)
    is read as the number."""
    recipe = recipe_from_dict(_minimal(train={"lr": 1, "warmup_ratio": "3e-2"}))
    assert recipe.train.lr == 1.0 and isinstance(recipe.train.lr, float)
    assert recipe.train.warmup_ratio == 0.03


def test_scientific_notation_in_a_yaml_file(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model: {name_or_path: tiny}\ndata: {meta_path: m.json}\ntrain:\n  lr: 5e-6\n")
    assert load_recipe(path).train.lr == 5e-6


# ---------------------------------------------------------------- overrides


def test_overrides_apply(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(_minimal(train={"lr": 1e-6})))
    recipe = load_recipe(path, [
        "train.lr=1e-5",
        "loss.beta=0.2",
        "model.freeze_vision=true",
        "model.lora.enabled=true",
        "data.overlong=drop",
        "output_dir=/tmp/run7",
        "seed=3",
    ])
    assert recipe.train.lr == 1e-5
    assert recipe.loss.beta == 0.2
    assert recipe.model.freeze_vision is True and recipe.model.lora.enabled is True
    assert recipe.data.overlong == "drop"
    assert (recipe.output_dir, recipe.seed) == ("/tmp/run7", 3)
    assert recipe.model.name_or_path == "tiny"  # untouched keys keep the file's values


def test_later_override_wins_and_list_values_parse():
    recipe = recipe_from_dict(_minimal(), ["train.lr=1e-5", "train.lr=2e-5", "model.lora.target_modules=[q_proj, v_proj]"])
    assert recipe.train.lr == 2e-5
    assert recipe.model.lora.target_modules == ["q_proj", "v_proj"]


def test_bad_overrides():
    with pytest.raises(DataError, match="must look like key.sub=value"):
        recipe_from_dict(_minimal(), ["train.lr"])
    with pytest.raises(DataError, match="name_or_path is not a section"):
        recipe_from_dict(_minimal(), ["model.name_or_path.revision=main"])
    with pytest.raises(DataError, match=r"seed: expected an integer"):
        recipe_from_dict(_minimal(), ["seed.value=1"])
    with pytest.raises(DataError, match=r"train\.max_steps: expected an integer"):
        recipe_from_dict(_minimal(), ["train.max_steps=many"])


# ---------------------------------------------------------------- cross-field rules


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"data": {"jsonl_path": "pairs.jsonl"}}, "exactly one of data.meta_path, data.jsonl_path and data.dataset_path"),
        ({"data": {"meta_path": ""}}, "exactly one of data.meta_path, data.jsonl_path and data.dataset_path"),
        ({"model": {"name_or_path": ""}}, "model.name_or_path is required"),
        ({"train": {"micro_batch_size": 0}}, "train.micro_batch_size: must be at least 1"),
        ({"train": {"gradient_accumulation_steps": 0}}, "train.gradient_accumulation_steps: must be at least 1"),
        ({"train": {"max_steps": -2}}, "train.max_steps > 0 or train.num_epochs > 0"),
        ({"train": {"num_epochs": 0.0}}, "train.max_steps > 0 or train.num_epochs > 0"),
        ({"loss": {"bco_weight": -0.2}}, "loss weights must be >= 0"),
        ({"loss": {"dpo_weight": 0.0, "bco_weight": 0.0, "sft_weight": 0.0}}, "every loss weight is 0"),
        ({"data": {"eval_jsonl_path": "e.jsonl", "eval_fraction": 0.1}}, "at most one of data.eval_meta_path, data.eval_jsonl_path"),
        ({"data": {"eval_fraction": 1.0}}, "data.eval_fraction: must be in [0, 1)"),
        ({"train": {"eval_every": 10}}, "train.eval_every: needs held-out pairs"),
        ({"train": {"save_best": "eval/loss"}}, "train.save_best: needs held-out pairs"),
        ({"data": {"eval_fraction": 0.1}, "train": {"save_best": "loss"}}, "train.save_best: unknown eval metric 'loss'; choose from eval/loss,"),
        ({"data": {"eval_fraction": 0.1}, "loss": {"dpo_weight": 0.0}, "train": {"save_best": "eval/loss/dpo"}},
         "unknown eval metric 'eval/loss/dpo'"),  # a term weighted 0 is not computed
        ({"data": {"eval_meta_path": "e/meta.json"}, "reference": {"precomputed_path": "ref.safetensors"}},
         "data.eval_meta_path: a precomputed reference holds no log-probs of other data"),
    ],
)
def test_cross_field_rules(changes, match):
    with pytest.raises(DataError, match=re.escape(match)):
        recipe_from_dict(_minimal(**changes), source="r.yaml")


def test_resolved_recipe_yaml_reads_back_equal(tmp_path):
    """``Recipe.to_yaml`` (written to output_dir and each checkpoint) loads back to the same
    recipe: overrides applied, choices such as ``no`` and small floats intact."""
    recipe = recipe_from_dict(_minimal(), ["train.lr=2e-7", "train.mixed_precision=no", "data.eval_fraction=0.05",
                                           "train.save_best=eval/rewards/accuracies", "train.save_best_mode=max"])
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe.to_yaml())
    assert load_recipe(path) == recipe
    assert (recipe.train.lr, recipe.train.mixed_precision) == (2e-7, "no")


def test_cross_field_rules_allow_valid_edge_cases():
    """num_epochs 0 is fine with max_steps set; SFT alone is a valid objective; a JSONL path
    instead of meta.json is fine."""
    assert recipe_from_dict(_minimal(train={"num_epochs": 0.0, "max_steps": 5})).train.max_steps == 5
    assert recipe_from_dict(_minimal(loss={"dpo_weight": 0.0, "bco_weight": 0.0})).loss.sft_weight == 1.0
    jsonl = recipe_from_dict({"model": {"name_or_path": "m"}, "data": {"jsonl_path": "p.jsonl"}})
    assert (jsonl.data.jsonl_path, jsonl.data.meta_path) == ("p.jsonl", "")


# ---------------------------------------------------------------- files


def test_recipe_file_errors(tmp_path):
    with pytest.raises(DataError, match="recipe not found"):
        load_recipe(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [lr: 1\n")
    with pytest.raises(DataError, match="invalid YAML") as caught:
        load_recipe(broken)
    assert "\n" not in str(caught.value) and str(caught.value).startswith(str(broken))
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(DataError, match="a recipe is a mapping of sections"):
        load_recipe(listing)


def test_loss_config_fields_match_mpo_loss():
    """Every loss weight a recipe can set is a parameter of MPOLoss, so no key is read by nothing."""
    from mpo.losses import MPOLoss

    loss_params = {f.name for f in dataclasses.fields(MPOLoss)}
    assert {"beta", "dpo_weight", "bco_weight", "sft_weight", "sft_reduction"} <= loss_params
    assert loss_params <= {f.name for f in dataclasses.fields(LossConfig)}


def test_bare_no_means_the_string_no(tmp_path):
    """YAML 1.1 reads `no` as false; for a choice that includes "no" it means that choice."""
    path = tmp_path / "r.yaml"
    path.write_text("model:\n  name_or_path: m\ndata:\n  meta_path: meta.json\ntrain:\n  mixed_precision: no\n")
    assert load_recipe(path).train.mixed_precision == "no"
    assert recipe_from_dict(_minimal(), ["train.mixed_precision=no"]).train.mixed_precision == "no"
    with pytest.raises(DataError, match=r"train\.lr_scheduler: must be one of"):
        recipe_from_dict(_minimal(), ["train.lr_scheduler=no"])


def test_report_to_takes_a_list_one_name_or_none():
    """As HF Trainer's report_to: a list of trackers, one name, or none (no tracker)."""
    assert recipe_from_dict(_minimal()).report_to == []
    assert recipe_from_dict(_minimal(), ["report_to=wandb"]).report_to == ["wandb"]
    assert recipe_from_dict(_minimal(), ["report_to=none"]).report_to == []
    assert recipe_from_dict(_minimal(), ["report_to=[tensorboard, wandb]"]).report_to == ["tensorboard", "wandb"]
    with pytest.raises(DataError, match=r"report_to: must be one of \['wandb', 'tensorboard', 'mlflow'"):
        recipe_from_dict(_minimal(), ["report_to=[tensorboard, neptune]"])
    # Only report_to reads a bare name as a list: peft reads a string target_modules as a regex.
    with pytest.raises(DataError, match=r"model\.lora\.target_modules: expected a list"):
        recipe_from_dict(_minimal(), ["model.lora.target_modules=q_proj"])


def test_a_datasets_source_is_one_of_the_three():
    recipe = recipe_from_dict({"model": {"name_or_path": "m"}, "data": {"dataset_path": "prefs.parquet"}})
    assert (recipe.data.dataset_path, recipe.data.dataset_split) == ("prefs.parquet", "train")
    with pytest.raises(DataError, match="set exactly one of data.meta_path, data.jsonl_path and data.dataset_path"):
        recipe_from_dict(_minimal(data={"dataset_path": "prefs.parquet"}))
