"""An extracted answer's text before it is judged: the markup around it and the phrase before it.

A model writes the same answer as ``B``, ``**B**``, ``$B$``, ``\\text{B}``, ``\\boxed{\\textbf{B}}``,
``Option B`` or ``The answer is B.``. :func:`clean_answer` reduces all of these to ``B`` so that
every match mode sees the answer itself; it never touches what is inside the answer (signs,
brackets, units, commas), which the modes judge.
"""

from __future__ import annotations

import re

# Commands whose argument *is* the answer when one of them wraps all of it: ``\text{12 cm}``.
WRAPPER_COMMANDS = ("\\boxed", "\\text", "\\textbf", "\\textrm", "\\textit", "\\mathrm", "\\mathbf", "\\mbox")
# Text-style wrappers the v2 extraction removes from a box's content (``\boxed{\text{B}}``);
# ``\boxed`` itself is the extraction's own business.
TEXT_WRAPPERS = WRAPPER_COMMANDS[1:]

_MATH_DELIMITERS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))
_MARKDOWN = "*_`"
# "The answer is", "Final answer:", "the correct option is", "Option", "Choice:": a lead-in, not
# the answer. "answer" needs "is", ":" or "=" after it; "option"/"choice" needs an option label
# after it ("Option B", "option (2)"), so that "Choice of words" stays an answer.
_LEAD_IN = re.compile(
    r"^(?:so|thus|therefore|hence)?[,\s]*(?:the\s+|my\s+)?(?:final\s+|correct\s+|right\s+|best\s+)?"
    r"(?:answer\s*(?:is\b|[:：=])|(?:option|choice)\b(?:\s*(?:is\b|[:：=]))?(?=\s*\(?[A-Za-z0-9]\)?(?:[\s.:)：]|$)))\s*",
    re.IGNORECASE,
)


def _closing_brace(text: str, opening: int) -> int:
    """The index of the ``}`` that closes ``text[opening] == "{"``, or -1."""
    depth = 0
    for index in range(opening, len(text)):
        if text[index] == "{" and text[index - 1 : index] != "\\":
            depth += 1
        elif text[index] == "}" and text[index - 1 : index] != "\\":
            depth -= 1
            if depth == 0:
                return index
    return -1


def unwrap_span(text: str, start: int, end: int, commands: tuple[str, ...] = WRAPPER_COMMANDS) -> tuple[int, int]:
    """The span inside the ``\\command{...}`` wrappers that enclose all of ``text[start:end]``.

    ``\\text{B}`` -> the span of ``B``; ``\\text{A} or \\text{B}`` is left alone, as its first
    brace does not close at the end. Whitespace just inside a wrapper is dropped.

    Args:
        text: The whole text (a response, so that spans stay valid for the answer fix).
        start: Where the candidate answer begins in ``text``.
        end: Where it ends.
        commands: The wrapper commands to remove.

    Returns:
        ``(start, end)`` of the innermost wrapped content, or the input span when unwrapped.
    """
    while True:
        while start < end and text[start].isspace():
            start += 1
        while end > start and text[end - 1].isspace():
            end -= 1
        command = next((c for c in commands if text.startswith(c + "{", start)), None)
        if command is None:
            return start, end
        opening = start + len(command)
        if _closing_brace(text[:end], opening) != end - 1:
            return start, end
        start, end = opening + 1, end - 1


def clean_answer(text: str) -> str:
    """The answer without the markup and lead-in around it.

    Removes, until nothing changes: surrounding whitespace, Markdown emphasis (``**B**``), math
    delimiters (``$...$``, ``\\(...\\)``; a lone leading ``$`` is a currency sign and stays),
    whole-answer wrappers (:data:`WRAPPER_COMMANDS`), a lead-in phrase (``The answer is``,
    ``Option``) and one final full stop.

    >>> clean_answer("The answer is $\\\\boxed{\\\\text{B}}$.")
    'B'
    """
    while True:
        before = text
        text = text.strip().strip(_MARKDOWN).strip()
        for opener, closer in _MATH_DELIMITERS:
            inner = text[len(opener) : -len(closer)]
            if len(text) > len(opener) + len(closer) and text.startswith(opener) and text.endswith(closer) and "$" not in inner:
                text = inner.strip()
        start, end = unwrap_span(text, 0, len(text))
        text = text[start:end]
        lead = _LEAD_IN.match(text)
        if lead and lead.end() < len(text):
            text = text[lead.end() :]
        if text.endswith((".", "。")) and len(text) > 1:
            text = text[:-1]
        if text == before:
            return text
