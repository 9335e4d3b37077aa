"""Where things this project builds are kept: ``$MPO_CACHE``, default ``~/.cache/mpo``.

The tiny ``builtin:<size>`` checkpoints (:mod:`mpo.model.tiny`) and the images embedded in a
preference dataset (:mod:`mpo.data.preference_files`) are written there once and reused.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$MPO_CACHE``, default ``~/.cache/mpo``."""
    return Path(os.environ.get("MPO_CACHE", Path.home() / ".cache" / "mpo"))
