"""Answer extraction (both prompt versions) and matching (every mode), as tables of exact cases.

Each row is a case a plausible broken implementation gets wrong: the official ANLS bug, letter
answers that are words, units, tolerances at the boundary, LaTeX, VQA normalisation quirks.
"""

from __future__ import annotations

import pytest

from data_pipeline.extract import extract_boxed, extract_final_answer, fix_answer
from data_pipeline.match import (
    DEFAULT_MODES,
    anls_score,
    judge,
    math_score,
    modes_for_dataset,
    numeric_score,
    option_letter,
    option_score,
    parse_modes,
    relaxed_score,
    vqa_normalize,
    vqa_score,
)

# (response, expected answer or None when unparsable)
FINAL_ANSWER_CASES = [
    ("There are three circles.\nFinal answer: 3", "3"),
    ("Reasoning here. Final answer: B", "B"),
    ("I think so.\nFinal Answer: yes", "yes"),  # capitalised trigger accepted
    ("**Reasoning** counts 4.\n**Final answer:** 4", "4"),  # markdown bold stripped
    ("Count: 2.\nFinal answer: 2\n", "2"),  # trailing newline is not a second line
    ("Final answer: 3", None),  # no rationale before the trigger
    ("   \nFinal answer: 3", None),  # whitespace is not a rationale
    ("It is 3.", None),  # no trigger at all
    ("Step. Final answer: 3. Again. Final answer: 4. Once more. Final answer: 5", None),  # 3 triggers
    ("First guess. Final answer: 3. On reflection. Final answer: 4", "4"),  # 2 triggers: the last
    ("Reasoning.\nFinal answer: 3\nbecause of the red one", None),  # answer spans two lines
    ("Reasoning.\nFinal answer:   ", None),  # empty answer
    ("Reasoning.\nfinal answer: 3", None),  # lowercase trigger is not the format
    ("先数圆。\n答案: 3", "3"),  # the Chinese prompt's trigger (official: 答案:)
    ("先数圆。\n答案：3", "3"),  # ... with the full-width colon its answers use
    ("共有三个，所以最终答案：B", "B"),  # 最终答案： ends in the trigger
    ("答案：3", None),  # no rationale before it
    ("想。答案: 3。再想。答案: 4。又想。答案: 5", None),  # 3 triggers
    ("圆是红的，答案: 4\nSo in the end.\nFinal answer: 3", "3"),  # "Final answer:" comes first in the order
    ("Reasoning.\nRéponse finale : 3", None),  # other languages' triggers are unparsable
]


@pytest.mark.parametrize(("response", "expected"), FINAL_ANSWER_CASES)
def test_extract_final_answer(response: str, expected: str | None) -> None:
    extraction = extract_final_answer(response)
    assert extraction.answer == expected
    if expected is not None:
        assert response[extraction.start : extraction.end] == expected
    else:
        assert extraction.error


BOXED_CASES = [
    ("So x = 2.\nAnswer: \\boxed{2}", "2"),
    ("\\boxed{1} then \\boxed{\\frac{3}{4}}", "\\frac{3}{4}"),  # the last box, nested braces
    ("Answer: \\boxed{ 12 cm }", "12 cm"),
    ("Answer: \\boxed{}", None),
    ("Answer: \\boxed{\\frac{1}{2}", None),  # unbalanced
    ("The answer is 2.", None),  # no box: unparsable, not the whole response
]


@pytest.mark.parametrize(("response", "expected"), BOXED_CASES)
def test_extract_boxed(response: str, expected: str | None) -> None:
    assert extract_boxed(response).answer == expected


def test_answer_fix_rewrites_only_the_final_answer() -> None:
    response = "The 12 cm side is longest.\nFinal answer: 12 cm"
    extraction = extract_final_answer(response)
    assert fix_answer(response, extraction, "12") == "The 12 cm side is longest.\nFinal answer: 12"
    boxed = "x is 0.5\nAnswer: \\boxed{0.50}"
    assert fix_answer(boxed, extract_boxed(boxed), "\\frac{1}{2}") == "x is 0.5\nAnswer: \\boxed{\\frac{1}{2}}"


@pytest.mark.parametrize(
    ("text", "letter"),
    [("A", "A"), ("A.", "A"), ("(A)", "A"), ("B)", "B"), ("C: blue", "C"), ("D. the red circle", "D"),
     ("**B**", "B"), ("(c)", "C"), ("a", "A"), ("Apple", None), ("A cat", None), ("a.", None), ("12", None)],
)
def test_option_letter(text: str, letter: str | None) -> None:
    assert option_letter(text) == letter


