"""Guards where runs go wrong unseen: the step-1 values MPO predicts, printed and checked, and a
run whose weights become non-finite or all-zero stopped before it writes a checkpoint."""

from __future__ import annotations

import math

import pytest
import torch
import yaml
from accelerate import Accelerator
from torch import nn

from mpo.cli.main import main as mpo_main
from mpo.errors import RunStopped
from mpo.losses import MPOLoss
from mpo.train.guards import WeightGuard, step_one_lines

PREDICTED = ("step 1 (policy = reference, delta 0): loss/dpo 0.6931 (ln 2 = 0.6931), loss/bco 1.3863 (2 ln 2 = 1.3863), "
             "rewards/chosen 0.0000 (0), rewards/rejected 0.0000 (0)")


def test_step_one_lines_compare_with_ln2():
    exact = {"loss": 1.2 * math.log(2) + 2.5, "loss/dpo": math.log(2), "loss/bco": 2 * math.log(2),
             "rewards/chosen": 0.0, "rewards/rejected": 0.0}
    assert step_one_lines(exact, MPOLoss(), "FrozenModelReference") == [PREDICTED + ": as MPO predicts"]
    off = dict(exact, **{"loss/bco": 1.4512, "rewards/chosen": -0.0312, "rewards/rejected": -0.0330})
    lines = step_one_lines(off, MPOLoss(), "PrecomputedReference")
    assert lines[0].startswith("step 1 (policy = reference, delta 0): loss/dpo 0.6931 (ln 2 = 0.6931), loss/bco 1.4512")
    assert lines[1] == ("warning: step 1: loss/bco, rewards/chosen, rewards/rejected differ from what MPO predicts while "
                        "the policy equals its reference (by more than 0.001): the precomputed reference "
                        "(reference.precomputed_path) was computed with other settings or another model than this run's "
                        "starting point; every reward of this run is measured from that reference")
    # DPO alone: no BCO value predicted; SFT alone: nothing to compare, but a loss of exactly 0 is named.
    assert step_one_lines(exact, MPOLoss(bco_weight=0.0), "FrozenModelReference")[0] == (
        "step 1 (policy = reference, delta 0): loss/dpo 0.6931 (ln 2 = 0.6931), rewards/chosen 0.0000 (0), "
        "rewards/rejected 0.0000 (0): as MPO predicts")
    assert step_one_lines({"loss": 0.0, "loss/sft": 0.0}, MPOLoss(dpo_weight=0.0, bco_weight=0.0), "NoneType") == [
        "warning: step 1: the loss is exactly 0, so nothing is trained; check the loss weights and that the responses "
        "are not empty"]


def test_a_fresh_run_prints_the_step_one_values(tiny_model_dir, tiny_mmpr_dir, tmp_path, make_recipe, run_trainer, capsys):
    run_trainer(make_recipe(tiny_model_dir, tiny_mmpr_dir, tmp_path / "run", max_steps=1))
    out = capsys.readouterr().out.splitlines()
    assert PREDICTED + ": as MPO predicts" in out
    assert not any(line.startswith("warning: step 1") for line in out)


def test_a_reference_that_is_not_the_starting_policy_is_warned_about(tiny_model_dir, tiny_mmpr_dir, tmp_path, make_recipe,
                                                                      train_in_process, capsys):
    """The policy is moved away from the checkpoint the frozen reference is loaded from before step 1
    (what a reference from another checkpoint does): the step-1 values are not ln 2 and 2 ln 2."""

    def perturb(trainer):
        with torch.no_grad():
            generator = torch.Generator().manual_seed(0)
            for parameter in trainer.accelerator.unwrap_model(trainer.policy).parameters():
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))

    train_in_process(make_recipe(tiny_model_dir, tiny_mmpr_dir, tmp_path / "run", max_steps=1), before_training=perturb)
    out = capsys.readouterr().out.splitlines()
    (warning,) = [line for line in out if line.startswith("warning: step 1")]
    assert warning.endswith("differ from what MPO predicts while the policy equals its reference (by more than 0.001): "
                            "the reference model is not the starting policy; every reward of this run is measured from "
                            "that reference")
    assert "loss/dpo" in warning and "rewards/chosen" in warning


def test_weight_guard_names_the_parameter():
    """A weight that started non-zero and became all zero, or one with a NaN, stops the check with
    the step and its name; a bias that starts at zero may stay there."""
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    with torch.no_grad():
        model[0].bias.zero_()
    accelerator = Accelerator(cpu=True)
    guard = WeightGuard(model, accelerator)
    guard.check(1)  # the zero bias is fine
    with torch.no_grad():
        model[1].weight.zero_()
    with pytest.raises(RunStopped, match=r"^step 7: the weights of 1\.weight have become all zero after the optimizer step; "
                                         r"stopped before writing a checkpoint"):
        guard.check(7)
    with torch.no_grad():
        model[0].weight[2, 1] = float("nan")
    with pytest.raises(RunStopped, match=r"^step 8: the weights of 0\.weight are not finite \(NaN or inf\)"):
        guard.check(8)  # non-finite is named first


def test_a_run_whose_weights_blow_up_stops_before_its_checkpoint(tiny_model_dir, tiny_mmpr_dir, tmp_path, make_recipe, capsys):
    """``train.lr=1e39`` (finite in the recipe, infinite in fp32) turns the weights to inf and NaN at
    step 1: ``mpo train`` ends with one line naming the step and the parameter, exit 1, and no
    checkpoint or final model is written."""
    out = tmp_path / "run"
    recipe = make_recipe(tiny_model_dir, tiny_mmpr_dir, out, max_steps=3, save_every=1, lr=1e39)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert mpo_main(["train", str(path)]) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: step 1: the weights of model.") and " are not finite (NaN or inf) after the optimizer step; " \
        "stopped before writing a checkpoint." in last
    assert not (out / "checkpoints").exists() and not (out / "final").exists()
