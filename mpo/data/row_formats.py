"""The preference formats of TRL, ms-swift and LLaMA-Factory: which columns say which, and one row of
each read into a :class:`RowPair`.

* **TRL** (``DPOTrainer``'s preference columns): ``prompt``, ``chosen``, ``rejected``, ``images``
  (or ``image``). Each text column is a string or a conversation: ``prompt`` an optional system
  message and one user message (content a string or a list of ``{"type": "image"}`` /
  ``{"type": "text", "text": ...}`` parts), ``chosen`` / ``rejected`` one assistant message, or the
  whole conversation whose messages before the last are the prompt's (what
  ``trl.maybe_extract_prompt`` splits). Without a ``prompt`` column (TRL's implicit prompt) the
  messages ``chosen`` and ``rejected`` share before their last one are the prompt. A string
  prompt that holds the chat template's tokens is taken as rendered (:mod:`mpo.data.rendered`).
* **ms-swift** (its RLHF/DPO format): ``messages`` (an optional system message, one user turn, the
  chosen assistant turn), ``rejected_response`` (a string or one assistant message) or
  ``rejected_messages`` (the same conversation with the rejected answer), ``images`` and
  ``videos`` with ``<image>`` / ``<video>`` tags in the text. ``rejected_images`` other than
  ``images`` is refused: an MPO pair scores both responses on one prompt.
* **LLaMA-Factory** (sharegpt ranking, ``"ranking": true``, its default column names):
  ``conversations`` (``{"from": "human" | "gpt" | "system", "value": ...}``; with role tags:
  ``messages`` of ``{"role", "content"}``) ending with the user turn, ``chosen`` and ``rejected``
  (one ``{"from": "gpt", "value": ...}`` message each), optional ``system``, ``images``,
  ``videos``, with ``<image>`` / ``<video>`` tags in the text.

A format is recognised from a file's columns (:func:`detect_format`). Parsers raise
:class:`DataError` with the column as its field; the reader adds file and row.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from mpo.data.conversations import Turn, read_response, read_turn, short
from mpo.data.rendered import parse_rendered_prompt, rendered_response, template_token
from mpo.errors import DataError


@dataclass
class RowPair:
    """One row of any format, before its images are resolved and its question checked.

    Attributes:
        question: the user turn, ``<image>`` per image part or placeholder.
        chosen: the preferred response text.
        rejected: the dispreferred response text.
        images: the row's images as stored (paths, ``{"bytes", "path"}`` or bytes).
        videos: the row's videos as stored (paths).
        prompt_field: the column the question came from, for errors.
        image_column: the column the images came from.
        image_parts: image parts of a structured user turn (0: placeholders or none).
        system: the system message the row states (meaningful with ``has_system``).
        has_system: whether the row states its system message (a system turn, a ``system`` column,
            a rendered prompt with or without a system turn).
        rendered_prompt: the prompt as the row gave it, when it was already rendered.
    """

    question: str
    chosen: str
    rejected: str
    images: list = field(default_factory=list)
    videos: list = field(default_factory=list)
    prompt_field: str = "prompt"
    image_column: str = "images"
    image_parts: int = 0
    system: str | None = None
    has_system: bool = False
    rendered_prompt: str | None = None


def _media(row: dict, column: str) -> list:
    value = row.get(column)
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def _present(row: dict, column: str) -> bool:
    """Whether a column has a value in this row (parquet and arrow fill a missing one with None)."""
    return row.get(column) is not None


def _require(row: dict, columns: tuple[str, ...], fmt: str) -> None:
    for column in columns:
        if not _present(row, column):
            raise DataError(f"missing ({fmt}'s preference columns: {FORMATS[fmt].columns})", field=column)


# ------------------------------------------------------------------------------------------- TRL


def _trl_response(value, prompt, field: str) -> str:
    """A TRL response column: a string (perhaps ending in the end-of-turn token), one assistant
    message, or the whole conversation whose leading messages are the prompt's."""
    if isinstance(value, str):
        try:
            text = rendered_response(value)
        except DataError as error:
            raise DataError(error.reason, field=field) from None
        if not text.strip():
            raise DataError("empty response", field=field)
        return text
    if isinstance(value, list) and len(value) > 1:
        if value[:-1] != prompt:
            raise DataError("the messages before the response are not the prompt's (TRL's conversation with its prompt "
                            "first): an MPO pair scores both responses on one prompt", field=field)
        value = value[-1:]
    return read_response(value, field)


def _implicit_prompt(chosen, rejected) -> list:
    """TRL's implicit prompt: the messages ``chosen`` and ``rejected`` share before their last one."""
    for column, value in (("chosen", chosen), ("rejected", rejected)):
        if not (isinstance(value, list) and len(value) > 1):
            raise DataError(f"no prompt column, and {column} is not a conversation ending with the response "
                            f"(TRL's implicit prompt), got {short(value)}", field=column)
    if chosen[:-1] != rejected[:-1]:
        raise DataError("no prompt column, and chosen and rejected differ before their last message: an MPO pair scores "
                        "both responses on one prompt", field="rejected")
    return chosen[:-1]


