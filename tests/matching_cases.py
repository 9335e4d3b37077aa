"""Answer-matching cases, right and wrong answers in every mode, for ``test_pipeline_matching.py``.

Each case is a final answer written into a whole response, a prompt v1 one (``Final answer: ..``)
or a v2 one (``\\boxed{..}``), so a case checks extraction and judging together, the way the
pipeline's match stage runs them. ``right`` says whether the answer is right: every case must be
judged accordingly.

``mode`` is the rule the case exercises (the rates are reported by it); ``modes`` is what the
case is judged with: ``auto:<dataset name>`` (the modes ``--mode auto`` picks for that name) or a
``--mode`` list. A wrong answer judged correct becomes a *chosen* response; a right one judged
wrong becomes a *rejected* one.

The matcher before its unit, integer, option, bracket and identifier rules (commit fa488aa),
run through the same extraction and judge, accepted 39 of these 114 wrong answers and rejected
44 of the 123 right ones:

    mode      wrong accepted   right rejected
    exact       0/10             5/10
    option      6/18             9/19
    numeric    11/25            12/31
    math       11/21             1/22
    vqa         3/14             5/14
    relaxed     5/14             6/14
    anls        3/12             6/13
"""

from __future__ import annotations

from typing import NamedTuple

RATIONALE = "Reading the figure step by step, I work out the result."


class Case(NamedTuple):
    mode: str
    modes: str
    fmt: str  # "v1" (Final answer:) or "v2" (\boxed{})
    answer: str
    truth: str | list[str]
    right: bool

    def response(self) -> str:
        """The whole sampled response that carries ``answer`` in this case's prompt format."""
        if self.fmt == "v1":
            return f"{RATIONALE}\nFinal answer: {self.answer}"
        return f"{RATIONALE}\nAnswer: \\boxed{{{self.answer}}}"


DEFAULT = "auto:mathvista"  # any name without a per-dataset rule gets the default modes
GEOMETRY, GEOS = "auto:geometry3k", "auto:geos"
CHART, DOCUMENT = "auto:chartqa", "auto:docvqa"

