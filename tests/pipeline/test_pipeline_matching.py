"""Answer extraction (both prompt versions) and matching (every mode), as tables of exact cases.

Each row is a case a plausible broken implementation gets wrong: the official ANLS bug, letter
answers that are words, units, tolerances at the boundary, LaTeX, VQA normalisation quirks.
``matching_cases.CASES`` holds right and wrong answers in every mode, judged through extraction
as the pipeline does; the tables here pin the pieces (quantities, units, options, brackets).
"""

from __future__ import annotations

import pytest
from matching_cases import CASES, MODES, Case

from data_pipeline.answer_text import clean_answer
from data_pipeline.extract import (
    extract_answer,
    extract_boxed,
    extract_final_answer,
    fix_answer,
)
from data_pipeline.match import (
    CHART_MODES,
    DEFAULT_MODES,
    DOCUMENT_MODES,
    anls_score,
    collection_brackets,
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
from data_pipeline.units import (
    Quantity,
    UnitReading,
    parse_quantity,
    read_unit,
    split_unit,
    unit_ratio,
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
    ("So B.\nAnswer: \\boxed{\\text{B}}", "B"),  # v2 prompts box letters as text: the answer is the letter
    ("So B.\nAnswer: \\boxed{ \\textbf{ (B) } }", "(B)"),
    ("Answer: \\boxed{\\text{\\textbf{B}}}", "B"),  # nested wrappers
    ("Answer: \\boxed{\\text{A} or \\text{B}}", "\\text{A} or \\text{B}"),  # a wrapper around part of it stays
    ("Answer: \\boxed{\\text{}}", None),  # empty once unwrapped
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
    lettered = "It is blue.\nAnswer: \\boxed{\\text{b}}"
    assert fix_answer(lettered, extract_boxed(lettered), "B") == "It is blue.\nAnswer: \\boxed{\\text{B}}"


@pytest.mark.parametrize(
    ("text", "letter"),
    [("A", "A"), ("A.", "A"), ("(A)", "A"), ("B)", "B"), ("C: blue", "C"), ("D. the red circle", "D"),
     ("**B**", "B"), ("(c)", "C"), ("a", "A"), ("Apple", None), ("A cat", None), ("a.", None), ("12", None),
     ("Option B", "B"), ("option (c)", "C"), ("The answer is C.", "C"), ("\\text{B}", "B"), ("$\\boxed{B}$", "B"),
     ("The correct option is (D).", "D"), ("B. Point A lies on the circle", "B"), ("D. the angle at C", "D"),
     ("B. f(x) = 2x", "B"), ("(a) or (b)", None),
     ("(A) or (B)", None), ("A or B", None), ("A, B", None), ("A: 3, B: 4", None), ("A) 3 B) 4", None),
     ("(B) is wrong; the answer is (C)", None), ("(B) is wrong; the answer is C", None), ("B. blue, C. red", None)],
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
    ("21", "20", relaxed_score, 0.0),  # an integer truth is exact, charts included (5 % accepted it)
    ("20.9", "20.5", relaxed_score, 1.0),  # a non-integer one keeps ChartQA's 5 %
    ("2019.0", "2019", relaxed_score, 1.0),  # the same integer
    ("-20", "20", relaxed_score, 0.0),
    ("x-1", "x+1", relaxed_score, 0.0),
    ("21.5", "20", relaxed_score, 0.0),  # 7.5 % off
    ("2019", "2018", relaxed_score, 0.0),  # years are exact
    ("52%", "50", relaxed_score, 0.0),
    ("52.5%", "50.5", relaxed_score, 1.0),  # 4 %, the "%" on one side only
    ("5.2 million", "5.2", relaxed_score, 1.0),  # an axis in millions
    ("Apple", "apple", relaxed_score, 1.0),  # non-numbers: case-insensitive exact
    ("hello wrld", "hello world", anls_score, 1 - 1 / 11),
    ("xyz", "abc", anls_score, 0.0),  # the official bug scored this 1.0 (distance 3 / 3)
    ("abcdef", "abcxyz", anls_score, 0.5),  # at the threshold: kept
    ("x-1", "x+1", anls_score, 0.0),  # a string with a digit is exact
    ("INV-2023-0043", "INV-2023-0042", anls_score, 0.0),  # ANLS 12/13 = 0.92 would pass it
    ("$1,234.56", "1234.56", anls_score, 1.0),  # two quantities: equal
    ("1234.57", "1234.56", anls_score, 0.0),  # ... exactly, no tolerance in documents
    ("apple pies", "apple pie", anls_score, 0.9),
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
    ("two", "2", DEFAULT_MODES, True, "numeric"),
    ("\\frac{3}{4}", "0.75", DEFAULT_MODES, True, "math"),
    ("3", ["three", "3"], DEFAULT_MODES, True, "exact"),  # any acceptable answer
    ("5", ["three", "3"], DEFAULT_MODES, False, None),
    ("Apple Inc.", "apple inc", ("exact", "anls"), True, "exact"),  # the final full stop is not the answer
    ("apple pies", "apple pie", ("exact", "anls"), False, "anls"),  # ANLS 0.9 is not > 0.9
    ("hello world!", "hello world", ("exact", "anls"), True, "anls"),  # 11/12 = 0.917 > 0.9
    ("10.4", "10.2", ("exact", "relaxed"), True, "relaxed"),
    ("104", "100", ("exact", "relaxed"), False, None),  # an integer truth is exact
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
    ("-3", "3", ("exact", "anls"), False, None),  # two different quantities
    ("Jon Smithson", "John Smithson", ("exact", "anls"), True, "anls"),  # free text: 12/13 ANLS
]


@pytest.mark.parametrize(("prediction", "truth", "modes", "correct", "mode"), JUDGE_CASES)
def test_judge(prediction: str, truth, modes, correct: bool, mode: str | None) -> None:
    verdict = judge(prediction, truth, modes)
    assert (verdict.correct, verdict.mode) == (correct, mode)


def test_mode_selection() -> None:
    assert modes_for_dataset("chartqa_train_18k") == ("exact", "relaxed")
    assert modes_for_dataset("DocVQA") == ("exact", "anls")
    assert modes_for_dataset("shapes") == DEFAULT_MODES
    # Geometry answers are lengths and angles read off a figure: no chart tolerance.
    assert modes_for_dataset("geometry3k") == modes_for_dataset("GeoS") == modes_for_dataset("clevr_math") == DEFAULT_MODES
    assert modes_for_dataset("sroie_receipts") == DOCUMENT_MODES == ("exact", "anls")
    assert CHART_MODES == ("exact", "relaxed")
    assert parse_modes("auto") is None
    assert parse_modes("anls,numeric") == ("exact", "anls", "numeric")
    with pytest.raises(ValueError, match="fuzzy"):
        parse_modes("fuzzy")


def test_vqa_normalize_examples() -> None:
    assert vqa_normalize("The Two dogs!") == "2 dogs"
    assert vqa_normalize("1,000 people") == "1000 people"
    assert vqa_normalize("[0, 1)") == "[0 1)"  # brackets of a mathematical answer stay
    assert vqa_normalize("\\{1, 2\\}") == "{1 2}"
    assert vqa_normalize("( 1 , 2 )") == "(1 2)"
    assert vqa_normalize("red (dark)") == "red dark"  # ... and go from words, as in EvalAI
    assert vqa_normalize("Twelve people") == "12 people"


@pytest.mark.parametrize(
    ("text", "cleaned"),
    [("**Yes**", "Yes"), ("$12$", "12"), ("\\(x+1\\)", "x+1"), ("\\text{12 cm}", "12 cm"), ("Paris.", "Paris"),
     ("The answer is $\\boxed{\\text{B}}$.", "B"), ("Final answer: 3", "3"), ("Option", "Option"),
     ("$5", "$5"), ("$x$ and $y$", "$x$ and $y$"), ("\\text{A} or \\text{B}", "\\text{A} or \\text{B}"),
     ("answer", "answer"), ("The answer isn't B", "The answer isn't B"), ("Choice of words", "Choice of words"),
     ("Option 2", "2"), ("the correct choice is (c)", "(c)")],
)
def test_clean_answer(text: str, cleaned: str) -> None:
    assert clean_answer(text) == cleaned


@pytest.mark.parametrize(
    ("text", "quantity"),
    [("12", Quantity(12.0)), ("-3", Quantity(-3.0)), ("−3", Quantity(-3.0)), ("1,234.5", Quantity(1234.5)),
     ("$1,234.56", Quantity(1234.56, 1.0, "$")), ("-$5", Quantity(-5.0, 1.0, "$")), ("\\$5", Quantity(5.0, 1.0, "$")),
     ("1\\,000", Quantity(1000.0)), ("1{,}000", Quantity(1000.0)), ("1e3", Quantity(1000.0)), (".5", Quantity(0.5)),
     ("twelve", Quantity(12.0)), ("Twenty-one", Quantity(21.0)), ("one hundred and five", Quantity(105.0)),
     ("12 cm", Quantity(12.0, 1.0, "cm")), ("12 centimetres", Quantity(12.0, 1.0, "cm")),
     ("5\\,\\text{cm}^2", Quantity(5.0, 1.0, "cm^2")), ("5 cm²", Quantity(5.0, 1.0, "cm^2")),
     ("5 square centimeters", Quantity(5.0, 1.0, "cm^2")), ("8 cubic feet", Quantity(8.0, 1.0, "ft^3")),
     ("30^\\circ", Quantity(30.0, 1.0, "°")), ("30°", Quantity(30.0, 1.0, "°")), ("30 degrees", Quantity(30.0, 1.0, "°")),
     ("30°C", Quantity(30.0, 1.0, "°c")), ("50\\%", Quantity(50.0, 1.0, "%")), ("50 percent", Quantity(50.0, 1.0, "%")),
     ("60 km/h", Quantity(60.0, 1.0, "km/h")), ("60 kilometers per hour", Quantity(60.0, 1.0, "km/h")),
     ("5.2 million", Quantity(5.2, 1e6, None)), ("$3bn", Quantity(3.0, 1e9, "$")), ("5k", Quantity(5.0, 1e3, None)),
     ("5 million dollars", Quantity(5.0, 1e6, "$")), ("x = 5", Quantity(5.0)), ("\\angle ABC = 30^\\circ", Quantity(30.0, 1.0, "°")),
     ("3 hours", Quantity(3.0, 1.0, "h")), ("3 hrs", Quantity(3.0, 1.0, "h")), ("3 minutes", Quantity(3.0, 1.0, "min")),
     ("12 apples", None), ("5 or 6", None), ("5-6", None), ("3/4", None), ("1,2345", None), ("one cat", None),
     ("tenth", None), ("$5 €", None), ("x + 1", None), ("", None)],
)
def test_parse_quantity(text: str, quantity: Quantity | None) -> None:
    assert parse_quantity(text) == quantity


def test_unit_readings() -> None:
    assert read_unit("") == UnitReading()
    assert read_unit("\\mathrm{km}") == read_unit("kilometres") == read_unit(" KM") == UnitReading(1.0, "km")
    assert read_unit("M") == UnitReading(1e6, None)  # a capital M is a million, a small one a metre
    assert read_unit("m") == UnitReading(1.0, "m")
    assert read_unit("mph") == read_unit("miles per hour") == UnitReading(1.0, "mi/h")
    assert read_unit("apples") is None
    assert split_unit("2\\pi \\text{ cm}") == ("2\\pi", UnitReading(1.0, "cm"))
    assert split_unit("\\frac{5}{2}\\,\\mathrm{cm}^2") == ("\\frac{5}{2}", UnitReading(1.0, "cm^2"))
    assert split_unit("90^\\circ") == ("90", UnitReading(1.0, "°"))
    assert split_unit("3m") == ("3m", UnitReading())  # a glued letter is a variable in a formula
    assert split_unit("x^2 + 1") == ("x^2 + 1", UnitReading())


@pytest.mark.parametrize(
    ("first", "second", "ratio"),
    [("km", "m", 1000.0), ("m", "km", 1e-3), ("day", "h", 24.0), ("cm", None, 1.0), (None, "%", 1.0), ("%", "%", 1.0),
     ("m^2", "cm^2", 1e4), ("ha", "m^2", 1e4), ("km/h", "m/s", 1 / 3.6), ("cent", "$", 0.01),
     ("km", "kg", None), ("cm^2", "cm", None), ("month", "day", None), ("°c", "°f", None), ("$", "€", None), ("%", "cm", None)],
)
def test_unit_ratio(first: str | None, second: str | None, ratio: float | None) -> None:
    """Units convert within a dimension (to 1e-12: "ha" is (100 m)^2 through floating point); others disagree."""
    assert unit_ratio(first, second) == (None if ratio is None else pytest.approx(ratio, rel=1e-12))


def test_collection_brackets() -> None:
    assert collection_brackets("[0, 1)") == ("[)",)
    assert collection_brackets("\\left(0, 1\\right]") == ("(]",)
    assert collection_brackets("\\{1, 2\\}") == collection_brackets("1, 2") == ("{}",)
    assert collection_brackets("x = 1 \\text{ or } x = 2") == ("{}",)  # "or" lists as a comma does
    assert collection_brackets("(-\\infty, 2) \\cup (3, \\infty)") == ("()", "()")
    assert collection_brackets("2(x+1)") == collection_brackets("\\frac{1}{2}") == ()


def test_case_table_covers_every_mode_both_ways() -> None:
    """At least 150 cases; every mode has right and wrong answers, and both prompt formats."""
    assert len(CASES) >= 150
    for mode in MODES:
        cases = [case for case in CASES if case.mode == mode]
        assert {case.right for case in cases} == {True, False}, mode
        assert {case.fmt for case in cases} == {"v1", "v2"}, mode


def _modes(spec: str) -> tuple[str, ...]:
    return modes_for_dataset(spec.removeprefix("auto:")) if spec.startswith("auto:") else parse_modes(spec)


@pytest.mark.parametrize("case", CASES, ids=[f"{c.mode}-{c.fmt}-{c.answer}-vs-{c.truth}" for c in CASES])
def test_case_table(case: Case) -> None:
    """Extract the answer from the whole response, then judge it with the case's modes."""
    extraction = extract_answer(case.response(), "final_answer" if case.fmt == "v1" else "boxed")
    assert extraction.ok, extraction.error
    assert judge(extraction.answer, case.truth, _modes(case.modes)).correct is case.right
