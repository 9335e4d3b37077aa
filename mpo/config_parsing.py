"""A YAML mapping read into typed dataclasses: every key known, every value of its field's type.

:mod:`mpo.config` declares the recipe; this reads one. A key that no dataclass declares is an
error naming the key it most likely means (a peer's spelling from :mod:`mpo.hf_names`, a key
without its section, a near miss) or listing the valid ones, so a typo never trains silently with
a default; a value of the wrong type is an error naming the key.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from typing import Any, Literal

from mpo.errors import DataError
from mpo.hf_names import spelling_of, suggestion, value_hint

_SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _convert(value: Any, annotation: Any, key: str, root: type) -> Any:
    """Checks (and where lossless, converts) one value against a field's annotation."""
    origin = typing.get_origin(annotation)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise DataError(f"expected a mapping, got {value!r}", field=key)
        return build(annotation, value, key + ".", root)
    if origin is Literal:
        if value is False and "no" in typing.get_args(annotation):
            value = "no"  # YAML 1.1 reads a bare `no` (train.mixed_precision=no) as false
        if value not in typing.get_args(annotation):
            raise DataError(f"must be one of {list(typing.get_args(annotation))}, got {value!r}", field=key)
        return value
    if origin is list:
        if not isinstance(value, list):
            raise DataError(f"expected a list, got {value!r}", field=key)
        (item,) = typing.get_args(annotation)
        return [_convert(v, item, key, root) for v in value]
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(annotation):
            try:
                return _convert(value, option, key, root)
            except DataError:
                continue
        raise DataError(f"cannot be {value!r}", field=key)
    if annotation is bool:
        if not isinstance(value, bool):
            raise DataError(f"expected true or false, got {value!r}", field=key)
        return value
    if annotation is float:
        # PyYAML follows YAML 1.1, which reads 1e-5 (no dot) as a string; take it as the number.
        if isinstance(value, str) and _SCIENTIFIC.fullmatch(value.strip()):
            return float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise DataError(f"expected a number, got {value!r}", field=key)
        return float(value)
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise DataError(f"expected an integer, got {value!r}", field=key)
        return value
    if annotation is str:
        if value is None:
            return ""
        if not isinstance(value, (str, int, float)):
            raise DataError(f"expected a string, got {value!r}", field=key)
        return str(value)
    return value


def leaf_keys(cls: type, prefix: str = "") -> list[str]:
    """Every settable dotted key under ``cls`` (``train.lr``, ``model.lora.r``, ...)."""
    hints, keys = typing.get_type_hints(cls), []
    for f in dataclasses.fields(cls):
        nested = hints[f.name]
        keys += leaf_keys(nested, prefix + f.name + ".") if dataclasses.is_dataclass(nested) else [prefix + f.name]
    return keys


def _unknown_key(key: str, prefix: str, fields: dict, root: type) -> DataError:
    """The error for an unknown key: the key a peer's spelling means or a near spelling, else the
    section's valid keys."""
    dotted = prefix + key
    spelling = spelling_of(key)
    if spelling is None:
        # A key without its section (`lr` for `train.lr`) is found by its name alone.
        same = [k for k in leaf_keys(root) if k.rsplit(".", 1)[-1] == key and k != dotted]
        if len(same) == 1:
            return DataError(f"unknown key {dotted}: did you mean {same[0]}?")
    hint = suggestion(dotted, leaf_keys(root))
    if spelling is not None:
        return DataError(f"unknown key {dotted}: {hint}")
    valid = ", ".join(prefix + n for n in fields)
    if hint:
        return DataError(f"unknown key {dotted}: {hint}; valid keys here: {valid}")
    return DataError(f"unknown key {dotted}; valid keys here: {valid}")


def _one_or_many(value: Any) -> Any:
    """HF Trainer's spellings of a list: ``none`` (or nothing), one name, ``a,b``; a list as it is."""
    if value is None or value == "none":
        return []
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


LIST_SYNTAX = "a list: report_to=wandb,tensorboard or report_to=[wandb, tensorboard]; report_to=none for none"


def build(cls: type, data: dict, prefix: str = "", root: type | None = None) -> Any:
    """``cls`` (a dataclass) from a mapping, every value checked against its field's annotation.

    Args:
        cls: the dataclass to build.
        data: its keys and values (nested mappings for nested dataclasses).
        prefix: the dotted path of ``cls`` in the whole config, for messages.
        root: the whole config's dataclass, whose keys an unknown key is compared with
            (default: ``cls``).

    Raises:
        DataError: an unknown key (with the key it most likely means) or a wrong value, named.
    """
    root = root or cls
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise _unknown_key(str(unknown[0]), prefix, fields, root)
    values = {}
    for key, value in data.items():
        hint = value_hint(prefix + key, value)
        if hint is not None:
            raise DataError(hint, field=prefix + key)
        if fields[key].metadata.get("one_or_many"):
            try:
                values[key] = _convert(_one_or_many(value), hints[key], prefix + key, root)
            except DataError as error:
                raise DataError(f"{error.reason} ({LIST_SYNTAX})", field=error.field) from None
            continue
        values[key] = _convert(value, hints[key], prefix + key, root)
    return cls(**values)


def set_dotted(tree: dict, dotted: str, value: Any) -> None:
    """Sets ``a.b.c`` in a nested mapping (an override), creating sections on the way."""
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise DataError(f"override {dotted}: {part} is not a section")
    node[parts[-1]] = value
