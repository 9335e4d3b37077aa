"""Judging an extracted answer against the ground truth, without a judge model.

Every mode maps ``(prediction, ground truth)`` to a score in [0, 1]; the answer is correct when
the best score over the enabled modes (and over the acceptable answers, when the ground truth is
a list) is above :data:`CORRECT_THRESHOLD`. Case-insensitive exact match is always enabled. A
judged-correct response becomes a *chosen* one, so a mode must refuse a near miss as firmly as it
accepts another spelling of the right answer: the best score wins, and one lax mode is enough to
turn a wrong response into a chosen one.

Every mode first removes the markup around an answer (:func:`~data_pipeline.answer_text.clean_answer`:
``**B**``, ``$12$``, ``\\text{12 cm}``, ``\\boxed{..}``, a lead-in such as ``The answer is`` or
``Option``, one final full stop). Then:

    exact     case-insensitive equality.
    option    the ground truth names an option (``B``, ``(B)``, ``B. 12 cm``) and the answer names
              that option and no other (:mod:`data_pipeline.options`): ``B. blue``, ``Option B``, ``The answer is B.``
              are ``B``; ``(A) or (B)``, ``A: 3, B: 4``, ``(B) is wrong; the answer is (C)`` name no
              single option.
    numeric   both sides read as quantities (:mod:`data_pipeline.units`: currency, thousands
              separators, number words, a scale word, a unit). A unit on both sides must be the
              same unit after normalising its spelling (``\\text{cm}``, ``cm``, ``centimeters``),
              or convert into it (``2 m`` = ``200 cm``, ``3 days`` = ``72 hours``, ``5 km`` !=
              ``5 m``); a unit on one side only is allowed (``12 cm`` = ``12``); a scale word multiplies
              (``5 million`` = ``5,000,000`` != ``5``); ``50%`` = ``50`` = ``0.5``. An integer
              ground truth must be met exactly (``3.0`` = ``3``, ``1001`` != ``1000``), a
              non-integer within 1e-3 relative.
    math      symbolic equivalence by math-verify (``\\frac{1}{2}`` = ``0.5``, ``(x+1)^2`` =
              ``x^2+2x+1``) of the two answers without their units, the units agreeing as above;
              two quantities follow the numeric rule. Refused: answers with words in them (math-
              verify reads ``5 apples`` as ``5`` and ``twelve`` as a product of letters), and answers
              whose bracketed collections differ (intervals ``[0, 1)`` vs ``(0, 1]``, a set
              ``\\{1, 2\\}`` vs an interval or tuple ``(1, 2)``; a bare list ``1, 2`` is a set).
    vqa       two quantities follow the numeric rule; otherwise equality after the VQA-score
              normalisation (case, punctuation, articles, number words, contractions), keeping
              signs and operators (``-3`` != ``3``, ``x-1`` != ``x+1``) and, in an answer with a
              digit, operator or bracketed list, its brackets (``[0, 1)`` != ``(0, 1]``).
    relaxed   ChartQA's relaxed accuracy: two quantities within 5 % when the ground truth is not
              an integer, exactly when it is (``2019.0`` = ``2019``, ``41`` != ``40``), a scale
              word on one side only read either way (``5.2 million`` = ``5.2``, an axis in
              millions); otherwise exact.
    anls      two quantities must be equal; an answer with a digit in it (an identifier, a date, a
              code such as ``INV-2023-0043``) must equal the ground truth, its separators aside
              (``INV 2023 0043``); free text scores ANLS, 1 - normalised edit distance, 0 below
              0.5 (DocVQA, InfoVQA).

Departures from the official InternVL/MMPR rules, each because the official rule turned a wrong
answer into a chosen one or a right answer into a rejected one:

1. Units are compared, not stripped: the official rules drop ``°``, ``%``, ``cm``, ``degree`` and
   math-verify drops every unit word, so ``5 km`` = ``5 m`` and ``3 hours`` = ``3 minutes``.
2. Integers are exact in every mode. The official 1e-3 and 5 % tolerances accept ``1001`` for
   ``1000`` and ``41`` for ``40``; they remain for non-integers.
3. The 5 % tolerance is for charts only (:data:`DATASET_MODES`); geometry (``geometry``, ``geos``)
   and ``clevr_math`` get the default modes, and receipts (``sroie``) the document modes.
4. An option is read only from an answer that names exactly one (the official rule reads the
   first characters: ``(A) or (B)`` was ``A``). Markup and lead-ins are removed first, in every
   mode, so ``\\boxed{\\text{B}}``, ``Option B`` and ``The answer is C.`` are ``B`` and ``C``
   (the official rules rejected them).
5. The VQA normalisation keeps signs, operators, and the brackets of mathematical answers, which
   the EvalAI processor turns into spaces.
6. ANLS is exact on strings with digits (one wrong digit of an invoice number is 0.92 ANLS), and
   the official ANLS branch's bug (the distance used as the score) is fixed.
7. Currency signs, thousands separators, scale words and number words (to 999; EvalAI's list
   stops at ten) are read in every mode but exact (``$1,234.56`` = ``1234.56``, ``twelve`` =
   ``12``); the official rules read thousands separators only, and number words in VQA only.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from fractions import Fraction

from data_pipeline.answer_text import clean_answer
from data_pipeline.options import option_letter, option_score
from data_pipeline.units import (
    NUMBER_WORDS,
    parse_quantity,
    quantities_match,
    split_unit,
    unit_ratio,
)

# option_letter and option_score live in data_pipeline.options; they are part of this module's API.
__all__ = [
    "ALL_MODES", "ANLS_THRESHOLD", "CHART_MODES", "CORRECT_THRESHOLD", "DATASET_MODES", "DEFAULT_MODES",
    "DOCUMENT_MODES", "NUMERIC_TOLERANCE", "RELAXED_TOLERANCE", "Judgement", "anls_score", "chart_numbers_match",
    "collection_brackets", "exact_score", "judge", "levenshtein", "math_score", "modes_for_dataset", "numbers_match",
    "numeric_score", "option_letter", "option_score", "parse_modes", "parse_number", "relaxed_score",
    "vqa_normalize", "vqa_score",
]

CORRECT_THRESHOLD = 0.9
NUMERIC_TOLERANCE = 1e-3
RELAXED_TOLERANCE = 0.05
ANLS_THRESHOLD = 0.5

ALL_MODES = ("exact", "option", "numeric", "math", "vqa", "relaxed", "anls")
DEFAULT_MODES = ("exact", "option", "numeric", "vqa", "math")  # math last: the slowest
CHART_MODES = ("exact", "relaxed")
DOCUMENT_MODES = ("exact", "anls")

# Per-dataset modes for ``--mode auto``, picked by a substring of the dataset name: charts are
# scored with relaxed accuracy, documents and receipts with ANLS, everything else by default.
DATASET_MODES: list[tuple[tuple[str, ...], tuple[str, ...]]] = [
    (("chartqa", "plotqa", "chart"), CHART_MODES),
    (("docvqa", "infographic", "infovqa", "sroie"), DOCUMENT_MODES),
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


def exact_score(prediction: str, truth: str) -> float:
    """Case-insensitive equality of the cleaned answers (``**Yes.**`` = ``yes``)."""
    return float(clean_answer(prediction).lower() == clean_answer(truth).lower())


# ---------------------------------------------------------------------------------------------
# numbers
# ---------------------------------------------------------------------------------------------


def parse_number(text: str, strip_units: bool = True) -> float | None:
    """The number a whole answer states (``12 cm`` -> 12, ``$1,234.5`` -> 1234.5, ``twelve`` -> 12).

    With ``strip_units=False`` an answer with a unit or scale word is not a number.
    """
    quantity = parse_quantity(text)
    if quantity is None or (not strip_units and (quantity.unit is not None or quantity.scale != 1.0)):
        return None
    return quantity.value * quantity.scale


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


def chart_numbers_match(prediction: float, truth: float) -> bool:
    """Relaxed accuracy's rule: an integer truth exactly, else within 5 % (values read off a chart)."""
    if truth.is_integer():
        return prediction == truth
    return _within(prediction, truth, RELAXED_TOLERANCE)