_ROWS: list[tuple[str, str, str, str, str | list[str], bool]] = [
    # exact: case-insensitive equality of the answers without their markup
    ("exact", "exact", "v1", "Yes", "yes", True),
    ("exact", "exact", "v2", "\\text{yes}", "yes", True),
    ("exact", "exact", "v1", "**Yes**", "yes", True),
    ("exact", "exact", "v1", "Paris.", "Paris", True),
    ("exact", "exact", "v2", "\\textbf{red}", "red", True),
    ("exact", "exact", "v1", "The answer is yes", "yes", True),
    ("exact", "exact", "v1", "kitten", ["cat", "kitten"], True),
    ("exact", "exact", "v2", "Blue", "blue", True),
    ("exact", "exact", "v1", "$x$", "x", True),
    ("exact", "exact", "v1", "北京", "北京", True),
    ("exact", "exact", "v1", "no", "yes", False),
    ("exact", "exact", "v2", "\\text{no}", "yes", False),
    ("exact", "exact", "v1", "yes and no", "yes", False),
    ("exact", "exact", "v1", "cats", "cat", False),
    ("exact", "exact", "v1", "not red", "red", False),
    ("exact", "exact", "v2", "reds", "red", False),
    ("exact", "exact", "v1", "The answer is no", "yes", False),
    ("exact", "exact", "v1", "上海", "北京", False),
    ("exact", "exact", "v2", "left", "right", False),
    ("exact", "exact", "v1", "dog", ["cat", "kitten"], False),
    # option: the answer names exactly one option, the ground truth's
    ("option", DEFAULT, "v1", "B", "B", True),
    ("option", DEFAULT, "v1", "(B)", "B", True),
    ("option", DEFAULT, "v1", "B. blue", "B", True),
    ("option", DEFAULT, "v1", "B: blue", "B", True),
    ("option", DEFAULT, "v1", "Option B", "B", True),
    ("option", DEFAULT, "v1", "The answer is C.", "C", True),
    ("option", DEFAULT, "v1", "The correct option is (D).", "D", True),
    ("option", DEFAULT, "v1", "**(A)**", "A", True),
    ("option", DEFAULT, "v2", "\\text{B}", "B", True),
    ("option", DEFAULT, "v2", "\\textbf{B}", "B", True),
    ("option", DEFAULT, "v2", "(C)", "C", True),
    ("option", DEFAULT, "v2", "\\text{(C) 12 cm}", "C", True),
    ("option", DEFAULT, "v1", "(b)", "B", True),
    ("option", DEFAULT, "v1", "B) 45°", "B", True),
    ("option", DEFAULT, "v1", "Choice: A", "A", True),
    ("option", DEFAULT, "v1", "B", "(B)", True),
    ("option", DEFAULT, "v1", "D. the angle at C", "D", True),
    ("option", "exact,option", "v2", "\\text{Option B}", "B", True),
    ("option", DEFAULT, "v1", "A", "A. 12 cm", True),
    ("option", DEFAULT, "v1", "(A) or (B)", "A", False),
    ("option", DEFAULT, "v1", "(A) or (B)", "B", False),
    ("option", DEFAULT, "v1", "(B) is wrong; the answer is (C)", "B", False),
    ("option", DEFAULT, "v1", "A: 3, B: 4", "A", False),
    ("option", DEFAULT, "v1", "A and B", "A", False),
    ("option", DEFAULT, "v1", "C", "B", False),
    ("option", DEFAULT, "v1", "(C)", "B", False),
    ("option", DEFAULT, "v2", "\\text{C}", "B", False),
    ("option", DEFAULT, "v1", "Option C", "B", False),
    ("option", DEFAULT, "v1", "The answer is D.", "B", False),
    ("option", DEFAULT, "v1", "A cat", "A", False),
    ("option", DEFAULT, "v1", "A, B", "A", False),
    ("option", DEFAULT, "v1", "B or C", "B", False),
    ("option", DEFAULT, "v2", "\\text{(A) and (C)}", "A", False),
    ("option", DEFAULT, "v1", "B. blue, C. red", "B", False),
    ("option", DEFAULT, "v1", "A) 3 B) 4", "A", False),
    ("option", "exact,option", "v2", "(A) or (B)", "A", False),
    ("option", DEFAULT, "v1", "C", "A. 12 cm", False),
    # numeric: quantities, their units, integers exact
    ("numeric", DEFAULT, "v1", "12 cm", "12", True),
    ("numeric", DEFAULT, "v1", "12", "12 cm", True),
    ("numeric", DEFAULT, "v1", "1,000", "1000", True),
    ("numeric", DEFAULT, "v1", "3.0", "3", True),
    ("numeric", DEFAULT, "v1", "twelve", "12", True),
    ("numeric", DEFAULT, "v1", "Twenty-one", "21", True),
    ("numeric", DEFAULT, "v2", "5\\,\\text{cm}^2", "5 cm²", True),
    ("numeric", DEFAULT, "v1", "5 square centimeters", "5 cm^2", True),
    ("numeric", DEFAULT, "v1", "30°", "30", True),
    ("numeric", DEFAULT, "v2", "30^\\circ", "30°", True),
    ("numeric", DEFAULT, "v1", "45 degrees", "45°", True),
    ("numeric", DEFAULT, "v1", "50%", "50", True),
    ("numeric", DEFAULT, "v2", "50\\%", "50 percent", True),
    ("numeric", DEFAULT, "v1", "$1,234.56", "1234.56", True),
    ("numeric", DEFAULT, "v2", "\\$12", "12", True),
    ("numeric", DEFAULT, "v1", "12.51", "12.5", True),
    ("numeric", DEFAULT, "v1", "3.1416", "3.14159", True),
    ("numeric", DEFAULT, "v1", "60 km/h", "60 kilometers per hour", True),
    ("numeric", DEFAULT, "v2", "2 \\text{ hours}", "2 h", True),
    ("numeric", DEFAULT, "v1", "x = 5", "5", True),
    ("numeric", DEFAULT, "v1", "−3", "-3", True),
    ("numeric", DEFAULT, "v2", "1\\,000", "1000", True),
    ("numeric", DEFAULT, "v1", "7 metres", "7 m", True),
    ("numeric", DEFAULT, "v2", "5\\text{ million}", "5,000,000", True),
    ("numeric", DEFAULT, "v1", "3 days", "72 hours", True),
    ("numeric", DEFAULT, "v1", "2.0 m", "200 cm", True),
    ("numeric", DEFAULT, "v2", "8\\,\\mathrm{kg}", "8000 g", True),
    ("numeric", DEFAULT, "v1", "1.5 hours", "90 minutes", True),
    ("numeric", "exact,numeric", "v1", "$1,234.56", "1234.56", True),
    ("numeric", GEOMETRY, "v1", "40", "40", True),
    ("numeric", GEOS, "v2", "125^\\circ", "125", True),
    ("numeric", DEFAULT, "v1", "5 km", "5 m", False),
    ("numeric", DEFAULT, "v1", "3 hours", "3 minutes", False),
    ("numeric", DEFAULT, "v2", "5 \\text{cm}^2", "5 \\text{cm}", False),
    ("numeric", DEFAULT, "v1", "1001", "1000", False),
    ("numeric", DEFAULT, "v1", "2018", "2020", False),
    ("numeric", DEFAULT, "v1", "-3", "3", False),
    ("numeric", DEFAULT, "v1", "100.1", "100", False),
    ("numeric", DEFAULT, "v1", "12.52", "12.5", False),
    ("numeric", DEFAULT, "v1", "thirteen", "12", False),
    ("numeric", DEFAULT, "v1", "30°", "30%", False),
    ("numeric", DEFAULT, "v1", "50%", "50 cm", False),
    ("numeric", DEFAULT, "v1", "€5", "$5", False),
    ("numeric", DEFAULT, "v2", "5 \\text{ kg}", "5 g", False),
    ("numeric", DEFAULT, "v1", "0.0001", "0", False),
    ("numeric", DEFAULT, "v1", "5-6", "5", False),
    ("numeric", DEFAULT, "v1", "12 cm", "12 mm", False),
    ("numeric", DEFAULT, "v1", "2 hours", "2 days", False),
    ("numeric", DEFAULT, "v1", "5 million", "5 billion", False),
    ("numeric", DEFAULT, "v1", "5 million", "5", False),
    ("numeric", DEFAULT, "v1", "5 ft", "5 m", False),
    ("numeric", DEFAULT, "v1", "12 km/h", "12 m/s", False),
    ("numeric", "exact,numeric", "v2", "5\\,\\mathrm{km}", "5\\,\\mathrm{m}", False),
    ("numeric", GEOMETRY, "v1", "41", "40", False),
    ("numeric", GEOS, "v2", "125", "130", False),
    ("numeric", GEOMETRY, "v2", "31^\\circ", "30", False),
    # math: symbolic equivalence, units and brackets agreeing
    ("math", DEFAULT, "v2", "\\frac{1}{2}", "0.5", True),
    ("math", DEFAULT, "v2", "\\dfrac{3}{4}", "0.75", True),
    ("math", DEFAULT, "v2", "2\\sqrt{2}", "\\sqrt{8}", True),
    ("math", DEFAULT, "v2", "x^2+2x+1", "(x+1)^2", True),
    ("math", DEFAULT, "v2", "-\\frac{1}{2}", "-0.5", True),
    ("math", DEFAULT, "v2", "\\frac{\\pi}{2}", "\\pi/2", True),
    ("math", DEFAULT, "v2", "2\\pi \\text{ cm}", "2\\pi", True),
    ("math", DEFAULT, "v2", "\\frac{5}{2}\\,\\mathrm{cm}^2", "2.5 \\text{cm}^2", True),
    ("math", DEFAULT, "v2", "[0, 1)", "[0,1)", True),
    ("math", DEFAULT, "v2", "x \\in [0, 1)", "[0, 1)", True),
    ("math", DEFAULT, "v2", "\\{1, 2\\}", "\\{2, 1\\}", True),
    ("math", DEFAULT, "v2", "1, 2", "\\{1, 2\\}", True),
    ("math", DEFAULT, "v2", "(-\\infty, 2) \\cup (3, \\infty)", "(-\\infty,2)\\cup(3,\\infty)", True),
    ("math", DEFAULT, "v2", "\\left(0, 1\\right]", "(0, 1]", True),
    ("math", DEFAULT, "v2", "y = 2x + 1", "2x+1", True),
    ("math", DEFAULT, "v1", "3\\sqrt{3}", "\\sqrt{27}", True),
    ("math", DEFAULT, "v2", "\\frac{\\sqrt{2}}{2}", "\\sqrt{2}/2", True),
    ("math", DEFAULT, "v2", "50\\%", "\\frac{1}{2}", True),
    ("math", DEFAULT, "v2", "90^\\circ", "90", True),
    ("math", "exact,math", "v1", "$\\frac{3}{2}$", "1.5", True),
    ("math", DEFAULT, "v2", "x = 2 \\text{ or } x = 3", "2, 3", True),
    ("math", DEFAULT, "v2", "\\frac{1}{2}\\text{ km}", "500\\text{ m}", True),
    ("math", DEFAULT, "v2", "3 \\text{ hours}", "3 \\text{ minutes}", False),
    ("math", DEFAULT, "v2", "\\frac{5}{2} \\text{ cm}^2", "2.5 \\text{ cm}", False),
    ("math", DEFAULT, "v2", "2\\pi \\text{ m}", "2\\pi \\text{ cm}", False),
    ("math", DEFAULT, "v2", "[0, 1)", "(0, 1]", False),
    ("math", DEFAULT, "v2", "\\{1,2\\}", "(1,2)", False),
    ("math", DEFAULT, "v2", "(1,2)", "(2,1)", False),
    ("math", DEFAULT, "v2", "(0, 1)", "[0, 1]", False),
    ("math", DEFAULT, "v2", "x-1", "x+1", False),
    ("math", DEFAULT, "v2", "-3", "3", False),
    ("math", DEFAULT, "v2", "2+3", "2/3", False),
    ("math", DEFAULT, "v2", "3", "3\\pi", False),
    ("math", DEFAULT, "v2", "0.333", "\\frac{1}{3}", False),
    ("math", DEFAULT, "v2", "\\sqrt{2}", "2", False),
    ("math", DEFAULT, "v2", "x > 2", "x < 2", False),
    ("math", DEFAULT, "v2", "5 \\text{ apples}", "5 \\text{ oranges}", False),
    ("math", DEFAULT, "v2", "\\frac{1}{2}\\,\\mathrm{m}", "0.5\\,\\mathrm{km}", False),
    ("math", DEFAULT, "v2", "\\{1, 2, 3\\}", "\\{1, 2\\}", False),
    ("math", DEFAULT, "v2", "2x", "x^2", False),
    ("math", DEFAULT, "v2", "[2, 3]", "\\{2, 3\\}", False),
    ("math", "exact,math", "v1", "$5\\text{ km}$", "$5\\text{ m}$", False),
    ("math", "exact,math", "v2", "\\frac{\\pi}{2} \\text{ rad}", "\\frac{\\pi}{2}^\\circ", False),
    # vqa: the VQA-score normalisation, signs, operators and brackets kept
    ("vqa", DEFAULT, "v1", "Two dogs", "2 dogs", True),
    ("vqa", DEFAULT, "v1", "the cat.", "cat", True),
    ("vqa", DEFAULT, "v1", "isnt", "isn't", True),
    ("vqa", DEFAULT, "v1", "red-white", "red white", True),
    ("vqa", DEFAULT, "v1", "x + 1", "x+1", True),
    ("vqa", "exact,vqa", "v1", "twelve", "12", True),
    ("vqa", DEFAULT, "v1", "Twelve people", "12 people", True),
    ("vqa", DEFAULT, "v1", "An apple", "apple", True),
    ("vqa", "exact,vqa", "v1", "$1,234.56", "1234.56", True),
    ("vqa", "exact,vqa", "v2", "(0, 1)", "(0,1)", True),
    ("vqa", DEFAULT, "v2", "\\text{the red one}", "red one", True),
    ("vqa", DEFAULT, "v1", "1,000 people", "1000 people", True),
    ("vqa", DEFAULT, "v1", "black/white", "black white", True),
    ("vqa", "exact,vqa", "v2", "20 \\text{cm}", "20", True),
    ("vqa", DEFAULT, "v1", "-3", "3", False),
    ("vqa", DEFAULT, "v1", "x-1", "x+1", False),
    ("vqa", DEFAULT, "v1", "2+3", "2/3", False),
    ("vqa", DEFAULT, "v1", "x>2", "x<2", False),
    ("vqa", "exact,vqa", "v1", "[0, 1)", "(0, 1]", False),
    ("vqa", "exact,vqa", "v2", "\\{1,2\\}", "(1,2)", False),
    ("vqa", "exact,vqa", "v1", "(1, 2]", "(1, 2)", False),
    ("vqa", DEFAULT, "v1", "1,2", "12", False),
    ("vqa", DEFAULT, "v1", "3.5", "35", False),
    ("vqa", "exact,vqa", "v1", "5 km", "5 m", False),
    ("vqa", DEFAULT, "v1", "three dogs", "2 dogs", False),
    ("vqa", DEFAULT, "v1", "red", "red white", False),
    ("vqa", DEFAULT, "v1", "eleven", "12", False),
    ("vqa", "exact,vqa", "v2", "\\text{(1, 2)}", "[1, 2]", False),
    # relaxed: charts, 5 % on non-integers, integers exact
    ("relaxed", CHART, "v1", "2019.0", "2019", True),
    ("relaxed", CHART, "v1", "40.5", "40.2", True),
    ("relaxed", CHART, "v1", "12.3%", "12.5%", True),
    ("relaxed", CHART, "v1", "12.3", "12.5%", True),
    ("relaxed", CHART, "v1", "5.2 million", "5.2", True),
    ("relaxed", CHART, "v1", "5,200,000", "5.2 million", True),
    ("relaxed", CHART, "v1", "$1,234", "1234", True),
    ("relaxed", CHART, "v1", "Yes", "yes", True),
    ("relaxed", CHART, "v1", "41", "41.0", True),
    ("relaxed", CHART, "v2", "41", "41", True),
    ("relaxed", CHART, "v2", "\\text{Yes}", "yes", True),
    ("relaxed", CHART, "v1", "twelve", "12", True),
    ("relaxed", CHART, "v1", "0.52", "0.5", True),
    ("relaxed", CHART, "v2", "1.04", "1.02", True),
    ("relaxed", CHART, "v1", "41", "40", False),
    ("relaxed", CHART, "v1", "125", "130", False),
    ("relaxed", CHART, "v1", "21", "20", False),
    ("relaxed", CHART, "v1", "2020", "2019", False),
    ("relaxed", CHART, "v1", "52%", "50", False),
    ("relaxed", CHART, "v1", "-20", "20", False),
    ("relaxed", CHART, "v1", "21.5", "20.2", False),
    ("relaxed", CHART, "v1", "0.56", "0.5", False),
    ("relaxed", CHART, "v1", "Apple", "Orange", False),
    ("relaxed", CHART, "v1", "5.2 million", "5.2 billion", False),
    ("relaxed", CHART, "v1", "12 km", "12 m", False),
    ("relaxed", CHART, "v1", "x-1", "x+1", False),
    ("relaxed", CHART, "v2", "\\text{No}", "yes", False),
    ("relaxed", CHART, "v2", "1001", "1000", False),
    # anls: documents, exact on numbers and identifiers, ANLS on free text
    ("anls", DOCUMENT, "v1", "$1,234.56", "1234.56", True),
    ("anls", DOCUMENT, "v1", "Apple Inc.", "apple inc", True),
    ("anls", DOCUMENT, "v1", "hello world!", "hello world", True),
    ("anls", DOCUMENT, "v1", "INV-2023-0043", "inv-2023-0043", True),
    ("anls", DOCUMENT, "v1", "Jon Smithson", "John Smithson", True),
    ("anls", DOCUMENT, "v1", "Kuala  Lumpur", "Kuala Lumpur", True),
    ("anls", DOCUMENT, "v1", "1,000", "1000", True),
    ("anls", DOCUMENT, "v1", "12 March 2019", "12 march 2019", True),
    ("anls", DOCUMENT, "v2", "\\text{Acme Corp}", "Acme Corp", True),
    ("anls", DOCUMENT, "v1", "Depatment of Health", "Department of Health", True),
    ("anls", "auto:sroie", "v2", "\\$12.50", "12.50", True),
    ("anls", DOCUMENT, "v1", "INV 2023 0043", "INV-2023-0043", True),
    ("anls", DOCUMENT, "v2", "March 5, 2021", "March 5 2021", True),
    ("anls", DOCUMENT, "v1", "INV-2023-0043", "INV-2023-0042", False),
    ("anls", DOCUMENT, "v1", "1234.57", "1234.56", False),
    ("anls", DOCUMENT, "v1", "555-0134", "555-0143", False),
    ("anls", DOCUMENT, "v1", "2019-03-12", "2019-03-21", False),
    ("anls", DOCUMENT, "v1", "Apple", "Orange", False),
    ("anls", DOCUMENT, "v1", "apple pies", "apple pie", False),
    ("anls", DOCUMENT, "v1", "$1,234.56", "1234", False),
    ("anls", DOCUMENT, "v1", "Room 101", "Room 110", False),
    ("anls", DOCUMENT, "v2", "AB12345", "AB12346", False),
    ("anls", DOCUMENT, "v1", "12 March 2019", "13 March 2019", False),
    ("anls", DOCUMENT, "v2", "x-1", "x+1", False),
    ("anls", "auto:sroie", "v1", "12.5", "12.6", False),
]

CASES: list[Case] = [Case(*row) for row in _ROWS]
MODES = ("exact", "option", "numeric", "math", "vqa", "relaxed", "anls")
