"""Hand-made sample logs for the RL hand-off tests, with pass rates worked out by hand.

Eight questions, responses in prompt v1's format (``Final answer: ..``), each question's count of
correct responses chosen so that every edge of MMPR-Tiny's band [0.2, 0.8] is met:

    id  dataset      images        answer          samples  correct  unparsable  pass rate
    q1  toy          a.png         3               5        1        1           0.2   (lower edge: kept)
    q2  toy          b.png         B               5        4        0           0.8   (upper edge: kept; "(B)", "B." are B)
    q3  toy          a.png         7               2        0        0           0     (all wrong)
    q4  toy          c.png         cat             2        2        0           1     (all right; "Cat" too)
    q5  toy          a.png c.png   ["4", "four"]   5        3        1           0.6   (either answer counts)
    q6  toy          a.png         -               1        -        0           -     (no ground truth: Dropout-NTP's)
    q7  toy          -             \\frac{1}{2}     5        2        0           0.4   (text-only; 0.5 and 1/2 by math-verify)
    q8  chartqa_toy  b.png         12.5            2        1        0           0.5   (relaxed accuracy: 12.9 is within 5 %)

So ``rl-prompts`` keeps q1, q2, q5, q7, q8 by default. Images are 64x64 (one tile at the tiny
model's 64-pixel tile size, whatever the tile budget).
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from data_pipeline.prompts import build_cot_prompt, get_template
from data_pipeline.records import SampleRecord
from mpo.data.prompting import INTERNVL_SYSTEM_MESSAGE

TEMPLATE = get_template("v1")
MAX_TILES = 2


def answered(answer: object) -> str:
    return f"Let me think.\nFinal answer: {answer}"


QUESTIONS = [
    ("q1", "toy", ["a.png"], "How many shapes?", "3", [answered(3), answered(4), answered(5), answered(6), "no idea"]),
    ("q2", "toy", ["b.png"], "Which option? A. red B. blue", "B",
     [answered("B"), answered("(B)"), answered("B."), answered("B"), answered("A")]),
    ("q3", "toy", ["a.png"], "What number is shown?", "7", [answered(1), answered(2)]),
    ("q4", "toy", ["c.png"], "What animal is this?", "cat", [answered("cat"), answered("Cat")]),
    ("q5", "toy", ["a.png", "c.png"], "How many shapes in total?", ["4", "four"],
     [answered("four"), answered(4), answered("4 "), answered(5), "unsure"]),
    ("q6", "toy", ["a.png"], "Describe the image.", None, ["A red square on a plain background.\nFinal answer: red"]),
    ("q7", "toy", [], "What is one half as a fraction?", "\\frac{1}{2}",
     [answered("0.5"), answered("1/2"), answered("2"), answered("1"), answered("0.25")]),
    ("q8", "chartqa_toy", ["b.png"], "What is the bar's value?", "12.5", [answered(12.9), answered(15)]),
]
SELECTED = ["q1", "q2", "q5", "q7", "q8"]  # the default band, in input order
PASS_RATES = {  # id: (samples, correct, incorrect, unparsable, pass_rate)
    "q1": (5, 1, 3, 1, 0.2), "q2": (5, 4, 1, 0, 0.8), "q3": (2, 0, 2, 0, 0.0), "q4": (2, 2, 0, 0, 1.0),
    "q5": (5, 3, 1, 1, 0.6), "q6": (1, None, None, 0, None), "q7": (5, 2, 3, 0, 0.4), "q8": (2, 1, 1, 0, 0.5),
}


def prompt_of(question_id: str) -> str:
    _, _, images, question, *_ = next(q for q in QUESTIONS if q[0] == question_id)
    return build_cot_prompt(question, len(images), TEMPLATE)


def write_workspace(root: Path) -> Path:
    """``root/images/{a,b,c}.png`` and ``root/samples.jsonl`` (a sample log, as ``mpo-data sample`` writes it)."""
    (root / "images").mkdir(parents=True)
    for name, colour in (("a", (200, 40, 40)), ("b", (40, 200, 40)), ("c", (40, 40, 200))):
        Image.new("RGB", (64, 64), colour).save(root / "images" / f"{name}.png")
    with open(root / "samples.jsonl", "w", encoding="utf-8") as handle:
        for line, (qid, dataset, images, question, answer, responses) in enumerate(QUESTIONS, start=1):
            record = SampleRecord(
                id=qid, dataset=dataset, line=line, image=images, question=question, prompt=prompt_of(qid),
                answer=answer, answer_format="final_answer", responses=responses, finish_reasons=["stop"] * len(responses),
                max_tiles=MAX_TILES, system_prompt=INTERNVL_SYSTEM_MESSAGE, prompt_version="v1",
            )
            handle.write(json.dumps(record.to_json(), ensure_ascii=False) + "\n")
    return root
