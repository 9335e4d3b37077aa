"""Chat messages as the peers store them, read into one turn: a system message, a question, a response.

The three formats share messages in two spellings: ``{"role": "system" | "user" | "assistant",
"content": ...}`` (TRL, ms-swift, OpenAI, LLaMA-Factory with role tags) and ``{"from": "system" |
"human" | "gpt", "value": ...}`` (LLaMA-Factory's sharegpt default). Content is a string (with
``<image>`` / ``<video>`` placeholders, ms-swift's and LLaMA-Factory's way) or TRL's list of parts
(``{"type": "image"}``, ``{"type": "text", "text": ...}``), an image part becoming ``<image>\\n``,
which the ``-hf`` template renders the same way.

MPO pairs are one turn: an optional system message, one user turn, then the response. A longer
conversation, a tool turn, or content holding the chat template's own tokens is refused with the
reason; the callers name file, row and column.
"""

from __future__ import annotations

from dataclasses import dataclass

from mpo.data.prompting import IMAGE_PLACEHOLDER
from mpo.data.rendered import template_token
from mpo.errors import DataError

ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant"}
"""Role names of both spellings, as the three roles of a turn."""


@dataclass(frozen=True)
class Turn:
    """One conversation read as a turn.

    Attributes:
        system: the system message, or None when the conversation has none.
        question: the user turn's text, ``<image>`` where it had an image part.
        image_parts: image parts the user turn had (0 for string content, whose images are
            ``<image>`` placeholders or none).
        response: the final assistant message, or None when the conversation ends with the user.
    """

    system: str | None
    question: str
    image_parts: int
    response: str | None


def short(value) -> str:
    """A value as it would appear in an error line, cut to 80 characters."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def role_and_content(message, field: str) -> tuple[str, object]:
    """``(role, content)`` of one message, in either spelling; role as a key of :data:`ROLES`'s values."""
    if isinstance(message, dict) and "role" in message:
        role, content = message.get("role"), message.get("content")
    elif isinstance(message, dict) and "from" in message:
        role, content = message.get("from"), message.get("value")
    else:
        raise DataError(f"expected a message {{'role', 'content'}} or {{'from', 'value'}}, got {short(message)}", field=field)
    if role not in ROLES:
        raise DataError(f"role {role!r}: mpo trains one-turn pairs (system, user, assistant); tool and function turns "
                        "are not supported", field=field)
    return ROLES[role], content


def content_text(content, field: str) -> tuple[str, int]:
    """Message content as ``(text, image parts)``: a string, or TRL's list of text and image parts."""
    if isinstance(content, str):
        text, images = content, 0
    elif isinstance(content, list):
        pieces, images = [], 0
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "image":
                pieces.append(IMAGE_PLACEHOLDER + "\n")
                images += 1
            elif kind == "text" and isinstance(part.get("text"), str):
                pieces.append(part["text"])
            else:
                raise DataError(f"content: expected {{'type': 'text', 'text': ...}} or {{'type': 'image'}}, got {short(part)}",
                                field=field)
        text = "".join(pieces)
    else:
        raise DataError(f"content: expected a string or a list of parts, got {short(content)}", field=field)
    token = template_token(text)
    if token is not None:
        raise DataError(f"content holds the chat template's token {token}: message contents are plain text, "
                        "mpo applies the template", field=field)
    return text, images


def read_turn(messages, field: str, needs_response: bool) -> Turn:
    """A conversation as one :class:`Turn`.

    Args:
        messages: the list of messages.
        field: the column, for errors.
        needs_response: whether the conversation must end with the assistant's response
            (ms-swift's ``messages``) or must end with the user (a prompt).
    """
    if not isinstance(messages, list) or not messages:
        raise DataError(f"expected a non-empty list of messages, got {short(messages)}", field=field)
    turns = [role_and_content(message, field) for message in messages]
    roles = [role for role, _ in turns]
    system = None
    if roles[0] == "system":
        system = content_text(turns[0][1], field)[0]
        turns, roles = turns[1:], roles[1:]
    expected = ["user", "assistant"] if needs_response else ["user"]
    if roles != expected:
        users = roles.count("user")
        if users > 1:
            raise DataError(f"{users} user turns: mpo trains one-turn pairs (an optional system message, one user turn, "
                            "the response); multi-turn conversations are not supported", field=field)
        raise DataError(f"expected the roles {' -> '.join(expected)} after an optional system message, got "
                        f"{' -> '.join(roles) or 'none'}", field=field)
    question, images = content_text(turns[0][1], field)
    response = None
    if needs_response:
        response, response_images = content_text(turns[1][1], field)
        if response_images:
            raise DataError("an image part in a response", field=field)
    return Turn(system, question, images, response)


def read_response(value, field: str) -> str:
    """A response given as a string, one assistant message, or a list of one assistant message."""
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, dict):
        role, content = role_and_content(value, field)
        if role != "assistant":
            raise DataError(f"expected an assistant message, got role {role!r}", field=field)
        value = content
    elif not isinstance(value, str):
        raise DataError(f"expected a string or one assistant message, got {short(value)}", field=field)
    text, images = content_text(value, field)
    if images:
        raise DataError("an image part in a response", field=field)
    if not text.strip():
        raise DataError("empty response", field=field)
    return text
