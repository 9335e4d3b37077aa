"""Question families of the shapes task, each with a reference chain of thought.

Part of ``mpo.demo.shapes`` (its docstring lists the families); import from there.

Every chain opens with the colour tally in a fixed order ("red 2, green 1, blue 3."), the same
tally the describe items teach, then does its arithmetic one operation per clause ("2 x 3 = 6.").
The tally comes first because the demo model reads a fixed list of counts from the image far
sooner than the one count a question asks for (measured: the listing reached every held-out count
in 400 SFT steps, a single asked-for colour count stayed at the prior); after it, the question is
answered from the text. Questions ask about colours only: the shapes' kinds vary, but the demo
model did not learn to tell them apart in its SFT budget (18 % of held-out kind tallies exactly
right after 800 steps, against 100 % of colour tallies), and a family it cannot see would only
add lucky guesses to the pairs. ``mpo.demo.chains`` checks every clause of a chain against the
scene.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from mpo.demo._shapes_scene import COLOURS, Shape

# Per-item values the weighted questions state ("red shapes are worth 3 points"): with 3-7 shapes
# their answers range over 0-28, so a guessed final answer is rarely right.
WEIGHTS = range(1, 5)


@dataclass(frozen=True)
class Question:
    """A checkable question about one scene, with its reference chain of thought.

    Attributes:
        kind: the question family, e.g. ``"count_colour"``.
        text: the raw question.
        answer: a whole number, as text (``"13"``).
        rationale: the reasoning before the final answer, on one line.
    """

    kind: str
    text: str
    answer: str
    rationale: str

    @property
    def cot(self) -> str:
        return f"{self.rationale}\nFinal answer: {self.answer}"


# ---------------------------------------------------------------- tallies


def colour_counts(shapes: Sequence[Shape]) -> dict[str, int]:
    return {c: sum(s.colour == c for s in shapes) for c in COLOURS}


def tally(counts: dict[str, int]) -> str:
    """``{"red": 2, "green": 1}`` -> ``"red 2, green 1."``: every name, in the fixed order."""
    return ", ".join(f"{name} {n}" for name, n in counts.items()) + "."


def describe(shapes: Sequence[Shape]) -> str:
    """The describe items' reference: the colour tally (what the model must read from the image)."""
    return tally(colour_counts(shapes))


def _sum_clauses(values: Sequence[int]) -> tuple[list[str], int]:
    """Adds left to right, one clause per addition: ``[6, 1, 6]`` -> ``["6 + 1 = 7.", "7 + 6 = 13."]``."""
    total, clauses = values[0], []
    for value in values[1:]:
        clauses.append(f"{total} + {value} = {total + value}.")
        total += value
    return clauses, total


def _question(kind: str, text: str, counts: dict[str, int], clauses: Sequence[str], answer: int) -> Question:
    return Question(kind, text, str(answer), " ".join([tally(counts), *clauses]))


# ---------------------------------------------------------------- question families
# Each family returns every instance it can ask about a scene (possibly none); rng draws the
# stated weights. Sampling then draws families round-robin, so no family dominates the data.


def _count_colour(shapes: Sequence[Shape], rng: random.Random) -> list[Question]:
    counts = colour_counts(shapes)
    return [_question("count_colour", f"How many {c} shapes are there?", counts, [], n) for c, n in counts.items()]


def _count_total(shapes: Sequence[Shape], rng: random.Random) -> list[Question]:
    counts = colour_counts(shapes)
    clauses, total = _sum_clauses(list(counts.values()))
    return [_question("count_total", "How many shapes are there?", counts, clauses, total)]


def _sum_colours(shapes: Sequence[Shape], rng: random.Random) -> list[Question]:
    counts = colour_counts(shapes)
    return [_question("sum_colours", f"How many shapes are {a} or {b}?", counts,
                      [f"{counts[a]} + {counts[b]} = {counts[a] + counts[b]}."], counts[a] + counts[b])
            for a, b in itertools.combinations(COLOURS, 2)]


def _difference(shapes: Sequence[Shape], rng: random.Random) -> list[Question]:
    counts = colour_counts(shapes)
    # "how many more" presumes there are more: a negative answer would be a trick question
    return [_question("difference", f"How many more {a} shapes than {b} shapes are there?", counts,
                      [f"{counts[a]} - {counts[b]} = {counts[a] - counts[b]}."], counts[a] - counts[b])
            for a, b in itertools.permutations(COLOURS, 2) if counts[a] > counts[b]]


def _times(shapes: Sequence[Shape], rng: random.Random) -> list[Question]:
    counts = colour_counts(shapes)
    questions = []
    for colour, n in counts.items():
        weight = rng.choice(WEIGHTS)
        questions.append(_question("times", f"Each {colour} shape holds {weight} coins. How many coins do the {colour} shapes hold?",
                                   counts, [f"{n} x {weight} = {n * weight}."], n * weight))
    return questions


def _colour_points(shapes: Sequence[Shape], rng: random.Random) -> list[Question]:
    """A score over every shape, one stated weight per colour, the colours in tally order."""
    counts = colour_counts(shapes)
    weights = {colour: rng.choice(WEIGHTS) for colour in counts}
    first, second, third = (f"{colour} shapes{' are worth' if i == 0 else ''} {w} point{'s' if w > 1 else ''}"
                            for i, (colour, w) in enumerate(weights.items()))
    text = f"{first.capitalize()}, {second} and {third}. How many points are all the shapes worth?"
    products = [counts[c] * w for c, w in weights.items()]
    clauses, total = _sum_clauses(products)
    products_clauses = [f"{counts[c]} x {w} = {p}." for (c, w), p in zip(weights.items(), products)]
    return [_question("colour_points", text, counts, products_clauses + clauses, total)]


_Family = Callable[[Sequence[Shape], random.Random], list[Question]]
FAMILIES: dict[str, _Family] = {
    "count_colour": _count_colour,
    "count_total": _count_total,
    "sum_colours": _sum_colours,
    "difference": _difference,
    "times": _times,
    "colour_points": _colour_points,
}


def sample_questions(
    shapes: Sequence[Shape], rng: random.Random, num_questions: int, families: Sequence[str] = (),
) -> list[Question]:
    """Draw ``num_questions`` distinct questions, one family after another in a shuffled order.

    ``families`` limits the draw to those kinds (empty: every family).
    """
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        raise ValueError(f"unknown question families {unknown}; choose from {', '.join(FAMILIES)}")
    pools = {kind: family(shapes, rng) for kind, family in FAMILIES.items() if not families or kind in families}
    kinds = [kind for kind in pools if pools[kind]]
    rng.shuffle(kinds)
    chosen: list[Question] = []
    asked: set[str] = set()
    for kind in itertools.cycle(kinds):
        if len(chosen) == num_questions:
            return chosen
        fresh = [q for q in pools[kind] if q.text not in asked]
        if fresh:
            question = rng.choice(fresh)
            chosen.append(question)
            asked.add(question.text)
        elif all(q.text in asked for pool in pools.values() for q in pool):
            raise ValueError(f"a scene offers only {len(asked)} distinct questions")
    raise AssertionError("unreachable")  # itertools.cycle never ends; keeps type checkers calm
