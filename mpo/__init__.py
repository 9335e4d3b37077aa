"""Mixed Preference Optimization for InternVL.

The objective is importable on its own (torch only)::

    from mpo import MPOLoss, RewardShift

The layout, library below entry points (the contracts in ``pyproject.toml`` keep it so):
``mpo.types``, ``mpo.losses``, ``mpo.config``, ``mpo.errors``, ``mpo.jsonl``, ``mpo.cache`` at
the bottom; then :mod:`mpo.data`, :mod:`mpo.model`, :mod:`mpo.train`; then the entry points,
:mod:`mpo.tools`, :mod:`mpo.demo` and :mod:`mpo.cli`.

Names are loaded on first use, so that ``import mpo.config`` (what ``mpo train`` reads a recipe
with) does not import torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "MPOLoss": "mpo.losses",
    "RewardShift": "mpo.losses",
    "bco_pair_loss": "mpo.losses",
    "dpo_sigmoid_loss": "mpo.losses",
    "sft_loss": "mpo.losses",
    "EncodedPair": "mpo.types",
    "MPOLossOutput": "mpo.types",
    "PreferenceBatch": "mpo.types",
    "PreferenceRecord": "mpo.types",
    "SequenceLogps": "mpo.types",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'mpo' has no attribute {name!r}")
