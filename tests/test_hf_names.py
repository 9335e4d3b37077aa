"""The habits users bring from HF Trainer, TRL, ms-swift and LLaMA-Factory are answered with the key here.

Before: ``--learning_rate 5e-6`` ended in ``unrecognized arguments``; ``learning_rate=5e-6`` listed
the top-level sections; ``report_to=wandb,tensorboard`` was refused without the list syntax;
``train.max_steps=-1`` said ``set train.max_steps > 0 or train.num_epochs > 0``; ``--num_processes``
was refused.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mpo.cli.train import main as train_main
from mpo.config import _leaf_keys, Recipe, recipe_from_dict
from mpo.errors import DataError
from mpo.hf_names import SPELLINGS, spelling_table

REPO = Path(__file__).resolve().parents[1]
MINIMAL = {"model": {"name_or_path": "tiny"}, "data": {"meta_path": "examples/tiny_mmpr/meta.json"}}


def _error(override: str) -> str:
    with pytest.raises(DataError) as caught:
        recipe_from_dict(MINIMAL, [override], source="r.yaml")
    return str(caught.value)


@pytest.mark.parametrize("override, message", [
    ("learning_rate=5e-6", "unknown key learning_rate: did you mean train.lr? (learning_rate in HF Trainer, TRL)"),
    ("train.learning_rate=5e-6", "unknown key train.learning_rate: did you mean train.lr? (learning_rate in HF Trainer, TRL)"),
    ("per_device_train_batch_size=2", "unknown key per_device_train_batch_size: did you mean train.micro_batch_size? "
                                      "(per_device_train_batch_size in HF Trainer, TRL; pairs per forward pass per process)"),
    ("gradient_accumulation_steps=4", "unknown key gradient_accumulation_steps: did you mean train.gradient_accumulation_steps? "
                                      "(gradient_accumulation_steps in HF Trainer, TRL)"),
    ("num_train_epochs=1", "unknown key num_train_epochs: did you mean train.num_epochs? (num_train_epochs in HF Trainer, TRL)"),
    ("max_steps=-1", "unknown key max_steps: did you mean train.max_steps? (max_steps in HF Trainer, TRL; HF's -1 (no step limit) "
                     "is 0 here, the default: train.num_epochs decides)"),
    ("train.max_steps=-1", "train.max_steps: -1 is HF's 'no step limit' (num_train_epochs decides); here that is "
                           "train.max_steps: 0, the default, with train.num_epochs"),
    ("warmup_ratio=0.03", "unknown key warmup_ratio: did you mean train.warmup_ratio? (warmup_ratio in HF Trainer, TRL)"),
    ("lr_scheduler_type=cosine", "unknown key lr_scheduler_type: did you mean train.lr_scheduler? (lr_scheduler_type in HF Trainer, "
                                 "TRL; cosine, constant or linear)"),
    ("beta=0.1", "unknown key beta: did you mean loss.beta? (beta in TRL)"),
    ("loss_type=[sigmoid,bco_pair,sft]", "unknown key loss_type: did you mean loss.dpo_weight, loss.bco_weight, loss.sft_weight? "
                                         "(loss_type in TRL; MPO is TRL's loss_type [sigmoid, bco_pair, sft] with loss_weights "
                                         "[0.8, 0.2, 1.0]: a weight per term)"),
    ("rpo_alpha=1.0", "unknown key rpo_alpha: did you mean loss.sft_weight? (rpo_alpha in TRL; the SFT term's weight (the official "
                      "MPO code sets it through rpo_alpha))"),
    ("max_length=4096", "unknown key max_length: did you mean data.max_length? (max_length in TRL; prompt and responses, image "
                        "tokens included; image tokens are never cut)"),
    ("bf16=true", "unknown key bf16: did you mean train.mixed_precision? (bf16 in HF Trainer, TRL; bf16: true is "
                  "train.mixed_precision: bf16)"),
    ("train.output_dir=out", "unknown key train.output_dir: did you mean output_dir? (output_dir in HF Trainer, TRL)"),
    ("train.report_to=wandb", "unknown key train.report_to: did you mean report_to? (report_to in HF Trainer, TRL; a list, one "
                              "name or none, e.g. report_to=wandb,tensorboard)"),
    ("lr=1e-5", "unknown key lr: did you mean train.lr?"),
    ("report_to=all", "report_to: HF's 'all' (every installed tracker) is not read here: list them, e.g. "
                      "report_to=wandb,tensorboard or report_to=[wandb, tensorboard]"),
    ("report_to=wandb,tensorbord", "report_to: must be one of ['wandb', 'tensorboard', 'mlflow', 'comet_ml', 'aim', 'clearml', "
                                   "'dvclive', 'swanlab', 'trackio'], got 'tensorbord' (a list: report_to=wandb,tensorboard or "
                                   "report_to=[wandb, tensorboard]; report_to=none for none)"),
])
def test_peer_spellings_are_answered_with_the_key(override, message):
    assert _error(override) == "r.yaml: " + message


@pytest.mark.parametrize("override, trackers", [
    ("report_to=wandb,tensorboard", ["wandb", "tensorboard"]),
    ("report_to=wandb, tensorboard", ["wandb", "tensorboard"]),
    ("report_to=[wandb, tensorboard]", ["wandb", "tensorboard"]),
    ("report_to=wandb", ["wandb"]),
    ("report_to=none", []),
    ("report_to=", []),
])
def test_list_syntax_in_the_forms_users_type(override, trackers):
    assert recipe_from_dict(MINIMAL, [override]).report_to == trackers


@pytest.mark.parametrize("argv, last", [
    (["--learning_rate", "5e-6"], "mpo train: error: unrecognized argument --learning_rate: recipe keys follow the recipe as "
                                  "key=value: train.lr=5e-6 (learning_rate in HF Trainer, TRL)"),
    (["--per_device_train_batch_size=2"], "mpo train: error: unrecognized argument --per_device_train_batch_size: recipe keys follow "
                                          "the recipe as key=value: train.micro_batch_size=2 (per_device_train_batch_size in HF Trainer, TRL)"),
    (["--num_processes", "2"], "mpo train: error: unrecognized argument --num_processes: did you mean --num-processes? (this "
                               "command's flags are spelled with dashes)"),
    (["--deepspeed", "ds_z3.json"], "mpo train: error: unrecognized argument --deepspeed: use mpo train --launch "
                                    "launch/zero1.yaml (one of launch/*.yaml)"),
])
def test_hf_flags_to_mpo_train_are_answered(argv, last, capsys):
    with pytest.raises(SystemExit) as caught:
        train_main(["recipes/tiny_cpu.yaml", *argv])
    assert caught.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == last


def test_every_spelling_points_at_real_keys():
    keys = set(_leaf_keys(Recipe))
    for spelling in SPELLINGS:
        if not spelling.key.startswith("mpo "):
            assert set(spelling.key.split(", ")) <= keys, spelling


def test_the_readme_table_is_the_spelling_table():
    readme = (REPO / "README.md").read_text()
    found = re.search(r"<!-- spellings -->\n(.*?)\n<!-- /spellings -->", readme, re.DOTALL)
    assert found is not None, "README has no table of peer spellings"
    assert found.group(1) == spelling_table()
