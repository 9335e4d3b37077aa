"""Loading the policy: gradient checkpointing around a frozen vision tower, and the key names a
ZeRO-3 save writes."""

from __future__ import annotations

import pytest
import torch

from mpo.data.layouts import collate_plain
from mpo.config import LoraConfig, ModelConfig
from mpo.model.forward import PreferenceForward
from mpo.model.loading import base_model
from mpo.model.loading import load_policy


@pytest.fixture(scope="module")
def image_batch(tiny_pairs, tiny_processor):
    """A single-image and a two-image pair of the example data, in the plain layout."""
    return collate_plain([tiny_pairs["single_image"], tiny_pairs["multi_image"]], tiny_processor.tokenizer.pad_token_id)


def _vision_backward_calls(model: torch.nn.Module) -> list[int]:
    """Counts, per backward, the vision-tower layers whose output a gradient flows into."""
    calls: list[int] = []

    def on_forward(module, args, output: torch.Tensor) -> None:
        if output.requires_grad:
            output.register_hook(lambda grad: calls.append(1))

    for layer in base_model(model).model.vision_tower.encoder.layer:
        layer.register_forward_hook(on_forward)
    return calls


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_checkpointing_never_backpropagates_through_a_frozen_vision_tower(tiny_model_dir, image_batch, lora):
    """A frozen vision tower (no adapters in it) gets no backward, with or without activation
    checkpointing; checkpointing changes no gradient of what does train, bit for bit. (transformers'
    checkpointing hooks make the patch embedding's output require grad, which made every frozen
    ViT layer recompute and backpropagate: 2 layers x 1 backward here.)"""
    gradients = {}
    for checkpointing in (False, True):
        torch.manual_seed(0)  # the same LoRA initialisation both times
        config = ModelConfig(
            name_or_path=str(tiny_model_dir), dtype="float32", freeze_vision=True,
            gradient_checkpointing=checkpointing, lora=LoraConfig(enabled=lora, r=4, alpha=8, dropout=0.0),
        )  # fmt: skip
        model = load_policy(config)
        model.train()
        calls = _vision_backward_calls(model)
        logps = PreferenceForward(model)(image_batch).logps
        (logps.chosen_logps - 0.5 * logps.rejected_logps).sum().backward()
        assert calls == [], f"checkpointing={checkpointing}"
        gradients[checkpointing] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert gradients[True].keys() == gradients[False].keys()
    assert not any(".vision_tower." in name for name in gradients[True])
    for name, grad in gradients[False].items():
        assert grad is not None and torch.equal(gradients[True][name], grad), name



def test_final_model_is_written_with_the_current_key_layout(tiny_model_dir, tiny_mmpr_dir, tmp_path):
    """The checkpoint comes in the layout transformers writes by default and the hub's -hf
    checkpoints use (``language_model.model.*``); the final model is written with the keys the
    loaded model has (``model.language_model.*``), the same under every launch config (under ZeRO-3
    transformers would reverse a different set of renamings, see :func:`mpo.saving._save_hf`)."""
    import json

    from safetensors import safe_open
    from transformers import AutoModelForImageTextToText

    from mpo.config import recipe_from_dict
    from mpo.train.trainer import MPOTrainer

    with safe_open(str(tiny_model_dir / "model.safetensors"), "pt") as source:
        assert any(key.startswith("language_model.model.") for key in source.keys())
    recipe = {
        "model": {"name_or_path": str(tiny_model_dir), "dtype": "float32"},
        "data": {"meta_path": str(tiny_mmpr_dir / "meta.json"), "max_dynamic_patch": 4, "video_frames": 4},
        "train": {"max_steps": 1, "micro_batch_size": 2, "mixed_precision": "no"},
        "output_dir": str(tmp_path / "run"),
    }
    MPOTrainer(recipe_from_dict(recipe)).train()
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    tied = model.get_expanded_tied_weights_keys()
    with safe_open(str(tmp_path / "run" / "final" / "model.safetensors"), "pt") as saved:
        assert set(saved.keys()) == {key for key in model.state_dict() if key not in tied}
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text())["step"] == 1
