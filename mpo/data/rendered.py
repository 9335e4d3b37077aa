"""Text that already holds the chat template's tokens: a prompt or response rendered before mpo saw it.

TRL's ``DPOTrainer`` tokenizes a string ``prompt`` as it is, so TRL users often store prompts they
rendered themselves (``apply_chat_template(..., tokenize=False, add_generation_prompt=True)``) and
responses ending in the end-of-turn token. Wrapped in the template a second time, such a prompt
would hold two user headers, and such a response would score a second ``<|im_end|>``.

mpo takes such text as rendered, and keeps one renderer for every prompt (:mod:`mpo.data.prompting`):

* a prompt is read back into what renders it, exactly one turn of InternVL's ``-hf`` ChatML
  template: an optional ``<|im_start|>system\\n…<|im_end|>\\n``, then
  ``<|im_start|>user\\n…<|im_end|>\\n<|im_start|>assistant\\n``, each image part written
  ``<IMG_CONTEXT>\\n`` (what the template renders for an image part) and read back as ``<image>\\n``.
  The trainer renders the record again with the checkpoint's template and refuses the pair unless
  that gives the same text (:class:`mpo.data.dataset.PreferenceDataset`), so the token ids are the
  ones TRL would feed for the same string;
* a response may end in the end-of-turn token ``<|im_end|>`` (and the newline the template puts
  after it): both are taken off, and the trainer appends the one ``<|im_end|>`` it scores for every
  response. TRL scores that newline too; mpo never scores text after the end of the turn.

Anything else that holds template tokens (a second turn, expanded ``<img>…</img>`` image tokens, a
token inside a response) is refused with the reason.
"""

from __future__ import annotations

import re

from mpo.data.prompting import IMAGE_PLACEHOLDER
from mpo.errors import DataError

IMAGE_TOKEN = "<IMG_CONTEXT>"
"""The processor's image token: what the ``-hf`` template renders for an image part (with a newline)."""
END_OF_TURN = "<|im_end|>"
TEMPLATE_TOKENS = ("<|im_start|>", END_OF_TURN, "<|endoftext|>", "<img>", "</img>", IMAGE_TOKEN)
"""Tokens of InternVL's chat format that plain text never holds."""

_ONE_TURN = re.compile(
    r"(?:<\|im_start\|>system\n(?P<system>.*?)<\|im_end\|>\n)?"
    r"<\|im_start\|>user\n(?P<user>.*?)<\|im_end\|>\n<\|im_start\|>assistant\n",
    re.DOTALL,
)


def template_token(text: str) -> str | None:
    """The first chat-template token ``text`` holds, or None for plain text."""
    found = [(text.find(token), token) for token in TEMPLATE_TOKENS if token in text]
    return min(found)[1] if found else None


def _turn_token(text: str) -> bool:
    """Whether one turn's text holds a template token other than the image token."""
    return any(token in text for token in TEMPLATE_TOKENS if token != IMAGE_TOKEN)


def parse_rendered_prompt(text: str) -> tuple[str | None, str]:
    """A rendered one-turn prompt read back into ``(system message or None, question)``.

    The question has ``<image>`` where the prompt has an image part.

    Raises:
        DataError: (reason only; the caller names file, row and column) the text is not one
            rendered turn of the template.
    """
    match = _ONE_TURN.fullmatch(text)
    if match is None or any(_turn_token(part or "") for part in match.group("system", "user")):
        ends = "ends" if text.endswith("<|im_start|>assistant\n") else "does not end"
        raise DataError(
            f"holds the chat template's tokens but is not one rendered turn ({text.count('<|im_start|>user')} user header(s); "
            f"{ends} with the assistant header '<|im_start|>assistant\\n'): give the plain question, TRL's conversational "
            "messages, or exactly the template's rendering of one turn"
        )
    system, user = match.group("system", "user")
    if system is not None and IMAGE_TOKEN in system:
        raise DataError(f"an image token {IMAGE_TOKEN} in the system turn")
    if IMAGE_PLACEHOLDER in user:
        raise DataError(f"a rendered prompt marks its images with {IMAGE_TOKEN} (the processor's image token), "
                        f"not {IMAGE_PLACEHOLDER}")
    if user.count(IMAGE_TOKEN) != user.count(IMAGE_TOKEN + "\n"):
        raise DataError(f"an image token {IMAGE_TOKEN} without the newline the template renders after it")
    return system, user.replace(IMAGE_TOKEN + "\n", IMAGE_PLACEHOLDER + "\n")


def rendered_response(text: str) -> str:
    """A response with its end-of-turn token (and the template's newline after it) taken off.

    Raises:
        DataError: (reason only) a template token anywhere else in the response.
    """
    body = next((text[: -len(end)] for end in (END_OF_TURN + "\n", END_OF_TURN) if text.endswith(end)), text)
    token = template_token(body)
    if token is not None:
        raise DataError(f"holds the chat template's token {token} inside the response (only a final {END_OF_TURN} is taken "
                        "as the end of the turn)")
    return body
