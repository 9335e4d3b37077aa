"""Resumable checkpoints, written atomically.

A checkpoint is ``output_dir/checkpoints/step-00000010/``: accelerate's state (model, optimizer,
scheduler, every RNG) plus ``trainer_state.json`` (step, reward shift delta, skipped samples, the
recipe). It is written under a ``.tmp`` name and renamed only once complete, so a crash while
saving leaves the previous checkpoint as the newest loadable one. The data position needs no
saving: the order of pairs is a pure function of (seed, step), see :mod:`mpo.sampling`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

CHECKPOINT_RE = re.compile(r"^step-(\d{8})$")
STATE_FILE = "trainer_state.json"


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


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


def save_checkpoint(accelerator, output_dir: str | Path, step: int, trainer_state: dict, keep_last: int) -> Path:
    """Saves a resumable checkpoint on every rank (ZeRO shards included); returns its path."""
    root = Path(output_dir) / "checkpoints"
    final = root / f"step-{step:08d}"
    tmp = root / f"step-{step:08d}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json_atomic(tmp / STATE_FILE, trainer_state)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in checkpoint_dirs(output_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: Path) -> dict:
    """Restores accelerate's state from ``path`` and returns its trainer state."""
    accelerator.load_state(str(path))
    return json.loads((path / STATE_FILE).read_text())
