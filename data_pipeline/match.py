"""Judging an extracted answer against the ground truth, without a judge model.

Every mode maps ``(prediction, ground truth)`` to a score in [0, 1]; the answer is correct when
the best score over the enabled modes (and over the acceptable answers, when the ground truth is
a list) is above :data:`CORRECT_THRESHOLD`. Case-insensitive exact match is always enabled.

Modes:
    exact     case-insensitive string equality.
    option    option letters: ``A``, ``A.``, ``(A)``, ``A)``, ``A: text`` all read as ``A``.
    numeric   numbers after stripping units (°, %, cm, degrees) and thousands separators: an
              integer ground truth (``12``, ``2018``, ``3.0``) must be met exactly, a non-integer
              one within 1e-3 relative tolerance.
    math      symbolic equivalence (``\\frac{1}{2}`` = ``0.5`` = ``1/2``) by the math-verify library;
              two plain numbers are compared by the numeric rule instead.
    vqa       equality after the VQA-score answer normalisation (case, punctuation, articles,
              number words, contractions), except that signs and operators (``- + = / < >``)
              are kept: ``-3`` is not ``3``, ``x-1`` is not ``x+1``.
    relaxed   relaxed accuracy (ChartQA): numbers within 5 %, otherwise exact; years exact.
    anls      1 - normalised edit distance, 0 below the ANLS threshold (0.5) (DocVQA, InfoVQA).
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass

CORRECT_THRESHOLD = 0.9
NUMERIC_TOLERANCE = 1e-3
RELAXED_TOLERANCE = 0.05
ANLS_THRESHOLD = 0.5

ALL_MODES = ("exact", "option", "numeric", "math", "vqa", "relaxed", "anls")
DEFAULT_MODES = ("exact", "option", "numeric", "vqa", "math")  # math last: the slowest

# Per-dataset defaults for ``--mode auto``, picked by a substring of the dataset name (the
# official pipeline's table): charts are scored with relaxed accuracy, documents with ANLS.
DATASET_MODES: list[tuple[tuple[str, ...], tuple[str, ...]]] = [
    (("chartqa", "plotqa", "chart"), ("exact", "relaxed")),
    (("docvqa", "infographic", "infovqa"), ("exact", "anls")),
    (("sroie", "clevr_math", "geos", "geometry"), ("exact", "relaxed", "vqa", "option")),
]


def modes_for_dataset(dataset: str) -> tuple[str, ...]:
    """The modes ``--mode auto`` uses for a dataset name."""
    name = dataset.lower()
    for keywords, modes in DATASET_MODES:
        if any(keyword in name for keyword in keywords):
            return modes
    return DEFAULT_MODES


def parse_modes(text: str) -> tuple[str, ...] | None:
    """``auto`` -> None (choose per dataset); otherwise a comma list of modes, ``exact`` implied."""
    if text == "auto":
        return None
    modes = tuple(dict.fromkeys(["exact", *(m.strip() for m in text.split(",") if m.strip())]))
    unknown = [m for m in modes if m not in ALL_MODES]
    if unknown:
        raise ValueError(f"unknown match mode(s) {unknown}; choose from auto or {', '.join(ALL_MODES)}")
    return modes


# ---------------------------------------------------------------------------------------------
# exact / option
# ---------------------------------------------------------------------------------------------


def exact_score(prediction: str, truth: str) -> float:
    return float(prediction.strip().lower() == truth.strip().lower())


_OPTION = re.compile(r"^\s*(?:\(([A-Z])\)|([A-Z])(?:[.:)]|$))", re.IGNORECASE)


def option_letter(text: str) -> str | None:
    """``A`` from ``A``, ``A.``, ``(A)``, ``A)``, ``A: cat``, ``B. blue``; None for ``Apple``, ``A cat``.

    A letter followed by a space and text is not an option: ``A cat`` is an answer, not ``A``.
    """
    text = text.strip().strip("*").strip()
    match = _OPTION.match(text)
    if not match:
        return None
    if match.group(1):
        return match.group(1).upper()  # "(a)" is unambiguous
    letter = match.group(2)
    if letter.isupper() or text == letter:
        return letter.upper()
    return None  # "a." / "b:" are too often words or list markers; options are capitals


def option_score(prediction: str, truth: str) -> float:
    truth_letter = option_letter(truth)
    if truth_letter is None or len(truth.strip().strip("()")) != 1:
        return 0.0  # the ground truth must itself be an option letter
    return float(option_letter(prediction) == truth_letter)


# ---------------------------------------------------------------------------------------------
# numbers
# ---------------------------------------------------------------------------------------------

_UNITS = re.compile(r"(?:\^\s*\{?\s*\\circ\s*\}?|\\circ|\\%|°|%|\bcm\b|\bdegrees?\b)", re.IGNORECASE)
_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:e[-+]?\d+)?", re.IGNORECASE)


def parse_number(text: str, strip_units: bool = True) -> float | None:
    """The number a whole answer states (``12 cm`` -> 12, ``1,234.5`` -> 1234.5), else None."""
    text = text.strip().strip("*").strip()
    if strip_units:
        text = _UNITS.sub("", text)
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text).strip().rstrip(".").strip()
    if text.startswith("$") and text.endswith("$") and len(text) > 1:
        text = text[1:-1].strip()  # "$12$" is LaTeX math mode, not dollars
    return float(text) if _NUMBER.fullmatch(text) else None


def _within(prediction: float, truth: float, tolerance: float) -> bool:
    if truth == 0:
        return prediction == 0
    return abs(prediction - truth) <= tolerance * abs(truth)


def numbers_match(prediction: float, truth: float) -> bool:
    """An integer truth exactly (1001 is not 1000, 2018 is not 2020); else within 1e-3 relative.

    Integer ground truths are counts, years, indices and sizes, where "close" is wrong; the
    tolerance is for rounded measurements and fractions (0.333 for 1/3).
    """
    if truth.is_integer():
        return prediction == truth
    return _within(prediction, truth, NUMERIC_TOLERANCE)


def numeric_score(prediction: str, truth: str) -> float:
    p, t = parse_number(prediction), parse_number(truth)
    return float(p is not None and t is not None and numbers_match(p, t))


def relaxed_score(prediction: str, truth: str) -> float:
    """ChartQA's relaxed accuracy (Methani et al. 2020): 5 % on numbers, exact otherwise.

    Only a trailing ``%`` is stripped (chart values), and a year-like ground truth (``2019``)
    must match exactly: 2020 is not "within 5 %" of 2019 in any useful sense.
    """
    truth = truth.strip()
    if re.fullmatch(r"(?:19|20)\d\d", truth):
        return exact_score(prediction, truth)

    def as_number(text: str) -> float | None:
        text = text.strip().rstrip("%").strip()
        text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)
        return float(text) if _NUMBER.fullmatch(text) else None

    p, t = as_number(prediction), as_number(truth)
    if p is not None and t is not None:
        return float(_within(p, t, RELAXED_TOLERANCE))
    return exact_score(prediction, truth)


# ---------------------------------------------------------------------------------------------
# symbolic math (math-verify)
# ---------------------------------------------------------------------------------------------


def _math_parse(text: str):
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    # math-verify times out with SIGALRM, which only the main thread may use.
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    text = text.strip()
    if not text.startswith("$") and not text.startswith("\\("):
        # LaTeX commands parse reliably only inside math delimiters; bare "3\pi" would read as 3.
        text = f"${text}$"
    return parse(text, extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()], parsing_timeout=timeout)


def math_score(prediction: str, truth: str) -> float:
    from math_verify import verify

    if not re.search(r"[0-9]", truth) and "\\" not in truth:
        return 0.0  # no number and no LaTeX: a word answer, where "symbolic equality" misfires
    plain_prediction, plain_truth = parse_number(prediction, strip_units=False), parse_number(truth, strip_units=False)
    if plain_prediction is not None and plain_truth is not None:
        # math-verify rounds floats (2.0000001 = 2.0); plain numbers follow the numeric rule.
        return float(numbers_match(plain_prediction, plain_truth))
    gold, guess = _math_parse(truth), _math_parse(prediction)
    if not gold or not guess:
        return 0.0
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    return float(verify(gold, guess, timeout_seconds=timeout))


# ---------------------------------------------------------------------------------------------
# VQA normalisation
# ---------------------------------------------------------------------------------------------

_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES = {"a", "an", "the"}
# The VQA evaluation restores apostrophes the annotators dropped; the common cases.
_CONTRACTIONS = {
    "arent": "aren't", "cant": "can't", "couldnt": "couldn't", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hasnt": "hasn't", "havent": "haven't", "isnt": "isn't", "its": "it's",
    "shouldnt": "shouldn't", "thats": "that's", "theres": "there's", "theyre": "they're",
    "wasnt": "wasn't", "werent": "weren't", "whats": "what's", "wont": "won't", "wouldnt": "wouldn't",
    "youre": "you're", "im": "i'm", "ive": "i've", "oclock": "o'clock",
}
# The EvalAI processor's punctuation list without its signs and operators, which it also turns
# into spaces: that made "-3" read as "3", "x-1" as "x+1" and "2+3" as "2/3".
_PUNCTUATION = set(";[]\"{}()\\_@`,?!")
_OPERATOR_SPACING = re.compile(r"\s*([-+=/<>])\s*")
# A hyphen or slash between two words ("red-white", "black/white") joins words, not operands.
_WORD_JOINER = re.compile(r"(?<=[^\W\d_]{2})[-/](?=[^\W\d_]{2})")


def vqa_normalize(text: str) -> str:
    """The VQA-score answer normalisation (the EvalAI processor's rules), signs and operators kept.

    Lowercase; drop thousands separators (``1,000``) and periods not before a digit; the
    operators ``- + = / < >`` stay, without the spaces around them (``x + 1`` = ``x+1``), except
    a hyphen or slash between two words, which becomes a space as in EvalAI; other punctuation
    becomes a space when it glues words together and vanishes when it stands next to a space;
    number words become digits; articles go; missing apostrophes are restored.
    """
    text = text.replace("\n", " ").replace("\t", " ").strip().lower()
    # Only a thousands separator: "1,2" is a list (EvalAI's rule would read it as 12).
    text = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", text)
    text = _OPERATOR_SPACING.sub(r"\1", text)
    text = _WORD_JOINER.sub(" ", text)
    out = []
    for index, char in enumerate(text):
        if char in _PUNCTUATION:
            beside_space = (index > 0 and text[index - 1] == " ") or (index + 1 < len(text) and text[index + 1] == " ")
            out.append("" if beside_space else " ")
        else:
            out.append(char)
    text = "".join(out)
    text = re.sub(r"\.(?!\d)", "", text)  # a period not before a digit: "3.5" and ".5" keep theirs
    words = []
    for word in text.split():
        word = _NUMBER_WORDS.get(word, word)
        if word in _ARTICLES:
            continue
        words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def vqa_score(prediction: str, truth: str) -> float:
    p, t = vqa_normalize(prediction), vqa_normalize(truth)
    return float(bool(p) and p == t)


# ---------------------------------------------------------------------------------------------
# ANLS
# ---------------------------------------------------------------------------------------------


def levenshtein(a: str, b: str) -> int:
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def anls_score(prediction: str, truth: str) -> float:
    """Average Normalised Levenshtein Similarity for one pair (Biten et al. 2019).

    ``1 - lev(p, t) / max(|p|, |t|)`` on lowercased, whitespace-collapsed strings, and 0 when
    that similarity is below the threshold 0.5. (The official MMPR code returned the raw
    normalised *distance* here, which scores a totally wrong answer as correct.)
    """
    p = " ".join(prediction.lower().split())
    t = " ".join(truth.lower().split())
    if not p and not t:
        return 1.0
    similarity = 1.0 - levenshtein(p, t) / max(len(p), len(t))
    return similarity if similarity >= ANLS_THRESHOLD else 0.0


_SCORERS = {
    "exact": exact_score,
    "option": option_score,
    "numeric": numeric_score,
    "math": math_score,
    "vqa": vqa_score,
    "relaxed": relaxed_score,
    "anls": anls_score,
}


@dataclass(frozen=True)
class Judgement:
    """The best score, the mode that gave it, and whether it passes the threshold."""

    score: float
    mode: str | None
    correct: bool


def judge(prediction: str, truth: str | list[str], modes: tuple[str, ...], threshold: float = CORRECT_THRESHOLD) -> Judgement:
    """Scores ``prediction`` against each acceptable answer in every mode; keeps the best.

    Modes run in the given order and stop at a perfect score, so the cheap exact checks spare
    the slow symbolic one most of the time.
    """
    truths = truth if isinstance(truth, list) else [truth]
    best, best_mode = 0.0, None
    for mode in modes:
        for candidate in truths:
            score = _SCORERS[mode](prediction, candidate)
            if score > best:
                best, best_mode = score, mode
            if best >= 1.0:
                return Judgement(best, best_mode, best > threshold)
    return Judgement(best, best_mode, best > threshold)
