"""LoRA: only the adapters train, the reference is the base model, saving writes the adapter and
a merged model that both score like the trained policy."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mpo.config import load_recipe
from mpo.model.forward import PreferenceForward
from mpo.model.loading import load_reference
from mpo.train.trainer import MPOTrainer

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "tiny_cpu.yaml"


def _logps(forward: PreferenceForward, batches) -> torch.Tensor:
    """``[chosen..., rejected...]`` summed log-probs of every batch, concatenated."""
    forward.eval()
    with torch.no_grad():
        outputs = [forward(batch).logps for batch in batches]
    return torch.cat([torch.cat([o.chosen_logps, o.rejected_logps]) for o in outputs])


def test_lora_trains_only_adapters_and_its_reference_is_the_base_model(tiny_model_dir, tiny_mmpr_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    out = tmp_path / "run"
    recipe = load_recipe(
        RECIPE,
        [
            f"model.name_or_path={tiny_model_dir}", f"data.meta_path={tiny_mmpr_dir / 'meta.json'}", f"output_dir={out}",
            "model.lora.enabled=true", "model.lora.r=4", "model.lora.alpha=8", "model.lora.vision=true",
            "model.lora.merge_on_save=true", "train.lr=1e-2", "train.max_steps=2", "train.save_every=0",
        ],
    )  # fmt: skip
    trainer = MPOTrainer(recipe)
    policy = trainer.accelerator.unwrap_model(trainer.policy)
    before = {name: p.detach().clone() for name, p in policy.named_parameters()}
    trainable = [name for name, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    assert any(".vision_tower." in name for name in trainable) and any(".language_model." in name for name in trainable)
    assert type(trainer.reference).__name__ == "DisabledAdapterReference"
    trainer.train()

    changed = {name for name, p in policy.named_parameters() if not torch.equal(p, before[name])}
    assert changed and all("lora_" in name for name in changed)
    assert {name for name in trainable if "lora_B" in name} <= changed  # every adapter moved off zero

    # Every pair of the example data (single-image, two-image, text-only, video), 6 at a time.
    pairs = [trainer.dataset[i] for i in range(len(trainer.dataset))]
    batches = [trainer.collate(pairs[i : i + 6]) for i in range(0, len(pairs), 6)]
    reference = torch.cat(
        [torch.cat([r.chosen_logps, r.rejected_logps]) for r in (trainer.reference(b, None) for b in batches)]
    )
    trained = _logps(policy, batches)

    base = _logps(PreferenceForward(load_reference(recipe.model)), batches)
    torch.testing.assert_close(reference, base, rtol=1e-5, atol=1e-4)
    assert (trained - base).abs().max() > 0.1  # the adapters did move the policy

    final = out / "final"
    assert (final / "adapter_model.safetensors").exists() and not (final / "model.safetensors").exists()
    adapter = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(tiny_model_dir), final)
    torch.testing.assert_close(_logps(PreferenceForward(adapter), batches), trained, rtol=1e-5, atol=1e-4)
    merged = AutoModelForImageTextToText.from_pretrained(final / "merged")
    assert not any("lora" in name for name in merged.state_dict())
    torch.testing.assert_close(_logps(PreferenceForward(merged), batches), trained, rtol=1e-5, atol=1e-4)


def test_lora_recipe_keys_reach_peft(tiny_model_dir):
    from peft import PeftModel

    from mpo.config import LoraConfig, ModelConfig
    from mpo.model.loading import load_policy

    lora = LoraConfig(enabled=True, r=8, alpha=4, dropout=0.25, target_modules=["q_proj", "v_proj"])
    model = load_policy(ModelConfig(name_or_path=str(tiny_model_dir), dtype="float32", lora=lora))
    assert isinstance(model, PeftModel)
    config = model.peft_config["default"]
    assert (config.r, config.lora_alpha, config.lora_dropout) == (8, 4, 0.25)
    adapted = {name.rsplit(".lora_A", 1)[0] for name, _ in model.named_parameters() if ".lora_A." in name}
    assert adapted and all(".language_model." in n and n.endswith(("q_proj", "v_proj")) for n in adapted)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == sum(
        p.numel() for name, p in model.named_parameters() if "lora_" in name
    )


@pytest.mark.parametrize("vision", [False, True])
def test_merged_state_dict_equals_peft_merge(tiny_model_dir, vision):
    """mpo.train.saving merges from a (gathered) state dict, as it must under ZeRO-3; it gives peft's
    own merge_and_unload, bit for bit."""
    from mpo.config import LoraConfig, ModelConfig
    from mpo.model.loading import load_policy
    from mpo.train.saving import merge_lora_state_dict

    lora = LoraConfig(enabled=True, r=4, alpha=8, vision=vision)
    model = load_policy(ModelConfig(name_or_path=str(tiny_model_dir), dtype="float32", lora=lora))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_()  # B starts at zero: make the update non-trivial
    merged = merge_lora_state_dict({k: v.clone() for k, v in model.state_dict().items()}, lora.alpha / lora.r, torch.float32)
    expected = model.merge_and_unload().state_dict()
    assert merged.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(merged[name], value), name


def test_merged_bf16_lora_model_keeps_small_updates(tiny_model_dir, tiny_mmpr_dir, tmp_path):
    """recipes/internvl3_8b_lora.yaml's settings (bf16 base, bf16 autocast, frozen vision tower,
    gradient checkpointing, lr 2e-5) for 3 steps: the adapter moves the summed log-probs by ~1e-2.
    Those updates are mostly below half a bf16 step of their base weights: merged into bf16 they
    would lose most of that (~6e-3 here). The merged model is written in fp32 and scores like base +
    adapter within fp32 rounding (both evaluated in fp32 on the bf16 base the adapter trained on)."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    out = tmp_path / "run"
    recipe = load_recipe(
        Path(__file__).resolve().parents[2] / "recipes" / "internvl3_8b_lora.yaml",
        [
            f"model.name_or_path={tiny_model_dir}", f"data.meta_path={tiny_mmpr_dir / 'meta.json'}", f"output_dir={out}",
            "data.num_workers=0", "data.max_dynamic_patch=4", "data.video_frames=4", "report_to=none",
            "model.lora.r=4", "model.lora.alpha=8", "model.lora.dropout=0.0", "train.max_steps=3",
            "train.micro_batch_size=2", "train.gradient_accumulation_steps=1", "train.save_every=0",
        ],
    )  # fmt: skip
    assert (recipe.model.dtype, recipe.train.mixed_precision, recipe.model.lora.merge_on_save) == ("bfloat16", "bf16", True)
    trainer = MPOTrainer(recipe)
    trainer.train()
    pairs = [trainer.dataset[i] for i in range(len(trainer.dataset))]
    batches = [trainer.collate(pairs[i : i + 6]) for i in range(0, len(pairs), 6)]

    def bf16_base():
        return AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).float()

    base = _logps(PreferenceForward(bf16_base()), batches)
    adapter = _logps(PreferenceForward(PeftModel.from_pretrained(bf16_base(), out / "final")), batches)
    merged_model = AutoModelForImageTextToText.from_pretrained(out / "final" / "merged")
    assert merged_model.dtype == torch.float32
    merged = _logps(PreferenceForward(merged_model), batches)
    rounded = _logps(PreferenceForward(merged_model.to(torch.bfloat16).float()), batches)
    assert (adapter - base).abs().max() > 5e-3
    torch.testing.assert_close(merged, adapter, rtol=0, atol=2e-4)
    assert (rounded - adapter).abs().max() > 2e-3