# (prediction, truth, scorer, expected score)
SCORE_CASES = [
    ("(B)", "B", option_score, 1.0),
    ("B. blue", "B", option_score, 1.0),
    ("C", "B", option_score, 0.0),
    ("B", "blue", option_score, 0.0),  # truth is not a letter: this mode does not apply
    ("12 cm", "12", numeric_score, 1.0),
    ("30°", "30", numeric_score, 1.0),
    ("45 degrees", "45", numeric_score, 1.0),
    ("50%", "50", numeric_score, 1.0),
    ("1,234", "1234", numeric_score, 1.0),
    ("1,000", "1000", numeric_score, 1.0),
    ("3.0", "3", numeric_score, 1.0),  # the same integer
    ("100.1", "100", numeric_score, 0.0),  # an integer truth is exact (1e-3 relative accepted this)
    ("1001", "1000", numeric_score, 0.0),
    ("2018", "2020", numeric_score, 0.0),  # years
    ("-3", "3", numeric_score, 0.0),  # the sign counts
    ("12.51", "12.5", numeric_score, 1.0),  # a non-integer truth: 0.08 % is inside 1e-3
    ("12.52", "12.5", numeric_score, 0.0),  # 0.16 % is outside
    ("3.1416", "3.14159", numeric_score, 1.0),
    ("0.0001", "0", numeric_score, 0.0),  # zero truth needs exactly zero
    ("12 apples", "12", numeric_score, 0.0),  # not a unit this mode strips
    ("\\frac{1}{2}", "0.5", math_score, 1.0),
    ("1/2", "0.5", math_score, 1.0),
    ("2\\sqrt{2}", "\\sqrt{8}", math_score, 1.0),
    ("x^2+2x+1", "(x+1)^2", math_score, 1.0),
    ("3", "3\\pi", math_score, 0.0),  # bare 3\pi must not parse as 3
    ("0.333", "1/3", math_score, 0.0),
    ("0.333333", "1/3", math_score, 1.0),  # math-verify's rounding, on a non-integer
    ("3.0", "3", math_score, 1.0),
    ("2.0000001", "2.0", math_score, 0.0),  # plain numbers: the numeric rule (math-verify rounds it to 2)
    ("1001", "1000", math_score, 0.0),
    ("-3", "3", math_score, 0.0),
    ("x-1", "x+1", math_score, 0.0),
    ("2+3", "2/3", math_score, 0.0),
    ("yes", "no", math_score, 0.0),
    ("Two dogs", "2 dogs", vqa_score, 1.0),  # number words and case
    ("the cat.", "cat", vqa_score, 1.0),  # articles and final period
    ("isnt", "isn't", vqa_score, 1.0),  # contraction restored
    ("red-white", "red white", vqa_score, 1.0),  # a hyphen between words becomes a space
    ("black/white", "black white", vqa_score, 1.0),  # ... a slash too
    ("-3", "3", vqa_score, 0.0),  # signs and operators survive (EvalAI's rules turn them into spaces)
    ("x-1", "x+1", vqa_score, 0.0),
    ("2+3", "2/3", vqa_score, 0.0),
    ("x>2", "x<2", vqa_score, 0.0),
    ("x = 2", "x=2", vqa_score, 1.0),  # spaces around an operator do not count
    ("- 3", "-3", vqa_score, 1.0),
    ("1,2", "12", vqa_score, 0.0),  # only a thousands separator is dropped
    ("1,000", "1000", vqa_score, 1.0),
    ("3.5", "35", vqa_score, 0.0),  # a decimal point is kept
    (".5", "5", vqa_score, 0.0),  # ... also a leading one
    ("", "", vqa_score, 0.0),  # nothing matches nothing
    ("21", "20", relaxed_score, 1.0),  # within 5 %: charts keep their tolerance on integers
    ("-20", "20", relaxed_score, 0.0),
    ("x-1", "x+1", relaxed_score, 0.0),
    ("21.5", "20", relaxed_score, 0.0),  # 7.5 % off
    ("2019", "2018", relaxed_score, 0.0),  # years are exact
    ("52%", "50", relaxed_score, 1.0),
    ("Apple", "apple", relaxed_score, 1.0),  # non-numbers: case-insensitive exact
    ("hello wrld", "hello world", anls_score, 1 - 1 / 11),
    ("xyz", "abc", anls_score, 0.0),  # the official bug scored this 1.0 (distance 3 / 3)
    ("abcdef", "abcxyz", anls_score, 0.5),  # at the threshold: kept
    ("x-1", "x+1", anls_score, 2 / 3),  # a similarity, judged wrong (not > 0.9)
    ("abcdefg", "abcxyzw", anls_score, 0.0),  # 3/7 similarity: below 0.5
    ("Apple  Inc", "apple inc", anls_score, 1.0),  # case and spacing normalised
]


