"""Model files a user can open: a plain HF directory (or a peft adapter) that loads without mpo.

:func:`write_model` writes them for the final model, for every checkpoint and for the best one
(:mod:`mpo.train.checkpoint` places those directories);
:func:`load_model_weights` reads a checkpoint's back into the live model on resume.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from mpo.errors import DataError
from mpo.model.loading import base_model
from mpo.train.distributed import zero_stage


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


def write_model(accelerator, policy, processor, directory: Path, merge_dtype: torch.dtype | None = None) -> None:
    """Writes the policy as a plain HF directory (or a peft adapter) and the processor files.

    Full fine-tuning writes the whole model with safetensors (``AutoModelForImageTextToText``
    loads it); LoRA writes the adapter (``PeftModel.from_pretrained`` on the base loads it) and,
    with ``merge_dtype``, a merged full model in that dtype under ``directory/merged``. Under
    ZeRO-3 this is a collective (every rank calls it, DeepSpeed gathers the shards into one 16-bit
    state dict on the main process, which needs ``zero3_save_16bit_model: true`` in the launch
    config); only the main process writes. Weights are named as the live model names them
    (:func:`_save_hf`), so :func:`load_model_weights` reads them back one to one.
    """
    zero3 = zero_stage(accelerator) == 3
    if not (zero3 or accelerator.is_main_process):
        return  # elsewhere the state dict is a local copy, which only the main process needs
    gathered = accelerator.get_state_dict(policy)
    if not accelerator.is_main_process:
        return
    state_dict = _strip_wrapper(gathered)
    model = accelerator.unwrap_model(policy).model
    lora = model is not base_model(model)
    if lora:
        model.save_pretrained(directory, state_dict=state_dict, safe_serialization=True)  # the adapter only (peft's filter)
    else:
        _save_hf(model, directory, _drop_tied_copies(state_dict, model))
    processor.save_pretrained(directory)
    if lora and merge_dtype is not None:
        hf_model = base_model(model)
        scaling = model.peft_config["default"].lora_alpha / model.peft_config["default"].r
        merged_state = _drop_tied_copies(merge_lora_state_dict(state_dict, scaling, merge_dtype), hf_model)
        _save_hf(hf_model, directory / "merged", merged_state, merge_dtype)
        processor.save_pretrained(directory / "merged")


def _weight_files(directory: Path) -> list[Path]:
    """The safetensors files of an HF directory: one, or the shards its index names."""
    index = directory / "model.safetensors.index.json"
    if index.exists():
        return [directory / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    return [directory / "model.safetensors"]


@torch.no_grad()
def load_model_weights(model: torch.nn.Module, directory: Path) -> None:
    """Copies the weights :func:`write_model` wrote in ``directory`` into ``model``, in place.

    Every weight of the file must be one of the model's and every weight of the model must be in
    the file (a tied copy aside), so a checkpoint of another model is refused, not half-loaded.

    Args:
        model: the live HF model (or peft model) to resume, unwrapped.
        directory: a checkpoint written by :func:`write_model`.
    """
    if model is not base_model(model):
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        path = directory / "adapter_model.safetensors"
        result = set_peft_model_state_dict(model, load_file(str(path)))
        if result.unexpected_keys:
            raise DataError(f"adapter weight {result.unexpected_keys[0]} is not in the model", file=str(path))
        return
    from safetensors import safe_open

    live = model.state_dict()
    loaded = set()
    for path in _weight_files(directory):
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                if key not in live:
                    raise DataError(f"weight {key} is not in the model", file=str(path))
                live[key].copy_(handle.get_tensor(key))
                loaded.add(key)
    missing = sorted(set(live) - loaded - set(model.get_expanded_tied_weights_keys()))
    if missing:
        raise DataError(f"{len(missing)} weight(s) missing, e.g. {missing[0]}", file=str(directory))
