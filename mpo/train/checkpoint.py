"""Checkpoints a user can open and a run can resume from, written atomically.

A checkpoint is ``output_dir/checkpoints/step-00000010/``:

* the model as a plain HF directory with its processor files (:func:`mpo.saving.write_model`):
  ``AutoModelForImageTextToText.from_pretrained`` / ``AutoProcessor.from_pretrained`` open it,
  or with LoRA the adapter, which ``PeftModel.from_pretrained`` puts on the base model;
* accelerate's state (optimizer, scheduler, every RNG; under DeepSpeed its own engine files);
* ``trainer_state.json`` (step, reward shift delta, skipped samples, best eval value, the recipe)
  and ``recipe.yaml``, the recipe the run trains with, overrides applied.

Outside DeepSpeed the HF weight files *are* the resumable weights: accelerate is told to write no
copy of its own and resume reads them back (:func:`keep_weights_loadable`), so a checkpoint holds
the weights once. Under DeepSpeed the engine's files are what resumes (the fp32 master weights
and optimizer partitions), and the HF files are an extra 16-bit copy (gathered under ZeRO-3).

It is written under a ``.tmp`` name and renamed only once complete, so a crash while saving
leaves the previous checkpoint as the newest loadable one; a save that fails (a full disk, an I/O
error) removes its ``.tmp`` and ends the run with one line (:mod:`mpo.train.save_failures`). The data position needs no saving:
the order of pairs is a pure function of (seed, step), see :mod:`mpo.data.batch_order`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch

from mpo.config import Recipe
from mpo.model.loading import DTYPES
from mpo.jsonl import fsync_directory, write_json_atomic, write_text_atomic
from mpo.train.save_failures import written
from mpo.train.saving import load_model_weights, write_model

CHECKPOINT_RE = re.compile(r"^step-(\d{8})$")
STATE_FILE = "trainer_state.json"
RECIPE_FILE = "recipe.yaml"
BEST_FILE = "best.json"


def checkpoint_dirs(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if CHECKPOINT_RE.match(p.name) and (p / STATE_FILE).exists()]
    return sorted(found, key=lambda p: int(CHECKPOINT_RE.match(p.name).group(1)))


def resolve_resume(resume_from: str, output_dir: str | Path) -> Path | None:
    """``latest`` -> the newest complete checkpoint (or ``None`` for a fresh run); else the path."""
    if not resume_from:
        return None
    if resume_from == "latest":
        found = checkpoint_dirs(output_dir)
        return found[-1] if found else None
    path = Path(resume_from)
    if not (path / STATE_FILE).exists():
        raise FileNotFoundError(f"resume_from: {path} is not a complete checkpoint (no {STATE_FILE})")
    return path


def untouched_rng(device: torch.device):
    """A context whose random draws leave the global RNG (CPU, and ``device`` if CUDA) as it was.

    Creating a DataLoader iterator draws a seed from it. Made inside this context, neither the
    training loader (created after a resume restored the RNG, but before step 1 otherwise) nor an
    evaluation's loader shifts the dropout masks of the steps after it.
    """
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


def keep_weights_loadable(accelerator) -> None:
    """Makes ``save_state`` / ``load_state`` leave the model weights to the HF files.

    accelerate would write its own copy of every prepared model (keys prefixed by the wrapper, no
    ``config.json``: nothing else opens it). Its state hooks drop that copy when saving and load
    the weights from the checkpoint's HF files when resuming. DeepSpeed engines never reach the
    hooks (their engine saves and loads itself), so under DeepSpeed nothing changes.
    """

    def skip_weights(models: list, weights: list, output_dir: str) -> None:
        weights.clear()

    def load_weights(models: list, input_dir: str) -> None:
        for model in models:
            load_model_weights(accelerator.unwrap_model(model).model, Path(input_dir))
        models.clear()

    accelerator.register_save_state_pre_hook(skip_weights)
    accelerator.register_load_state_pre_hook(load_weights)


def replace_dir(tmp: Path, final: Path) -> None:
    """Puts a completely written directory in place of ``final`` (the step-N, best and final
    directories are written under a ``.tmp`` name first), durably."""
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_directory(final.parent)


def checkpoint_path(recipe: Recipe, step: int) -> Path:
    """Where the checkpoint of ``step`` is saved."""
    return Path(recipe.output_dir) / "checkpoints" / f"step-{step:08d}"


def save_checkpoint(accelerator, policy, processor, recipe: Recipe, step: int, trainer_state: dict) -> Path:
    """Saves a checkpoint (every rank takes part: ZeRO shards, gathers); returns its path."""
    final = checkpoint_path(recipe, step)
    tmp = final.with_name(f"{final.name}.tmp")
    with written(tmp, "checkpoint"):
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        write_model(accelerator, policy, processor, tmp)
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            write_json_atomic(tmp / STATE_FILE, trainer_state)
            write_text_atomic(tmp / RECIPE_FILE, recipe.to_yaml())
            replace_dir(tmp, final)
        keep_last = recipe.train.keep_last
        for old in checkpoint_dirs(recipe.output_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def save_best(accelerator, policy, processor, recipe: Recipe, record: dict) -> Path:
    """Writes ``output_dir/best``: the model files (not resumable), ``best.json`` (``record``:
    step, metric, value) and ``recipe.yaml``; atomically, like a checkpoint."""
    final = Path(recipe.output_dir) / "best"
    tmp = final.with_name("best.tmp")
    with written(tmp, "best model"):
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        write_model(accelerator, policy, processor, tmp)
        if accelerator.is_main_process:
            write_json_atomic(tmp / BEST_FILE, record)
            write_text_atomic(tmp / RECIPE_FILE, recipe.to_yaml())
            replace_dir(tmp, final)
    accelerator.wait_for_everyone()
    return final


def save_final_model(accelerator, policy, processor, recipe: Recipe) -> Path:
    """Writes ``output_dir/final`` atomically with :func:`write_model` (a merged model in
    ``model.lora.merge_dtype`` under ``final/merged`` too with ``model.lora.merge_on_save``)."""
    out = Path(recipe.output_dir) / "final"
    tmp = out.with_name("final.tmp")
    lora = recipe.model.lora
    with written(tmp, "final model"):
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        write_model(accelerator, policy, processor, tmp, DTYPES[lora.merge_dtype] if lora.merge_on_save else None)
        if accelerator.is_main_process:
            replace_dir(tmp, out)
    accelerator.wait_for_everyone()
    return out


def load_checkpoint(accelerator, path: Path) -> dict:
    """Restores accelerate's state (and the weights, see :func:`keep_weights_loadable`) from
    ``path`` and returns its trainer state."""
    accelerator.load_state(str(path))
    return json.loads((path / STATE_FILE).read_text())