def numeric_score(prediction: str, truth: str) -> float:
    p, t = parse_quantity(prediction), parse_quantity(truth)
    return float(p is not None and t is not None and quantities_match(p, t, numbers_match))


def relaxed_score(prediction: str, truth: str) -> float:
    """ChartQA's relaxed accuracy (Methani et al. 2020), integers exact; exact on non-numbers."""
    p, t = parse_quantity(prediction), parse_quantity(truth)
    if p is not None and t is not None:
        return float(quantities_match(p, t, chart_numbers_match, chart=True))
    return exact_score(prediction, truth)


# ---------------------------------------------------------------------------------------------
# symbolic math (math-verify)
# ---------------------------------------------------------------------------------------------

# Words a formula may hold: function names and the connectives of a list of solutions.
_FORMULA_WORDS = {"and", "or", "sin", "cos", "tan", "cot", "sec", "csc", "arcsin", "arccos", "arctan", "sinh",
                  "cosh", "tanh", "log", "exp", "lim", "max", "min", "gcd", "lcm", "det", "mod", "sqrt", "inf"}
_OPENING = {"(": "(", "[": "[", "\\{": "{", "\\lbrace": "{", "\\langle": "<"}
_CLOSING = {")": ")", "]": "]", "\\}": "}", "\\rbrace": "}", "\\rangle": ">"}
# "and"/"or" join the items of a list as a comma does: "x = 2 or x = 3" is the list "2, 3".
_BRACKET_TOKEN = re.compile(r"\\[{}]|\\[lr]brace\b|\\[lr]angle\b|[()\[\],]|\b(?:and|or)\b")


