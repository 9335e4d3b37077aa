"""Shared fixtures: a tiny InternVL checkpoint and a tiny MMPR directory, built once per session.

* ``tiny_model_dir``: ``mpo.tiny_model.build_tiny_model(dir, size="tiny", seed=0)``, an HF
  directory that ``AutoModelForImageTextToText`` / ``AutoProcessor`` load offline (64-px tiles,
  16 image tokens per tile, ~0.2 M parameters). Building it takes a few seconds.
* ``tiny_mmpr_dir``: ``mpo.examples.write_tiny_mmpr(dir, seed=0)``, the directory holding
  ``meta.json`` (4 subsets, 24 pairs: single-image, two-image, text-only, video).

Both are session-scoped and shared by every test: treat them as read-only (copy them into
``tmp_path`` before changing anything). ``escaping_annotation`` is in such a copy, with one bad line.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from accelerate.state import AcceleratorState, GradientState

from mpo.data.tiny_mmpr import write_tiny_mmpr
from mpo.model.tiny import build_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny_model") / "model", size="tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_mmpr_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_mmpr(tmp_path_factory.mktemp("tiny_mmpr")).parent


@pytest.fixture
def escaping_annotation(tiny_mmpr_dir: Path, tmp_path: Path) -> Path:
    """An annotation of a copy of the tiny MMPR directory (its ``meta.json`` two levels up) whose
    line 3 names an image outside the image root (``../../../etc/passwd``)."""
    data = tmp_path / "escaping_mmpr"
    shutil.copytree(tiny_mmpr_dir, data)
    annotation = data / "annotations" / "multi_pairs_vqa_correctness_rules.jsonl"
    lines = annotation.read_text().splitlines()
    lines[2] = json.dumps({"image": ["../../../etc/passwd"], "question": "<image>\nQ", "chosen": "a", "rejected": "b"})
    annotation.write_text("\n".join(lines) + "\n")
    return annotation


@pytest.fixture
def fresh_accelerate_state():
    """Resets accelerate's process-wide state after the test: TRL's trainer builds an Accelerator,
    and a later test's Accelerator with other settings would be refused."""
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
