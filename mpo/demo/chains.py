"""Checks a chain of thought clause by clause against the scene and the question it is about.

A right final answer says little about the chain before it when answers take few values; the
shapes task knows every scene and the steps each question needs, so each claim can be checked:

* each tally entry (``red 2``) against the scene's count: a wrong or missing one is a
  perception error;
* each operation (``2 x 3 = 6``, ``6 + 1 = 7``) against the reference chain's operation at the
  same place, which uses the right counts and stated numbers in the right order: with the tally
  right, a differing, missing or extra operation is a reasoning error (a wrong result, or the right
  arithmetic on the wrong numbers);
* the final answer against the last result (a chain without operations: the asked count).

A chain is right when its tally and every operation are right and it ends on its last result.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from itertools import zip_longest

from mpo.demo._shapes_questions import colour_counts
from mpo.demo._shapes_scene import COLOURS, Shape

TALLY_ENTRY = re.compile(r"\b(" + "|".join(COLOURS) + r") (\d+)\b")
_OPERATION = re.compile(r"\b(\d+) ([x+-]) (\d+) = (\d+)\b")
_FINAL = "Final answer:"


@dataclass(frozen=True)
class ChainCheck:
    """What :func:`check_chain` found in one response."""

    tally_entries: int
    """Tally entries in the rationale."""
    wrong_counts: int
    """Tally entries that disagree with the scene or that are missing (perception errors)."""
    wrong_steps: int
    """Operations that differ from the reference chain's at the same place, counting missing and
    extra ones (reasoning errors)."""
    wrong_arithmetic: int
    """Operations whose own result is wrong (``2 + 3 = 6``), a part of ``wrong_steps``."""
    consistent: bool
    """The final answer is the chain's last result (without operations: the reference answer)."""

    @property
    def correct(self) -> bool:
        return self.tally_entries > 0 and not (self.wrong_counts or self.wrong_steps) and self.consistent

    @property
    def error(self) -> str:
        """``"none"``, ``"perception"`` (a tally entry wrong) or ``"reasoning"`` (the tally right)."""
        return "none" if self.correct else "perception" if self.wrong_counts or not self.tally_entries else "reasoning"


def _apply(left: int, operator: str, right: int) -> int:
    return left * right if operator == "x" else left + right if operator == "+" else left - right


def _rationale_and_answer(text: str) -> tuple[str, str]:
    rationale, separator, final = text.rpartition(_FINAL)
    return (rationale, final.strip()) if separator else (text, "")


def check_chain(response: str, record: dict) -> ChainCheck:
    """Every claim of ``response`` against ``record`` (a shapes line: ``scene``, ``cot``, ``answer``)."""
    rationale, answer = _rationale_and_answer(response)
    scene = [Shape(**s) for s in record["scene"]]
    truth = colour_counts(scene)
    stated = [(name, int(value)) for name, value in TALLY_ENTRY.findall(rationale)]
    reference_rationale = _rationale_and_answer(record["cot"])[0]
    missing = {name for name, _ in TALLY_ENTRY.findall(reference_rationale)} - {name for name, _ in stated}
    operations = _OPERATION.findall(rationale)
    reference = _OPERATION.findall(reference_rationale)
    last = operations[-1][3] if operations else record["answer"]
    return ChainCheck(
        tally_entries=len(stated),
        wrong_counts=sum(truth[name] != value for name, value in stated) + len(missing),
        wrong_steps=sum(mine != theirs for mine, theirs in zip_longest(operations, reference)),
        wrong_arithmetic=sum(_apply(int(a), op, int(b)) != int(c) for a, op, b, c in operations),
        consistent=answer == last,
    )


def first_error_end(response: str, record: dict) -> int | None:
    """Where ``response`` first goes wrong: the offset just past its first wrong token, in the
    order written (a tally count that is not the scene's; in an operation, the first of left
    number, operator, right number and result that differs from the reference's operation at the
    same place). None when no wrong token can be located (a right chain, or one that goes wrong by
    leaving a claim out or by its final answer): the response is then wrong only as a whole.
    """
    rationale, _ = _rationale_and_answer(response)
    truth = colour_counts([Shape(**s) for s in record["scene"]])
    errors = [m.end(2) for m in TALLY_ENTRY.finditer(rationale) if truth[m.group(1)] != int(m.group(2))]
    reference = _OPERATION.findall(_rationale_and_answer(record["cot"])[0])
    for index, match in enumerate(_OPERATION.finditer(rationale)):
        expected = reference[index] if index < len(reference) else None
        wrong = [group for group in range(1, 5) if expected is None or match.group(group) != expected[group - 1]]
        if wrong:
            errors.append(match.end(wrong[0]))
            break
    return min(errors) if errors else None


def chain_shares(responses: list[tuple[str, dict]]) -> dict[str, float]:
    """Over (response, record) pairs: the share of right chains, of chains with a perception error
    and of chains with a right tally and a reasoning error (the three add up to 1); no pairs: ``{}``
    (no shares to report, rather than three zeros that read as a measurement)."""
    errors = [check_chain(response, record).error for response, record in responses]
    return {kind: errors.count(kind) / len(errors) for kind in ("none", "perception", "reasoning")} if errors else {}
