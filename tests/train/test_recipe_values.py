"""Recipe values that used to train the wrong thing without an error, trained for real.

* ``train.max_grad_norm <= 0`` is "no clipping" (HF Trainer, TRL and DeepSpeed read it so): the
  run equals one whose clipping threshold is never reached, and the norm is still logged. Passed
  on to ``torch.nn.utils.clip_grad_norm_`` it scaled every gradient by ``max_norm / norm``: 0
  froze the model, -1 trained it backwards.
* ``train.save_best`` on a metric where higher is better keeps the step where it was highest.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

TIMING = {"tokens_per_s", "pairs_per_s"}


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def trained(rows_: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows_]


def test_max_grad_norm_zero_or_negative_means_no_clipping(tiny_model_dir, tiny_mmpr_dir, tmp_path, make_recipe, run_trainer):
    """0 and -1 log exactly what a threshold of 1e9 (never reached) logs, step by step: losses,
    rewards and the gradient norm; with 1.0 (reached: the norms are above it) the run differs."""
    runs = {}
    for norm in (1e9, 0.0, -1.0, 1.0):
        recipe = make_recipe(tiny_model_dir, tiny_mmpr_dir, tmp_path / f"norm{norm}", max_steps=4, lr=5e-3, max_grad_norm=norm)
        runs[norm] = trained(run_trainer(recipe))
    unclipped = runs[1e9]
    assert min(r["grad_norm"] for r in unclipped) > 1.0  # so clipping at 1.0 does something
    assert runs[0.0] == unclipped
    assert runs[-1.0] == unclipped
    assert all(math.isfinite(r["grad_norm"]) for r in runs[0.0])
    assert runs[1.0][0]["loss"] == unclipped[0]["loss"]  # the same first forward
    assert runs[1.0][-1]["loss"] != pytest.approx(unclipped[-1]["loss"], rel=1e-4)
    assert unclipped[-1]["loss"] < unclipped[0]["loss"] and unclipped[-1]["rewards/margins"] > 0  # it learns


def test_save_best_keeps_the_highest_margin_by_default(tiny_model_dir, tiny_mmpr_dir, tmp_path, make_recipe, train_in_process):
    """``save_best: eval/rewards/margins`` with no mode set keeps the step of the highest margin
    (it kept the lowest, ``min`` being the default for every metric)."""
    out = tmp_path / "run"
    recipe = make_recipe(tiny_model_dir, tiny_mmpr_dir, out, max_steps=3, lr=5e-3)
    recipe["data"]["eval_jsonl_path"] = str(tiny_mmpr_dir / "annotations" / "text_prefix_pair_sr0.5_wo_image.jsonl")
    recipe["data"]["eval_image_root"] = str(tiny_mmpr_dir)
    recipe["train"].update(eval_every=1, save_best="eval/rewards/margins")
    train_in_process(recipe)
    margins = [r["eval/rewards/margins"] for r in rows(out)]
    assert len(set(margins)) == 3 and margins.index(max(margins)) != margins.index(min(margins))
    best = json.loads((out / "best" / "best.json").read_text())
    assert best == {"step": 1 + margins.index(max(margins)), "metric": "eval/rewards/margins", "value": max(margins)}


@pytest.mark.slow
def test_max_grad_norm_zero_trains_the_same_under_ddp_and_zero2(launch_env, tiny_model_dir, tiny_mmpr_dir, tmp_path, launch,
                                                                 launch_probe):
    """Two real 2-process launches of one recipe with ``max_grad_norm: 0``: DDP (clipping in this
    trainer) and ZeRO-2 (clipping in DeepSpeed's step, ``gradient_clipping: 0``) log the same losses
    and gradient norms, and both learn. Under DDP the old code scaled the gradients by 0."""
    recipe = Path(__file__).resolve().parents[2] / "recipes" / "tiny_cpu.yaml"
    logged = {}
    for config in ("ddp.yaml", "zero2.yaml"):
        out = tmp_path / config.removesuffix(".yaml")
        args = [f"model.name_or_path={tiny_model_dir}", f"data.meta_path={tiny_mmpr_dir / 'meta.json'}", f"output_dir={out}",
                "train.max_steps=4", "train.save_every=0", "train.micro_batch_size=1", "train.gradient_accumulation_steps=2",
                "train.warmup_ratio=0", "train.lr=5e-3", "train.max_grad_norm=0", "report_to=none"]
        launch(launch_env, config, [str(launch_probe), str(recipe)], args)
        logged[config] = rows(out)
    ddp, zero2 = logged["ddp.yaml"], logged["zero2.yaml"]
    print("losses, max_grad_norm 0:", {name: [round(r["loss"], 4) for r in values] for name, values in logged.items()})
    for key in ("loss", "loss/dpo", "rewards/margins", "grad_norm"):
        assert [r[key] for r in ddp] == pytest.approx([r[key] for r in zero2], rel=1e-4, abs=1e-6), key
    assert min(r["grad_norm"] for r in ddp) > 1.0  # a threshold of 1 would have clipped every step
    assert ddp[-1]["loss"] < ddp[0]["loss"] - 0.1 and ddp[-1]["rewards/margins"] > 0
