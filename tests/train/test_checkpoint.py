"""Checkpoints a user can open: plain transformers (full fine-tuning) or peft (LoRA) loads every
``checkpoints/step-N/``, the processor loads from it too, the resolved recipe is beside it, and
the same files resume the run (ZeRO-3 and LoRA under ZeRO: ``tests/train/test_distributed.py``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mpo.config import load_recipe, recipe_from_dict
from mpo.errors import DataError
from mpo.train.saving import load_model_weights

# What accelerate adds to a checkpoint outside DeepSpeed: no model weights (the HF files are them).
ACCELERATE_FILES = {"optimizer.bin", "scheduler.bin", "random_states_0.pkl"}
HF_FILES = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "chat_template.jinja", "processor_config.json"}


OVERRIDES = ["loss.beta=0.2", "train.lr=1e-3"]


@pytest.fixture(scope="module")
def full_run(tiny_model_dir, tiny_mmpr_dir, tmp_path_factory, make_recipe, run_trainer) -> tuple[dict, Path]:
    """(recipe, output_dir) of 3 full fine-tuning steps with OVERRIDES, checkpoints at steps 2 and 3."""
    out = tmp_path_factory.mktemp("full") / "run"
    recipe = make_recipe(tiny_model_dir, tiny_mmpr_dir, out, max_steps=3, save_every=2, keep_last=5)
    run_trainer(recipe, OVERRIDES)
    return recipe, out


def test_checkpoint_opens_with_plain_transformers(full_run, tiny_model_dir):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    recipe, out = full_run
    step2, step3 = out / "checkpoints" / "step-00000002", out / "checkpoints" / "step-00000003"
    assert {p.name for p in step2.iterdir()} == HF_FILES | ACCELERATE_FILES | {"trainer_state.json", "recipe.yaml"}
    processor = AutoProcessor.from_pretrained(step2)
    assert processor.tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>") == AutoProcessor.from_pretrained(tiny_model_dir).tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    at_2 = AutoModelForImageTextToText.from_pretrained(step2).state_dict()
    at_3 = AutoModelForImageTextToText.from_pretrained(step3).state_dict()
    final = AutoModelForImageTextToText.from_pretrained(out / "final").state_dict()
    assert at_3.keys() == final.keys() and all(torch.equal(at_3[k], final[k]) for k in final)
    assert not torch.equal(at_2["model.language_model.layers.0.self_attn.q_proj.weight"], final["model.language_model.layers.0.self_attn.q_proj.weight"])

    # The resolved recipe (file plus overrides), in output_dir and in each checkpoint.
    resolved = recipe_from_dict(recipe, OVERRIDES).to_dict()
    assert load_recipe(out / "recipe.yaml").to_dict() == resolved
    assert load_recipe(step2 / "recipe.yaml").to_dict() == resolved
    assert resolved["loss"]["beta"] == 0.2


def test_resume_refuses_weights_of_another_model(full_run, tiny_model_dir, tmp_path):
    """Resume reads the HF weight files back one to one: a missing or a foreign weight is an error
    naming the file, never a half-loaded model."""
    from transformers import AutoModelForImageTextToText

    checkpoint = full_run[1] / "checkpoints" / "step-00000002"
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    load_model_weights(model, checkpoint)
    trained = load_file(checkpoint / "model.safetensors")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in trained.items())

    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    weights = dict(trained)
    del weights["model.language_model.norm.weight"]
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(DataError, match=r"1 weight\(s\) missing, e.g. model.language_model.norm.weight"):
        load_model_weights(model, broken)
    weights = dict(trained, **{"model.extra.weight": torch.zeros(1)})
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(DataError, match=r"model.safetensors: weight model.extra.weight is not in the model"):
        load_model_weights(model, broken)


def test_lora_checkpoint_opens_with_peft_and_resumes(tiny_model_dir, tiny_mmpr_dir, tmp_path, make_recipe, run_trainer):
    """A LoRA checkpoint is the adapter: PeftModel puts it on the base model, and resuming from it
    continues like the uninterrupted run (adapter dropout on: the RNG state comes back too)."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    out = tmp_path / "full"
    recipe = make_recipe(tiny_model_dir, tiny_mmpr_dir, out, max_steps=3, save_every=1, keep_last=5, lr=2e-2)
    recipe["model"]["lora"] = {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.1}
    full = run_trainer(recipe)
    step1 = out / "checkpoints" / "step-00000001"
    assert (step1 / "adapter_model.safetensors").exists() and not (step1 / "model.safetensors").exists()
    AutoProcessor.from_pretrained(step1)
    opened = {}
    for step in (1, 3):
        checkpoint = out / "checkpoints" / f"step-{step:08d}"
        adapter = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(tiny_model_dir), checkpoint)
        opened[step] = {k.replace(".default", ""): v for k, v in adapter.state_dict().items() if "lora_" in k}
        saved = load_file(checkpoint / "adapter_model.safetensors")
        assert opened[step].keys() == saved.keys() and all(torch.equal(opened[step][k], saved[k]) for k in saved)
    final = load_file(out / "final" / "adapter_model.safetensors")
    assert final.keys() == opened[3].keys() and all(torch.equal(final[k], opened[3][k]) for k in final)
    assert any(not torch.equal(opened[1][k], final[k]) for k in final if "lora_B" in k)

    resumed = run_trainer(dict(recipe, output_dir=str(tmp_path / "resumed"), resume_from=str(step1)))
    assert [r["step"] for r in resumed] == [2, 3]
    for key in ("loss", "loss/dpo", "loss/bco", "loss/sft", "bco/delta", "grad_norm"):
        assert [r[key] for r in resumed] == pytest.approx([r[key] for r in full[1:]], rel=1e-6, abs=1e-7), key
    state = json.loads((tmp_path / "resumed" / "checkpoints" / "step-00000003" / "trainer_state.json").read_text())
    assert state["reward_shift"]["num_updates"] == 3
