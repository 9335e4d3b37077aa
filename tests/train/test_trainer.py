"""The training loop end to end on the tiny model: the logged numbers, resume, saving, bad input.

Runs are in-process (one Accelerator at a time, its global state reset after each) on the shared
tiny checkpoint and the example MMPR directory.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mpo.config import recipe_from_dict
from mpo.train.trainer import MPOTrainer

LN2 = math.log(2.0)
REQUIRED_KEYS = {
    "step", "loss", "loss/dpo", "loss/bco", "loss/sft", "bco/delta", "rewards/chosen", "rewards/rejected",
    "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected", "lr", "grad_norm", "tokens_per_s",
}


def test_first_step_is_the_hand_derived_value_and_metrics_are_complete(tiny_model_dir, tiny_mmpr_dir, tmp_path, make_recipe, run_trainer):
    """At step 1 the policy equals its reference: every reward is 0 and delta is 0, so
    L_dpo = -log sigmoid(0) = ln 2, L_bco = 2 ln 2 and the total is 0.8 ln2 + 0.2 * 2 ln2 + L_sft
    = 1.2 ln2 + L_sft."""
    rows = run_trainer(make_recipe(tiny_model_dir, tiny_mmpr_dir, tmp_path / "run", max_steps=2))
    assert len(rows) == 2 and [r["step"] for r in rows] == [1, 2]
    assert REQUIRED_KEYS <= set(rows[0])
    first = rows[0]
    assert first["loss/dpo"] == pytest.approx(LN2, abs=1e-6)
    assert first["loss/bco"] == pytest.approx(2 * LN2, abs=1e-6)
    assert first["loss"] == pytest.approx(1.2 * LN2 + first["loss/sft"], abs=1e-5)
    assert first["rewards/chosen"] == first["rewards/rejected"] == first["bco/delta"] == 0.0
    assert first["rewards/accuracies"] == 0.0
    # one optimizer step later the policy has moved away from the reference
    assert rows[1]["rewards/margins"] != 0.0
    assert first["lr"] == pytest.approx(2e-3)


def test_micro_batch_split_does_not_change_the_losses(tiny_model_dir, tiny_mmpr_dir, tmp_path, make_recipe, run_trainer):
    """Batch 4 x accumulation 1 and batch 2 x accumulation 2 see the same pairs per step
    (mpo.data.batch_order) and average the same per-pair terms, so they log the same losses and delta.
    The second run also encodes its pairs in 2 background DataLoader workers."""
    a = run_trainer(make_recipe(tiny_model_dir, tiny_mmpr_dir, tmp_path / "a", micro_batch_size=4, gradient_accumulation_steps=1))
    b = run_trainer(make_recipe(tiny_model_dir, tiny_mmpr_dir, tmp_path / "b", micro_batch_size=2, gradient_accumulation_steps=2),
            ["data.num_workers=2"])
    for key in ("loss", "loss/dpo", "loss/bco", "loss/sft", "bco/delta", "rewards/margins", "grad_norm"):
        assert [r[key] for r in a] == pytest.approx([r[key] for r in b], rel=1e-4, abs=1e-6), key
    assert a[2]["bco/delta"] != 0.0  # delta really moved by step 3


def test_resumed_run_reproduces_the_uninterrupted_run(tiny_model_dir, tiny_mmpr_dir, tmp_path, make_recipe, run_trainer):
    """4 steps straight vs the same run resumed from its step-2 checkpoint in a fresh directory:
    steps 3 and 4 log the same losses, and the reward shift delta is restored, not restarted."""
    recipe = make_recipe(tiny_model_dir, tiny_mmpr_dir, tmp_path / "full", max_steps=4, save_every=2, keep_last=5)
    full = run_trainer(recipe)
    checkpoint = tmp_path / "full" / "checkpoints" / "step-00000002"
    assert json.loads((checkpoint / "trainer_state.json").read_text())["step"] == 2
    resumed_recipe = dict(recipe, output_dir=str(tmp_path / "resumed"), resume_from=str(checkpoint))
    resumed = run_trainer(resumed_recipe)
    assert [r["step"] for r in resumed] == [3, 4]
    for key in ("loss", "loss/dpo", "loss/bco", "loss/sft", "bco/delta", "lr"):
        assert [r[key] for r in resumed] == pytest.approx([r[key] for r in full[2:]], rel=1e-5, abs=1e-7), key
    assert full[2]["bco/delta"] != 0.0


def test_latest_skips_a_checkpoint_torn_while_saving(tiny_model_dir, tiny_mmpr_dir, tmp_path, make_recipe, run_trainer):
    """A crash during a save leaves only a ``.tmp`` directory; ``resume_from: latest`` ignores it
    and resumes from the last complete checkpoint, cutting metrics.jsonl back to that step."""
    recipe = make_recipe(tiny_model_dir, tiny_mmpr_dir, tmp_path / "run", max_steps=2, save_every=1, keep_last=5)
    run_trainer(recipe)
    checkpoints = tmp_path / "run" / "checkpoints"
    shutil.rmtree(checkpoints / "step-00000002")
    (checkpoints / "step-00000002.tmp").mkdir()  # what a crash mid-save leaves behind
    rows = run_trainer(dict(recipe, resume_from="latest", train=dict(recipe["train"], max_steps=3)))
    assert [r["step"] for r in rows] == [1, 2, 3]


def test_final_model_reloads_in_plain_transformers(tiny_model_dir, tiny_mmpr_dir, tmp_path, make_recipe, run_trainer):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    run_trainer(make_recipe(tiny_model_dir, tiny_mmpr_dir, tmp_path / "run", max_steps=2))
    final = tmp_path / "run" / "final"
    trained = AutoModelForImageTextToText.from_pretrained(final)
    start = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    AutoProcessor.from_pretrained(final)
    changed = [n for n, p in trained.state_dict().items() if not torch.equal(p, start.state_dict()[n])]
    assert "model.language_model.layers.0.self_attn.q_proj.weight" in changed
    assert "model.vision_tower.embeddings.patch_embeddings.projection.weight" in changed


def test_frozen_vision_tower_stays_identical(tiny_model_dir, tiny_mmpr_dir, tmp_path, make_recipe, run_trainer):
    from transformers import AutoModelForImageTextToText

    recipe = make_recipe(tiny_model_dir, tiny_mmpr_dir, tmp_path / "run", max_steps=2)
    recipe["model"]["freeze_vision"] = True
    run_trainer(recipe)
    trained = AutoModelForImageTextToText.from_pretrained(tmp_path / "run" / "final").state_dict()
    start = AutoModelForImageTextToText.from_pretrained(tiny_model_dir).state_dict()
    vision = [n for n in start if n.startswith("model.vision_tower.")]
    assert vision and all(torch.equal(trained[n], start[n]) for n in vision)
    assert not torch.equal(trained["model.multi_modal_projector.linear_1.weight"], start["model.multi_modal_projector.linear_1.weight"])


def test_sft_only_weights_run_without_reference(tiny_model_dir, tiny_mmpr_dir, tmp_path, make_recipe):
    """Weights 0/0/1: only loss/sft is logged, the total equals it, no reference model is built."""
    recipe = make_recipe(tiny_model_dir, tiny_mmpr_dir, tmp_path / "run", max_steps=1)
    recipe["loss"] = {"dpo_weight": 0.0, "bco_weight": 0.0, "sft_weight": 1.0}
    trainer = MPOTrainer(recipe_from_dict(recipe))
    assert trainer.reference is None
    trainer.train()
    (row,) = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert "loss/dpo" not in row and "loss/bco" not in row and "rewards/chosen" not in row
    assert row["loss"] == pytest.approx(row["loss/sft"], abs=1e-7)


def test_bad_samples_are_skipped_and_listed(tiny_model_dir, tiny_mmpr_dir, tmp_path, make_recipe, run_trainer):
    data = tmp_path / "data"
    shutil.copytree(tiny_mmpr_dir, data)
    annotation = data / "annotations" / "shapes_pairs_vqa_correctness_rules.jsonl"
    lines = annotation.read_text().splitlines()
    lines[1] = "{not json"
    lines[3] = json.dumps({"image": "shapes_00.png", "question": "<image>\nQ?", "chosen": "a"})
    annotation.write_text("\n".join(lines) + "\n")
    (data / "images" / "shapes_02.png").write_bytes(b"not a png")  # corrupt, found when decoded
    recipe = make_recipe(tiny_model_dir, data, tmp_path / "run", max_steps=2, micro_batch_size=4, gradient_accumulation_steps=2)
    recipe["data"]["on_bad_sample"] = "skip"
    recipe["data"]["shuffle"] = False
    rows = run_trainer(recipe)
    assert len(rows) == 2
    skipped = [json.loads(x) for x in (tmp_path / "run" / "skipped.jsonl").read_text().splitlines()]
    assert {(s["line"], s["field"]) for s in skipped} == {(2, "<line>"), (4, "rejected"), (3, "image")}
    assert all(s["file"].endswith("shapes_pairs_vqa_correctness_rules.jsonl") for s in skipped)


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mpo", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_cli_bad_inputs_are_one_line_errors(tiny_model_dir, tiny_mmpr_dir, escaping_annotation, tmp_path, make_recipe):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps(make_recipe(tiny_model_dir, tiny_mmpr_dir, tmp_path / "run")))
    typo = _cli("train", str(recipe), "train.learning_rate=1", cwd=tmp_path)
    assert typo.returncode == 2
    assert typo.stderr.strip().splitlines()[-1].startswith(f"error: {recipe}: unknown key train.learning_rate: did you mean train.lr?")

    annotation = escaping_annotation
    bad = _cli("train", str(recipe), f"data.meta_path={annotation.parents[1] / 'meta.json'}", cwd=tmp_path)
    assert bad.returncode == 2
    (last,) = bad.stderr.strip().splitlines()[-1:]
    assert last.startswith(f"error: {annotation}:3: image: path '../../../etc/passwd' is outside the image root")
    assert "Traceback" not in bad.stderr


def test_gradient_checkpointing_and_bf16_autocast_train_the_same_objective(tiny_model_dir, tiny_mmpr_dir, tmp_path, make_recipe, run_trainer):
    """Activation checkpointing recomputes the forward in backward: same numbers as without it.
    bf16 autocast changes rounding only: its step-1 DPO/BCO terms are still exactly ln 2 / 2 ln 2
    (policy and reference round identically) and its SFT term is close to float32's."""
    plain = run_trainer(make_recipe(tiny_model_dir, tiny_mmpr_dir, tmp_path / "a", max_steps=2))
    recipe = make_recipe(tiny_model_dir, tiny_mmpr_dir, tmp_path / "b", max_steps=2)
    recipe["model"]["gradient_checkpointing"] = True
    checkpointed = run_trainer(recipe)
    for key in ("loss", "loss/sft", "rewards/margins", "grad_norm"):
        assert [r[key] for r in checkpointed] == pytest.approx([r[key] for r in plain], rel=1e-5, abs=1e-7), key
    bf16 = run_trainer(make_recipe(tiny_model_dir, tiny_mmpr_dir, tmp_path / "c", max_steps=1, mixed_precision="bf16"))
    assert bf16[0]["loss/dpo"] == pytest.approx(LN2, abs=1e-6)
    assert bf16[0]["loss/bco"] == pytest.approx(2 * LN2, abs=1e-6)
    assert bf16[0]["loss/sft"] == pytest.approx(plain[0]["loss/sft"], rel=2e-2)


