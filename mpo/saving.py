"""The final model: a plain HF directory (or a peft adapter) that loads without mpo."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from mpo.config import Recipe


def _strip_wrapper(state_dict: dict, prefix: str = "model.") -> dict:
    """Keys of :class:`mpo.forward.PreferenceForward` carry a ``model.`` prefix; HF's do not."""
    return {key[len(prefix) :]: value for key, value in state_dict.items() if key.startswith(prefix)}


def save_final_model(accelerator, policy, processor, recipe: Recipe) -> Path:
    """Writes ``output_dir/final`` atomically (under ZeRO-3 the weights are gathered first).

    Full fine-tuning writes the whole model with safetensors; LoRA writes the adapter (and, with
    ``model.lora.merge_on_save``, a merged full model under ``final/merged``).
    """
    out = Path(recipe.output_dir) / "final"
    tmp = out.with_name("final.tmp")
    state_dict = _strip_wrapper(accelerator.get_state_dict(policy))  # collective: every rank calls it
    model = accelerator.unwrap_model(policy).model
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        processor.save_pretrained(tmp)
        if recipe.model.lora.enabled and recipe.model.lora.merge_on_save:
            merged = model.merge_and_unload()
            merged.save_pretrained(tmp / "merged", safe_serialization=True)
            processor.save_pretrained(tmp / "merged")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    accelerator.wait_for_everyone()
    return out