@pytest.mark.parametrize(("prediction", "truth", "scorer", "expected"), SCORE_CASES)
def test_scores(prediction: str, truth: str, scorer, expected: float) -> None:
    assert scorer(prediction, truth) == pytest.approx(expected, abs=1e-9)


# (prediction, truth, modes, correct?, deciding mode)
JUDGE_CASES = [
    ("B", "b", DEFAULT_MODES, True, "exact"),
    ("(C) 5", "C", DEFAULT_MODES, True, "option"),
    ("7 cm", "7", DEFAULT_MODES, True, "numeric"),
    ("two", "2", DEFAULT_MODES, True, "vqa"),
    ("\\frac{3}{4}", "0.75", DEFAULT_MODES, True, "math"),
    ("3", ["three", "3"], DEFAULT_MODES, True, "exact"),  # any acceptable answer
    ("5", ["three", "3"], DEFAULT_MODES, False, None),
    ("Apple Inc.", "apple inc", ("exact", "anls"), False, "anls"),  # ANLS 0.9 is not > 0.9
    ("hello world!", "hello world", ("exact", "anls"), True, "anls"),  # 11/12 = 0.917 > 0.9
    ("104", "100", ("exact", "relaxed"), True, "relaxed"),
    ("104", "100", DEFAULT_MODES, False, None),  # 4 % is far outside 1e-3
    # Wrong answers every default mode must refuse (each was judged correct before).
    ("-3", "3", DEFAULT_MODES, False, None),
    ("x-1", "x+1", DEFAULT_MODES, False, None),
    ("2+3", "2/3", DEFAULT_MODES, False, None),
    ("x>2", "x<2", DEFAULT_MODES, False, None),
    ("2018", "2020", DEFAULT_MODES, False, None),
    ("1001", "1000", DEFAULT_MODES, False, None),
    ("(1,2)", "12", DEFAULT_MODES, False, None),
    # ... and right ones they must still accept.
    ("3.0", "3", DEFAULT_MODES, True, "numeric"),
    ("1,000", "1000", DEFAULT_MODES, True, "numeric"),
    ("12 cm", "12", DEFAULT_MODES, True, "numeric"),
    ("B. blue", "B", DEFAULT_MODES, True, "option"),
    ("x + 1", "x+1", DEFAULT_MODES, True, "vqa"),
    ("x^2+2x+1", "(x+1)^2", DEFAULT_MODES, True, "math"),
    ("-\\frac{1}{2}", "-0.5", DEFAULT_MODES, True, "math"),
    ("2019", "2018", ("exact", "relaxed"), False, None),  # charts: years exact
    ("-3", "3", ("exact", "anls"), False, "anls"),  # ANLS 0.5: kept as a score, not > 0.9
]


@pytest.mark.parametrize(("prediction", "truth", "modes", "correct", "mode"), JUDGE_CASES)
def test_judge(prediction: str, truth, modes, correct: bool, mode: str | None) -> None:
    verdict = judge(prediction, truth, modes)
    assert (verdict.correct, verdict.mode) == (correct, mode)


def test_mode_selection() -> None:
    assert modes_for_dataset("chartqa_train_18k") == ("exact", "relaxed")
    assert modes_for_dataset("DocVQA") == ("exact", "anls")
    assert modes_for_dataset("shapes") == DEFAULT_MODES
    assert parse_modes("auto") is None
    assert parse_modes("anls,numeric") == ("exact", "anls", "numeric")
    with pytest.raises(ValueError, match="fuzzy"):
        parse_modes("fuzzy")


def test_vqa_normalize_examples() -> None:
    assert vqa_normalize("The Two dogs!") == "2 dogs"
    assert vqa_normalize("1,000 people") == "1000 people"
