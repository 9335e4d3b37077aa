"""fp32 master weights for bf16 models trained without DeepSpeed (mpo.train.precision)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from mpo.config import load_recipe
from mpo.errors import DataError
from mpo.train.precision import MasterWeightAdamW, check_precision
from mpo.train.trainer import MPOTrainer

REPO = Path(__file__).resolve().parents[2]
LN2 = math.log(2.0)


def test_master_weights_step_like_fp32_adamw_and_survive_a_state_dict_round_trip():
    """Three steps on bf16 weights at lr 1e-6: the masters are exactly what torch's AdamW does to
    fp32 copies given the same (upcast) gradients, the bf16 weights are the masters rounded to
    nearest, and a fresh optimizer loaded from the state dict holds the same masters. (Updates of
    ~1e-6 on weights near 1 are below half a bf16 step, 2^-9: applied to the bf16 weights
    themselves they would all round away.)"""
    torch.manual_seed(0)
    weight = torch.nn.Parameter((1 + 0.1 * torch.randn(64)).bfloat16())
    adapter = torch.nn.Parameter(torch.randn(8))  # an fp32 trainable weight is its own master
    reference = [torch.nn.Parameter(weight.detach().float()), torch.nn.Parameter(adapter.detach().clone())]
    hyper = dict(lr=1e-6, betas=(0.9, 0.999), weight_decay=0.05)
    optimizer = MasterWeightAdamW([{"params": [weight, adapter]}], **hyper)
    plain = torch.optim.AdamW([{"params": reference}], **hyper)
    start = weight.detach().clone()
    for step in range(3):
        grads = [torch.randn(64).bfloat16(), torch.randn(8)]
        weight.grad, adapter.grad = grads[0].clone(), grads[1].clone()
        reference[0].grad, reference[1].grad = grads[0].float(), grads[1].clone()
        optimizer.step()
        optimizer.zero_grad()
        plain.step()
        plain.zero_grad()
    (master,) = optimizer.masters.values()
    assert torch.equal(master, reference[0]) and torch.equal(adapter, reference[1])
    assert torch.equal(weight, master.bfloat16())
    assert (master != start.float()).all() and torch.equal(weight, start)  # moved in fp32, not in bf16
    assert weight.grad is None and master.grad is None

    restored = MasterWeightAdamW([{"params": [torch.nn.Parameter(weight.detach().clone()), adapter]}], **hyper)
    restored.load_state_dict(saved_and_loaded(optimizer.state_dict()))
    assert torch.equal(*restored.masters.values(), master)


def saved_and_loaded(state: dict) -> dict:
    """A state dict through torch.save / torch.load(weights_only=True), as a checkpoint stores it."""
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_precision_settings_that_would_train_wrong_are_refused():
    check_precision("bfloat16", "bf16", deepspeed=False)
    check_precision("float16", "fp16", deepspeed=True)  # DeepSpeed masters and scales itself
    with pytest.raises(DataError, match="model.dtype: float16 weights train only under DeepSpeed"):
        check_precision("float16", "fp16", deepspeed=False)
    with pytest.raises(DataError, match="train.mixed_precision: fp16 autocast over bfloat16 weights"):
        check_precision("bfloat16", "fp16", deepspeed=False)


def _run(train_in_process, recipe) -> tuple[list[dict], MPOTrainer]:
    params, before = [], []

    def keep_start(trainer: MPOTrainer) -> None:
        params.extend(p for group in trainer.optimizer.param_groups for p in group["params"])
        before.extend(p.detach().clone() for p in params)

    trainer = train_in_process(recipe, before_training=keep_start)
    trainer.changed = sum((a != p).sum().item() for a, p in zip(before, params)) / sum(p.numel() for p in params)
    rows = [json.loads(line) for line in (Path(recipe.output_dir) / "metrics.jsonl").read_text().splitlines()]
    return rows, trainer


def test_bf16_recipe_at_the_official_rate_trains_every_weight_and_keeps_the_step1_identity(tiny_model_dir, tiny_mmpr_dir, tmp_path, train_in_process):
    """recipes/internvl3_1b_mpo.yaml's precision (bfloat16 weights, bf16 autocast, plain data
    parallel) at its lr 2e-7 on the tiny model: after 4 steps >= 99 % of the trained (master)
    weights have moved (2.1 % did when AdamW stepped the bf16 weights themselves); the model holds
    them rounded to bf16. Step 1 is still exactly ln 2 / 2 ln 2 with zero rewards (policy and
    reference compute in the same bf16), the logged gradient norm is an fp32 value, and a run
    resumed from step 2 continues from the fp32 masters, not from their rounding."""
    overrides = [
        f"model.name_or_path={tiny_model_dir}", f"data.meta_path={tiny_mmpr_dir / 'meta.json'}", "data.num_workers=0",
        "data.max_dynamic_patch=4", "data.video_frames=4", "report_to=none", "train.max_steps=4",
        "train.micro_batch_size=2", "train.gradient_accumulation_steps=1", "train.save_every=2", "train.keep_last=5",
    ]  # fmt: skip
    recipe = load_recipe(REPO / "recipes" / "internvl3_1b_mpo.yaml", [*overrides, f"output_dir={tmp_path / 'full'}"])
    assert (recipe.model.dtype, recipe.train.mixed_precision, recipe.train.lr) == ("bfloat16", "bf16", 2e-7)
    rows, trainer = _run(train_in_process, recipe)
    assert trainer.changed >= 0.99
    optimizer = trainer.optimizer.optimizer
    assert isinstance(optimizer, MasterWeightAdamW) and optimizer.masters
    for weight, master in optimizer.masters.items():
        assert weight.dtype == torch.bfloat16 and torch.equal(weight, master.bfloat16())

    first = rows[0]
    assert first["loss/dpo"] == pytest.approx(LN2, abs=1e-6) and first["loss/bco"] == pytest.approx(2 * LN2, abs=1e-6)
    assert first["rewards/chosen"] == first["rewards/rejected"] == 0.0
    assert first["loss"] == pytest.approx(1.2 * LN2 + first["loss/sft"], abs=1e-5)
    assert all(torch.tensor(r["grad_norm"]).bfloat16().item() != r["grad_norm"] for r in rows)

    checkpoint = tmp_path / "full" / "checkpoints" / "step-00000002"
    resumed_recipe = load_recipe(
        REPO / "recipes" / "internvl3_1b_mpo.yaml", [*overrides, f"output_dir={tmp_path / 'resumed'}", f"resume_from={checkpoint}"]
    )
    resumed_rows, resumed = _run(train_in_process, resumed_recipe)
    assert [r["loss"] for r in resumed_rows] == [r["loss"] for r in rows[2:]]
    for master, again in zip(optimizer.masters.values(), resumed.optimizer.optimizer.masters.values(), strict=True):
        assert torch.equal(master, again)
