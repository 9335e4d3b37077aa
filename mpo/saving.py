"""The final model: a plain HF directory (or a peft adapter) that loads without mpo."""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path

import torch

from mpo.config import Recipe
from mpo.modeling import DTYPES


def _strip_wrapper(state_dict: dict, prefix: str = "model.") -> dict:
    """Keys of :class:`mpo.forward.PreferenceForward` carry a ``model.`` prefix; HF's do not."""
    return {key[len(prefix) :]: value for key, value in state_dict.items() if key.startswith(prefix)}


def _drop_tied_copies(state_dict: dict, model) -> dict:
    """Removes weights tied to another (a tied LM head), as ``save_pretrained`` does by storage.

    A gathered (ZeRO) or merged state dict holds separate tensors for tied weights, so the
    storage check cannot see the tie and would write the embedding twice.
    """
    tied = model.get_expanded_tied_weights_keys()
    return {key: value for key, value in state_dict.items() if not (key in tied and tied[key] in state_dict)}


def merge_lora_state_dict(state_dict: dict, scaling: float, dtype: torch.dtype, adapter: str = "default") -> dict:
    """The plain HF state dict of a LoRA model with its adapters folded in: W + scaling * B @ A.

    Works on a (gathered) state dict rather than merging the live modules, so it is the same
    under ZeRO-3, where the modules hold only this process's shard, and it leaves the trained
    model untouched. The sum is formed in fp32 and rounded once, to ``dtype``.

    Args:
        state_dict: peft keys (``base_model.model.<hf key with .base_layer>``, ``...lora_A.<adapter>.weight``).
        scaling: ``lora_alpha / r``, peft's scale of the update.
        dtype: the merged model's dtype (every floating tensor is cast to it).
        adapter: the peft adapter name.
    """
    merged = {}
    for key, value in state_dict.items():
        if ".lora_A." in key or ".lora_B." in key:
            continue
        if key.endswith(".base_layer.weight"):
            module = key[: -len(".base_layer.weight")]
            down = state_dict[f"{module}.lora_A.{adapter}.weight"].float()
            up = state_dict[f"{module}.lora_B.{adapter}.weight"].float()
            value = value.float() + scaling * (up @ down)
        merged[key.removeprefix("base_model.model.").replace(".base_layer.", ".")] = value.to(dtype) if value.is_floating_point() else value
    return merged


def _save_hf(model, directory: Path, state_dict: dict, dtype: torch.dtype | None = None) -> None:
    """``save_pretrained`` with the keys the model has now, whatever the loaded checkpoint had.

    By default transformers reverses the key renamings it applied at load time, and which ones it
    records depends on how the model was loaded (under ZeRO-3 it records the legacy renamings too,
    writing ``language_model.model.model.*``); ``save_original_format=False`` writes the same
    current-format keys under every launch config, keys every transformers 5 loader reads.

    Args:
        dtype: the dtype of ``state_dict``'s weights when it is not the model's own; written into
            the config (and its sub-configs), which ``from_pretrained`` loads the weights in.
    """
    model.save_pretrained(directory, state_dict=state_dict, safe_serialization=True, save_original_format=False)
    if dtype is not None:
        config = copy.deepcopy(model.config)
        for part in [config, *(getattr(config, name) for name in config.sub_configs)]:
            part.dtype = dtype
        config.save_pretrained(directory)


def save_final_model(accelerator, policy, processor, recipe: Recipe) -> Path:
    """Writes ``output_dir/final`` atomically (under ZeRO-3 the weights are gathered first).

    Full fine-tuning writes the whole model with safetensors; LoRA writes the adapter (and, with
    ``model.lora.merge_on_save``, a merged full model in ``model.lora.merge_dtype`` under
    ``final/merged``). Under ZeRO-3 the launch config needs ``zero3_save_16bit_model: true``
    (every ``launch/zero3*.yaml`` sets it): that is what makes DeepSpeed gather the shards into
    one state dict on the main process.
    """
    out = Path(recipe.output_dir) / "final"
    tmp = out.with_name("final.tmp")
    # Collective under ZeRO-3 (every rank must call it); the gathered dict exists on the main
    # process only (None elsewhere).
    gathered = accelerator.get_state_dict(policy)
    if accelerator.is_main_process:
        from mpo.forward import base_model

        state_dict = _strip_wrapper(gathered)
        model = accelerator.unwrap_model(policy).model
        shutil.rmtree(tmp, ignore_errors=True)
        lora = recipe.model.lora
        if lora.enabled:
            model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)  # peft keeps the adapter only
        else:
            _save_hf(model, tmp, _drop_tied_copies(state_dict, model))
        processor.save_pretrained(tmp)
        if lora.enabled and lora.merge_on_save:
            hf_model = base_model(model)
            dtype = DTYPES[lora.merge_dtype]
            merged = _drop_tied_copies(merge_lora_state_dict(state_dict, lora.alpha / lora.r, dtype), hf_model)
            _save_hf(hf_model, tmp / "merged", merged, dtype)
            processor.save_pretrained(tmp / "merged")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    accelerator.wait_for_everyone()
    return out
