"""Per-question pass rates: how many of a question's sampled responses were judged correct.

The match stage's verdicts, kept as data: InternVL3.5's online-RL prompt set (MMPR-Tiny) is the
questions whose sampled accuracy lies in [0.2, 0.8], measured on the same rollouts the preference
pairs came from; ``mpo-data rl-prompts`` selects from this file. One line per judged question, in
input order (so a sharded or resumed build writes the same bytes as an uninterrupted one)::

    {"id", "dataset", "line": input line, "image": [paths relative to the image root],
     "question": the input question, "prompt": the CoT user turn sampled with (<image> placeholders),
     "prompt_version": "v1" | "v2" | "custom" | null, "answer_format": "final_answer" | "boxed",
     "system_prompt": text | null, "max_tiles": int | null, "answer": str | [str] | null,
     "match_modes": [modes], "match_threshold": float | null,
     "samples": K, "correct": int | null, "incorrect": int | null, "unparsable": int,
     "pass_rate": correct / K | null}

``pass_rate`` counts unparsable (and empty) responses as wrong, like the match report's accuracy.
A question without a ground truth (a Dropout-NTP one) has ``correct``, ``incorrect`` and
``pass_rate`` null. Nulls in ``prompt_version``/``max_tiles``/``match_threshold``: logs written
before they were recorded.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from fractions import Fraction

from data_pipeline.records import SampleRecord
from mpo.jsonl import write_jsonl_atomic

# Histogram bins: exact 0 (all wrong: re-sampled, no pairs) and 1 (all right: no pairs) apart, and
# MMPR-Tiny's band [0.2, 0.8] split in three, so the counts tell what each stage can use.
BINS: tuple[tuple[str, Fraction, Fraction, bool, bool], ...] = (
    # label, low, high, low inclusive, high inclusive
    ("0", Fraction(0), Fraction(0), True, True),
    ("(0,0.2)", Fraction(0), Fraction(1, 5), False, False),
    ("[0.2,0.4)", Fraction(1, 5), Fraction(2, 5), True, False),
    ("[0.4,0.6)", Fraction(2, 5), Fraction(3, 5), True, False),
    ("[0.6,0.8]", Fraction(3, 5), Fraction(4, 5), True, True),
    ("(0.8,1)", Fraction(4, 5), Fraction(1), False, False),
    ("1", Fraction(1), Fraction(1), True, True),
)
MMPR_TINY_BAND = (Fraction(1, 5), Fraction(4, 5))


def pass_rate_line(record: SampleRecord) -> dict:
    """The pass-rate line of one judged record."""
    status = [j.status for j in record.judgements]
    checkable = record.answer is not None
    correct = status.count("correct") if checkable else None
    incorrect = status.count("incorrect") if checkable else None
    samples = len(record.responses)
    return {
        "id": record.id, "dataset": record.dataset, "line": record.line, "image": list(record.image),
        "question": record.question, "prompt": record.prompt, "prompt_version": record.prompt_version,
        "answer_format": record.answer_format, "system_prompt": record.system_prompt, "max_tiles": record.max_tiles,
        "answer": record.answer, "match_modes": list(record.modes), "match_threshold": record.match_threshold,
        "samples": samples, "correct": correct, "incorrect": incorrect, "unparsable": status.count("unparsable"),
        "pass_rate": correct / samples if checkable and samples else None,
    }


def exact_rate(correct: int, samples: int) -> Fraction:
    """The pass rate as an exact fraction, so band edges (0.2 = 1/5) compare without rounding."""
    return Fraction(correct, samples)


def in_range(rate: Fraction, low: Fraction, high: Fraction, low_inclusive: bool = True, high_inclusive: bool = True) -> bool:
    above = rate >= low if low_inclusive else rate > low
    below = rate <= high if high_inclusive else rate < high
    return above and below


def histogram(lines: Iterable[dict]) -> dict:
    """``{"questions", "no_ground_truth", "bins": {label: count}, "mmpr_tiny": count in [0.2, 0.8]}``."""
    bins = {label: 0 for label, *_ in BINS}
    questions = no_truth = tiny = 0
    for line in lines:
        if line["pass_rate"] is None:
            no_truth += 1
            continue
        questions += 1
        rate = exact_rate(line["correct"], line["samples"])
        label = next(label for label, *edges in BINS if in_range(rate, *edges))
        bins[label] += 1
        tiny += in_range(rate, *MMPR_TINY_BAND)
    return {"questions": questions, "no_ground_truth": no_truth, "bins": bins, "mmpr_tiny": tiny}


def render_histogram(summary: dict) -> str:
    """One line: the counts per bin, and how many fall in MMPR-Tiny's band."""
    bins = "  ".join(f"{label}: {count}" for label, count in summary["bins"].items())
    text = (f"pass rates ({summary['questions']} questions with a ground truth): {bins}   "
            f"in [0.2, 0.8] (MMPR-Tiny): {summary['mmpr_tiny']}")
    if summary["no_ground_truth"]:
        text += f"   no ground truth: {summary['no_ground_truth']}"
    return text


def write_pass_rates(path: str | os.PathLike, judged: Sequence[SampleRecord]) -> dict:
    """Writes the file (atomically, input order); returns its :func:`histogram` with ``path``."""
    lines = [pass_rate_line(record) for record in sorted(judged, key=lambda r: (r.line, r.id))]
    write_jsonl_atomic(path, lines)
    return {"path": str(path), **histogram(lines)}
