"""Recipe values that cannot mean what they say, refused at load with the key named.

A type check lets ``loss.beta: -0.1`` through, and such a run trains without an error while it
learns the wrong thing: with beta <= 0 every reward is 0 (MPO becomes SFT) or points at the
rejected response while the logged margins still rise; a negative loss weight maximises its term;
a warm-up of the whole run never reaches the peak rate. Each rule below names the key, the range
and why; :func:`check_ranges` runs them when a recipe is read (:func:`mpo.config.recipe_from_dict`),
before anything is loaded. Every float key must also be finite (a YAML ``.nan`` or ``.inf``),
except ``train.max_grad_norm``, where anything <= 0 (or ``.inf``) means "no clipping".

Cross-field rules (exactly one data source, held-out data for ``save_best``...) stay in
:mod:`mpo.config`.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Callable
from dataclasses import dataclass

from mpo.errors import DataError


@dataclass(frozen=True)
class Range:
    """One key's valid values."""

    key: str
    """The dotted recipe key."""
    valid: Callable[[float], bool]
    """Whether a value is in range (a NaN never is)."""
    rule: str
    """The range in words, e.g. ``must be > 0``."""
    why: str
    """What a value outside it would do."""


RANGES = (
    Range("loss.beta", lambda v: v > 0, "must be > 0",
          "0 makes every reward 0 (MPO becomes SFT), < 0 rewards the rejected responses"),
    Range("loss.dpo_weight", lambda v: v >= 0, "must be >= 0", "a negative weight maximises its term (0 removes it)"),
    Range("loss.bco_weight", lambda v: v >= 0, "must be >= 0", "a negative weight maximises its term (0 removes it)"),
    Range("loss.sft_weight", lambda v: v >= 0, "must be >= 0", "a negative weight maximises its term (0 removes it)"),
    Range("loss.delta_ema_decay", lambda v: 0 < v < 1, "must be in (0, 1)",
          "1 freezes delta at its first value, 0 keeps only the last step, outside [0, 1] it diverges"),
    Range("train.lr", lambda v: v >= 0, "must be >= 0", "a negative rate climbs the loss"),
    Range("train.vision_lr", lambda v: v >= 0, "must be >= 0 (0: train.lr)", "a negative rate climbs the loss"),
    Range("train.projector_lr", lambda v: v >= 0, "must be >= 0 (0: train.lr)", "a negative rate climbs the loss"),
    Range("train.weight_decay", lambda v: v >= 0, "must be >= 0", "a negative decay inflates every weight"),
    Range("train.adam_beta1", lambda v: 0 <= v < 1, "must be in [0, 1)", "AdamW's moment averages need it"),
    Range("train.adam_beta2", lambda v: 0 <= v < 1, "must be in [0, 1)", "AdamW's moment averages need it"),
    Range("train.warmup_ratio", lambda v: 0 <= v < 1, "must be in [0, 1)",
          "a share of the steps; 1 or more never reaches the peak rate"),
    Range("train.log_every", lambda v: v >= 1, "must be at least 1", "a step count"),
    Range("train.save_every", lambda v: v >= 0, "must be >= 0 (0: only at the end)", "a step count"),
    Range("train.keep_last", lambda v: v >= 1, "must be at least 1", "the run must keep a checkpoint to resume from"),
    Range("data.num_workers", lambda v: v >= 0, "must be >= 0", "a process count"),
    Range("forward.pack_length", lambda v: v >= 0, "must be >= 0 (0: data.max_length)", "a row length in tokens"),
    Range("model.lora.r", lambda v: v >= 1, "must be at least 1", "the adapters' rank"),
    Range("model.lora.alpha", lambda v: v > 0, "must be > 0", "the update is scaled by alpha / r; 0 trains nothing"),
    Range("model.lora.dropout", lambda v: 0 <= v < 1, "must be in [0, 1)", "a probability; 1 drops every input"),
)

NON_FINITE_ALLOWED = {"train.max_grad_norm"}
"""Float keys where .inf means something: no clipping."""


def _value(recipe, key: str):
    node = recipe
    for part in key.split("."):
        node = getattr(node, part)
    return node


def _float_keys(cls: type, prefix: str = "") -> list[str]:
    """Every float-typed leaf key under the dataclass ``cls``."""
    hints, keys = typing.get_type_hints(cls), []
    for field in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[field.name]):
            keys.extend(_float_keys(hints[field.name], prefix + field.name + "."))
        elif hints[field.name] is float:
            keys.append(prefix + field.name)
    return keys


def check_ranges(recipe, source: str) -> None:
    """Raises a :class:`DataError` naming the first key of ``recipe`` outside its range.

    Args:
        recipe: a :class:`mpo.config.Recipe`.
        source: the recipe file, for the message.
    """
    for key in _float_keys(type(recipe)):
        value = _value(recipe, key)
        if not math.isfinite(value) and key not in NON_FINITE_ALLOWED:
            raise DataError(f"must be a finite number, got {value}", file=source, field=key)
    for rule in RANGES:
        value = _value(recipe, rule.key)
        if not rule.valid(value):
            raise DataError(f"{rule.rule}, got {value} ({rule.why})", file=source, field=rule.key)