def _has_words(expression: str) -> bool:
    """Whether a formula holds words (3+ letters outside LaTeX commands that name no function)."""
    bare = re.sub(r"\\[A-Za-z]+", " ", expression)
    return any(word.lower() not in _FORMULA_WORDS for word in re.findall(r"[A-Za-z]{3,}", bare))


def collection_brackets(expression: str) -> tuple[str, ...]:
    """The bracket pairs that enclose a comma, in order: ``[0, 1)`` -> ``("[)",)``.

    A top-level list (``1, 2``, ``x = 1 or x = 2``) is a set, ``{}``; LaTeX's grouping braces are
    not brackets.
    """
    expression = re.sub(r"\\(?:left|right|big|Big|bigg|Bigg)(?![A-Za-z])", "", expression)
    stack: list[list] = []  # [opening kind, holds a comma]
    found: list[str] = []
    top_level_comma = False
    for token in _BRACKET_TOKEN.findall(expression):
        if token in _OPENING:
            stack.append([_OPENING[token], False])
        elif token in _CLOSING and stack:
            kind, has_comma = stack.pop()
            if has_comma:
                found.append(kind + _CLOSING[token])
        elif token in (",", "and", "or"):
            if stack:
                stack[-1][1] = True
            else:
                top_level_comma = True
    if top_level_comma:
        found.append("{}")
    return tuple(found)


def _math_parse(text: str):
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    # math-verify times out with SIGALRM, which only the main thread may use.
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    text = text.strip()
    if not text.startswith("$") and not text.startswith("\\("):
        # LaTeX commands parse reliably only inside math delimiters; bare "3\pi" would read as 3.
        text = f"${text}$"
    return parse(text, extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()], parsing_timeout=timeout)


def _verify(prediction: str, truth: str) -> bool:
    from math_verify import verify

    gold, guess = _math_parse(truth), _math_parse(prediction)
    if not gold or not guess:
        return False
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    return bool(verify(gold, guess, timeout_seconds=timeout))


