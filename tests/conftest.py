"""Shared fixtures: a tiny InternVL checkpoint and a tiny MMPR directory, built once per session.

* ``tiny_model_dir``: ``mpo.tiny_model.build_tiny_model(dir, size="tiny", seed=0)``, an HF
  directory that ``AutoModelForImageTextToText`` / ``AutoProcessor`` load offline (64-px tiles,
  16 image tokens per tile, ~0.2 M parameters). Building it takes a few seconds.
* ``tiny_mmpr_dir``: ``mpo.examples.write_tiny_mmpr(dir, seed=0)``, the directory holding
  ``meta.json`` (4 subsets, 24 pairs: single-image, two-image, text-only, video).

Both are session-scoped and shared by every test: treat them as read-only (copy them into
``tmp_path`` before changing anything).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from mpo.examples import write_tiny_mmpr
from mpo.tiny_model import build_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny_model") / "model", size="tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_mmpr_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_mmpr(tmp_path_factory.mktemp("tiny_mmpr")).parent
