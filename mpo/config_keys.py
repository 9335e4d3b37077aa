"""The recipe keys documented: ``mpo train --help`` lists each with its type, default and text.

The text is the docstring under each field of :mod:`mpo.config`'s dataclasses, read from the source
(litgpt's habit), so a key's documentation lives beside its declaration.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import typing
from dataclasses import dataclass
from typing import Any, Literal

import yaml

from mpo.config import Recipe

@dataclass(frozen=True)
class RecipeKey:
    """One settable key of a recipe, as ``mpo train --help`` lists it."""

    name: str
    """The dotted key, e.g. ``train.lr``."""
    type: str
    """The accepted values, e.g. ``float`` or ``sequence|token``."""
    default: str
    """The default as it would be written in YAML."""
    doc: str
    """The field's docstring, on one line."""


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass, read from its source (litgpt's habit): the
    string literal that follows an annotated assignment in the class body."""
    (node,) = ast.parse(textwrap.dedent(inspect.getsource(cls))).body
    docs = {}
    for statement, following in zip(node.body, node.body[1:]):
        if (
            isinstance(statement, ast.AnnAssign)
            and isinstance(statement.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[statement.target.id] = " ".join(inspect.cleandoc(following.value.value).split())
    return docs


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return "|".join(str(v) for v in typing.get_args(annotation))
    if origin is list:
        return f"list of {_type_name(typing.get_args(annotation)[0])}"
    return annotation.__name__


def recipe_keys(cls: type = None, prefix: str = "") -> list[RecipeKey]:
    """Every leaf key of :class:`Recipe` (or of ``cls``), in declaration order."""
    cls = cls or Recipe
    hints, docs, keys = typing.get_type_hints(cls), field_docs(cls), []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            keys.extend(recipe_keys(hints[f.name], prefix + f.name + "."))
            continue
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        written = yaml.safe_dump(default, default_flow_style=True, width=1_000).strip().removesuffix("...").strip()
        keys.append(RecipeKey(prefix + f.name, _type_name(hints[f.name]), written, docs.get(f.name, "")))
    return keys


def format_recipe_keys(width: int = 100, keys: list[RecipeKey] | None = None) -> str:
    """The recipe keys (or ``keys``) as an indented list: ``key  type  (default: value)`` then the
    doc, wrapped."""
    lines = []
    for key in recipe_keys() if keys is None else keys:
        lines.append(f"  {key.name}: {key.type} (default: {key.default})")
        lines.extend(textwrap.wrap(key.doc, width, initial_indent=" " * 6, subsequent_indent=" " * 6))
    return "\n".join(lines)