def math_score(prediction: str, truth: str) -> float:
    prediction, truth = clean_answer(prediction), clean_answer(truth)
    if not re.search(r"[0-9]", truth) and "\\" not in truth:
        return 0.0  # no number and no LaTeX: a word answer, where "symbolic equality" misfires
    p, t = parse_quantity(prediction), parse_quantity(truth)
    if p is not None and t is not None:
        # math-verify rounds floats (2.0000001 = 2.0) and drops units; quantities follow the numeric rule.
        return float(quantities_match(p, t, numbers_match))
    (p_core, p_unit), (t_core, t_unit) = split_unit(prediction), split_unit(truth)
    ratio = unit_ratio(p_unit.unit, t_unit.unit)
    if ratio is None or not p_core or not t_core or _has_words(p_core) or _has_words(t_core):
        return 0.0
    if collection_brackets(p_core) != collection_brackets(t_core):
        return 0.0  # math-verify equates {1, 2} with (1, 2)
    ratio *= p_unit.scale / t_unit.scale
    if ratio != 1.0:
        # The prediction in the truth's unit and scale: \frac{1}{2} km is 500 m.
        fraction = Fraction(ratio).limit_denominator(10**9)
        # An explicit \cdot: math-verify reads "2\left(\frac{1}{2}\right)" as the mixed number 2 1/2.
        p_core = f"\\frac{{{fraction.numerator}}}{{{fraction.denominator}}} \\cdot \\left({p_core}\\right)"
    if _verify(p_core, t_core):
        return 1.0
    # A percentage against a plain number may also be a fraction: 50\% = \frac{1}{2}.
    if p_unit.unit == "%" and t_unit.unit is None:
        return float(_verify(f"\\frac{{{p_core}}}{{100}}", t_core))
    if t_unit.unit == "%" and p_unit.unit is None:
        return float(_verify(p_core, f"\\frac{{{t_core}}}{{100}}"))
    return 0.0


# ---------------------------------------------------------------------------------------------
# VQA normalisation
# ---------------------------------------------------------------------------------------------

_ARTICLES = {"a", "an", "the"}
# The VQA evaluation restores apostrophes the annotators dropped; the common cases.
_CONTRACTIONS = {
    "arent": "aren't", "cant": "can't", "couldnt": "couldn't", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hasnt": "hasn't", "havent": "haven't", "isnt": "isn't", "its": "it's",
    "shouldnt": "shouldn't", "thats": "that's", "theres": "there's", "theyre": "they're",
    "wasnt": "wasn't", "werent": "weren't", "whats": "what's", "wont": "won't", "wouldnt": "wouldn't",
    "youre": "you're", "im": "i'm", "ive": "i've", "oclock": "o'clock",
}
# EvalAI maps zero..ten (and "none") to digits; here every number word up to ninety.
_VQA_NUMBER_WORDS = {"none": "0"} | {word: str(value) for word, value in NUMBER_WORDS.items()}
# The EvalAI processor's punctuation list without its signs and operators, which it also turns
# into spaces: that made "-3" read as "3", "x-1" as "x+1" and "2+3" as "2/3".
_PUNCTUATION = set(";[]\"{}()\\_@`,?!")
_BRACKETS = set("()[]{}")
_OPERATOR_SPACING = re.compile(r"\s*([-+=/<>^*])\s*")
# A hyphen or slash between two words ("red-white", "black/white") joins words, not operands.
_WORD_JOINER = re.compile(r"(?<=[^\W\d_]{2})[-/](?=[^\W\d_]{2})")
# A mathematical answer, whose brackets are part of it: a digit, an operator, a bracketed list.
_MATHEMATICAL = re.compile(r"[\d+\-=/<>^*]|[(\[{][^)\]}]*,")


