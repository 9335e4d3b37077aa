"""Multiple-choice answers: the one option letter an answer names, or None.

The official rule reads the letter from the answer's first characters, so ``(A) or (B)`` reads as
``A`` and ``(B) is wrong; the answer is (C)`` as ``B``. Here an answer counts as naming an option
only when it names exactly one.
"""

from __future__ import annotations

import re

from data_pipeline.answer_text import clean_answer

# The option at the start of a (cleaned) answer: "(B)", "[B]", or a letter followed by ".", ":",
# ")" or the end ("B", "B.", "B: blue", "B) blue"). "A cat" and "Apple" are words, not options.
_LEADING_OPTION = re.compile(r"(?:\(\s*([A-Za-z])\s*\)|\[\s*([A-Za-z])\s*\]|([A-Za-z])(?=[.:)：]|$))")
# Another option named in what follows the first: "(C)" (not a function's argument, "f(x)"), a
# capital letter used as a list marker ("B: 4", "B. 4", "B) 4"), or a capital letter after a word
# that introduces an alternative or a verdict ("or B", "and C", "is C", ", D"). A capital letter
# elsewhere ("the angle at C") is a label in the option's text, not an option.
_OTHER_OPTION = re.compile(
    r"(?<![\w\\])\(\s*[A-Za-z]\s*\)"
    r"|(?<![\w\\'])[A-Z][.:)：](?=\s|$)"
    r"|(?:\b(?:or|and|is|vs\.?|not|than)\s+|[,/]\s*)[A-Z](?![\w'])"
)


def option_letter(text: str) -> str | None:
    """The option letter an answer names, when it names exactly one.

    ``B``, ``(B)``, ``B.``, ``B) blue``, ``B: blue``, ``**B**``, ``\\text{B}``, ``Option B`` and
    ``The answer is B.`` all read as ``B``; ``(b)`` too (brackets make a lower-case letter an
    option), but not ``b.`` or ``b: ...``, which are too often words or list markers. ``a`` alone
    reads as ``A``. ``(A) or (B)``, ``A: 3, B: 4`` and ``(B) is wrong; the answer is (C)`` name
    several options and read as None, as do words (``Apple``, ``A cat``) and numbers.

    Args:
        text: The extracted answer.

    Returns:
        The upper-case letter, or None.
    """
    raw = text.strip()
    text = clean_answer(text)
    match = _LEADING_OPTION.match(text)
    if not match:
        return None
    bracketed = match.group(1) or match.group(2)
    letter = bracketed or match.group(3)
    if not bracketed and not letter.isupper() and raw != letter:
        return None  # a lower-case letter counts only as the whole answer: "a", not "a." or "a: ..."
    rest = text[match.end() :].lstrip(".:)： ")
    if _OTHER_OPTION.search(rest):
        return None
    return letter.upper()


def option_score(prediction: str, truth: str) -> float:
    """1.0 when the ground truth names one option (``B``, ``(B)``, ``B. 12 cm``) and the prediction names it alone.

    A ground truth that is no option (``blue``, ``A cat``) leaves this mode out (score 0).
    """
    truth_letter = option_letter(truth)
    return float(truth_letter is not None and option_letter(prediction) == truth_letter)