def trl_pair(row: dict) -> RowPair:
    """One row in TRL's preference columns."""
    _require(row, ("chosen", "rejected"), "TRL")
    prompt = row["prompt"] if _present(row, "prompt") else _implicit_prompt(row["chosen"], row["rejected"])
    image_column = "images" if "images" in row else "image"
    pair = RowPair("", "", "", images=_media(row, image_column), image_column=image_column)
    if isinstance(prompt, str):
        if template_token(prompt) is not None:
            try:
                pair.system, pair.question = parse_rendered_prompt(prompt)
            except DataError as error:
                raise DataError(error.reason, field="prompt") from None
            pair.has_system, pair.rendered_prompt = True, prompt
        else:
            pair.question = prompt
    else:
        turn = read_turn(prompt, "prompt", needs_response=False)
        pair.question, pair.image_parts = turn.question, turn.image_parts
        pair.system, pair.has_system = turn.system, turn.system is not None
    pair.chosen = _trl_response(row["chosen"], prompt, "chosen")
    pair.rejected = _trl_response(row["rejected"], prompt, "rejected")
    return pair


# -------------------------------------------------------------------------------------- ms-swift


def swift_pair(row: dict) -> RowPair:
    """One row of ms-swift's RLHF format."""
    _require(row, ("messages",), "ms-swift")
    turn = read_turn(row["messages"], "messages", needs_response=True)
    if _present(row, "rejected_messages"):
        other = read_turn(row["rejected_messages"], "rejected_messages", needs_response=True)
        if (other.system, other.question) != (turn.system, turn.question):
            raise DataError("its prompt differs from the one in messages: an MPO pair scores both responses on one prompt",
                            field="rejected_messages")
        rejected = other.response
    elif _present(row, "rejected_response"):
        rejected = read_response(row["rejected_response"], "rejected_response")
    else:
        raise DataError("missing (ms-swift's rejected answer: rejected_response, or rejected_messages)",
                        field="rejected_response")
    if _media(row, "rejected_images") not in ([], _media(row, "images")):
        raise DataError("differs from images: an MPO pair scores both responses on one prompt and its images",
                        field="rejected_images")
    return _from_turn(turn, turn.response, rejected, row, "messages")


# --------------------------------------------------------------------------------- LLaMA-Factory


def llamafactory_pair(row: dict) -> RowPair:
    """One row of LLaMA-Factory's sharegpt ranking format."""
    column = "conversations" if _present(row, "conversations") else "messages"
    _require(row, (column, "chosen", "rejected"), "LLaMA-Factory")
    turn = read_turn(row[column], column, needs_response=False)
    system = row.get("system")
    if system is not None and not isinstance(system, str):
        raise DataError(f"expected a string, got {short(system)}", field="system")
    if turn.system is None and system:
        turn = Turn(system, turn.question, turn.image_parts, None)
    chosen, rejected = read_response(row["chosen"], "chosen"), read_response(row["rejected"], "rejected")
    return _from_turn(turn, chosen, rejected, row, column)


def _from_turn(turn: Turn, chosen: str, rejected: str, row: dict, prompt_field: str) -> RowPair:
    if not chosen.strip():
        raise DataError("empty response", field=prompt_field)
    return RowPair(turn.question, chosen, rejected, images=_media(row, "images"), videos=_media(row, "videos"),
                   prompt_field=prompt_field, image_parts=turn.image_parts, system=turn.system,
                   has_system=turn.system is not None)


# ------------------------------------------------------------------------------------- detection


@dataclass(frozen=True)
class Format:
    """A preference format: its name, its columns as users read them, and its row parser."""

    name: str
    columns: str
    parse: Callable[[dict], RowPair]


FORMATS = {
    "TRL": Format("TRL", "prompt, chosen, rejected, images", trl_pair),
    "ms-swift": Format("ms-swift", "messages, rejected_response (or rejected_messages), images", swift_pair),
    "LLaMA-Factory": Format("LLaMA-Factory", "conversations, chosen, rejected, images (sharegpt ranking)", llamafactory_pair),
}
MMPR_COLUMNS = "question, chosen, rejected, image"


def detect_format(columns: list[str] | set[str]) -> str | None:
    """The format a file's columns say: a key of :data:`FORMATS`, ``"MMPR"``, or None."""
    columns = set(columns)
    if "conversations" in columns or {"messages", "chosen", "rejected"} <= columns:
        return "LLaMA-Factory"
    if "messages" in columns and columns & {"rejected_response", "rejected_messages", "rejected_images"}:
        return "ms-swift"
    if "question" in columns and {"chosen", "rejected"} <= columns:
        return "MMPR"
    if {"chosen", "rejected"} <= columns:
        return "TRL"
    return None