def vqa_normalize(text: str) -> str:
    """The VQA-score answer normalisation (the EvalAI processor's rules), signs and operators kept.

    Lowercase; drop thousands separators (``1,000``) and periods not before a digit; the
    operators ``- + = / < > ^ *`` stay, without the spaces around them (``x + 1`` = ``x+1``),
    except a hyphen or slash between two words, which becomes a space as in EvalAI; brackets stay
    in a mathematical answer (one with a digit, an operator or a bracketed list: ``[0, 1)``,
    ``\\{1, 2\\}``); other punctuation becomes a space when it glues words together and vanishes
    when it stands next to a space; number words become digits; articles go; missing apostrophes
    are restored.
    """
    text = clean_answer(text).replace("\n", " ").replace("\t", " ").strip().lower()
    text = re.sub(r"\\left(?![a-z])|\\right(?![a-z])", "", text).replace("\\{", "{").replace("\\}", "}")
    # Only a thousands separator: "1,2" is a list (EvalAI's rule would read it as 12).
    text = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", text)
    text = _OPERATOR_SPACING.sub(r"\1", text)
    text = _WORD_JOINER.sub(" ", text)
    punctuation = _PUNCTUATION - _BRACKETS if _MATHEMATICAL.search(text) else _PUNCTUATION
    out = []
    for index, char in enumerate(text):
        if char in punctuation:
            beside_space = (index > 0 and text[index - 1] == " ") or (index + 1 < len(text) and text[index + 1] == " ")
            out.append("" if beside_space else " ")
        else:
            out.append(char)
    text = "".join(out)
    text = re.sub(r"\.(?!\d)", "", text)  # a period not before a digit: "3.5" and ".5" keep theirs
    text = re.sub(r"\s*([(\[{])\s*", r"\1", text)
    text = re.sub(r"\s*([)\]}])", r"\1", text)
    words = []
    for word in text.split():
        word = _VQA_NUMBER_WORDS.get(word, word)
        if word in _ARTICLES:
            continue
        words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def vqa_score(prediction: str, truth: str) -> float:
    p_quantity, t_quantity = parse_quantity(prediction), parse_quantity(truth)
    if p_quantity is not None and t_quantity is not None:
        return float(quantities_match(p_quantity, t_quantity, numbers_match))
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


# What separates the parts of an identifier, a date or a phone number, however it is written:
# "INV-2023-0043" = "INV 2023 0043", "March 5, 2021" = "March 5 2021"; a decimal point stays.
_IDENTIFIER_SEPARATORS = re.compile(r"(?:[\s\-_/,:;]|\.(?!\d)|(?<!\d)\.)+")


def anls_score(prediction: str, truth: str) -> float:
    """Average Normalised Levenshtein Similarity for one pair (Biten et al. 2019), exact on identifiers.

    Two quantities must be equal (``$1,234.56`` = ``1234.56``, ``1234.57`` is not). A string
    with a digit (an invoice number, a date, a phone number) must equal the ground truth, case
    and separators (spaces, ``- _ / , : ;``) aside: one wrong digit is a wrong answer, however
    similar. Free text scores
    ``1 - lev(p, t) / max(|p|, |t|)`` on lowercased, whitespace-collapsed strings, and 0 when that
    similarity is below the threshold 0.5. (The official MMPR code returned the raw normalised
    *distance* here, which scores a totally wrong answer as correct.)
    """
    p_quantity, t_quantity = parse_quantity(prediction), parse_quantity(truth)
    if p_quantity is not None and t_quantity is not None:
        return float(quantities_match(p_quantity, t_quantity, lambda a, b: a == b))
    p = " ".join(clean_answer(prediction).lower().split())
    t = " ".join(clean_answer(truth).lower().split())
    if not p and not t:
        return 1.0
    if re.search(r"\d", p + t):
        return float(_IDENTIFIER_SEPARATORS.sub(" ", p).strip() == _IDENTIFIER_SEPARATORS.sub(" ", t).strip())
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
