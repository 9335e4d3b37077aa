"""Question families of the shapes task, each with a reference chain of thought.

Part of ``mpo.demo.shapes`` (its docstring lists the families); import from there.
"""

from __future__ import annotations

import itertools
import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from mpo.demo._shapes_scene import COLOURS, SHAPES, Shape, join_words, location

# Two centres must differ by this fraction of the side along an axis before we ask which is
# further that way: a question whose answer hinges on one pixel is noise, not reasoning.
POSITION_MARGIN = 0.08
LETTERS = "ABCD"


@dataclass(frozen=True)
class Question:
    """A checkable question about one scene, with its reference chain of thought.

    Attributes:
        kind: the question family, e.g. ``"count_colour"``.
        text: the raw question; multiple-choice options follow as ``"\\nA. ..."`` lines.
        answer: a number (``"3"``) or an option letter (``"B"``).
        rationale: the reasoning before the final answer, on one line.
        choices: the options in letter order; empty for numeric questions.
    """

    kind: str
    text: str
    answer: str
    rationale: str
    choices: tuple[str, ...] = ()

    @property
    def cot(self) -> str:
        return f"{self.rationale}\nFinal answer: {self.answer}"


# ---------------------------------------------------------------- wording


def _tally(shapes: Sequence[Shape], label: str) -> str:
    """'I count the red shapes: 2 red circles and 1 red square, 3 in total.'"""
    groups = Counter(s.name for s in shapes)
    names = [f"{c} {k}" for c in COLOURS for k in SHAPES]  # one fixed order a model can learn
    parts = [f"{groups[n]} {n}{'s' if groups[n] > 1 else ''}" for n in names if groups[n]]
    listed = join_words(parts) if parts else "there are none"
    return f"I count the {label}: {listed}, {len(shapes)} in total."


def _compare(a: int, b: int) -> str:
    relation = "greater than" if a > b else "less than" if a < b else "equal to"
    return f"{a} is {relation} {b}"


def _numeric(kind: str, text: str, value: int, rationale: str) -> Question:
    return Question(kind, text, str(value), rationale)


def _multiple_choice(
    kind: str, stem: str, choices: Sequence[str], correct: int, reasoning: str
) -> Question:
    letter = LETTERS[correct]
    text = stem + "".join(f"\n{LETTERS[i]}. {c}" for i, c in enumerate(choices))
    return Question(kind, text, letter, f"{reasoning}, which is option {letter}.", tuple(choices))


# ---------------------------------------------------------------- question families
# Each family returns every instance it can ask about a scene (possibly none); rng only orders
# options. Sampling then draws families round-robin, so no family dominates the data.


def _by_colour(shapes: Sequence[Shape], colour: str) -> list[Shape]:
    return [s for s in shapes if s.colour == colour]


def _present_colours(shapes: Sequence[Shape]) -> list[str]:
    return [c for c in COLOURS if _by_colour(shapes, c)]


def _count_colour(shapes: Sequence[Shape], image_size: int, rng: random.Random) -> list[Question]:
    return [
        _numeric("count_colour", f"How many {c} shapes are there?", len(_by_colour(shapes, c)),
                 _tally(_by_colour(shapes, c), f"{c} shapes"))
        for c in COLOURS
    ]


def _count_shape(shapes: Sequence[Shape], image_size: int, rng: random.Random) -> list[Question]:
    questions = []
    for kind in SHAPES:
        selected = [s for s in shapes if s.shape == kind]
        questions.append(_numeric("count_shape", f"How many {kind}s are there?", len(selected),
                                  _tally(selected, f"{kind}s")))
    return questions


def _count_colour_shape(
    shapes: Sequence[Shape], image_size: int, rng: random.Random
) -> list[Question]:
    # Only colours in the scene: asking about absent ones would make most answers a trivial 0.
    questions = []
    for colour, kind in itertools.product(_present_colours(shapes), SHAPES):
        selected = [s for s in shapes if s.name == f"{colour} {kind}"]
        questions.append(_numeric("count_colour_shape", f"How many {colour} {kind}s are there?",
                                  len(selected), _tally(selected, f"{colour} {kind}s")))
    return questions


def _count_total(shapes: Sequence[Shape], image_size: int, rng: random.Random) -> list[Question]:
    return [_numeric("count_total", "How many shapes are there?", len(shapes),
                     _tally(shapes, "shapes"))]


def _not_colour(shapes: Sequence[Shape], image_size: int, rng: random.Random) -> list[Question]:
    questions = []
    for colour in _present_colours(shapes):
        selected, total = _by_colour(shapes, colour), len(shapes)
        rationale = (f"{_tally(shapes, 'shapes')} {_tally(selected, f'{colour} shapes')} "
                     f"{total} - {len(selected)} = {total - len(selected)}.")
        questions.append(_numeric("not_colour", f"How many shapes are not {colour}?",
                                  total - len(selected), rationale))
    return questions


def _two_tallies(shapes: Sequence[Shape], first: str, second: str) -> tuple[int, int, str]:
    a, b = _by_colour(shapes, first), _by_colour(shapes, second)
    return len(a), len(b), f"{_tally(a, f'{first} shapes')} {_tally(b, f'{second} shapes')}"


def _colour_pairs(shapes: Sequence[Shape], ordered: bool) -> list[tuple[str, str]]:
    """Pairs of colours of which at least one is in the scene (0 vs 0 teaches nothing)."""
    pairs = itertools.permutations(COLOURS, 2) if ordered else itertools.combinations(COLOURS, 2)
    present = set(_present_colours(shapes))
    return [(a, b) for a, b in pairs if a in present or b in present]


def _sum_colours(shapes: Sequence[Shape], image_size: int, rng: random.Random) -> list[Question]:
    questions = []
    for first, second in _colour_pairs(shapes, ordered=False):
        a, b, tallies = _two_tallies(shapes, first, second)
        questions.append(_numeric(
            "sum_colours", f"How many {first} and {second} shapes are there in total?", a + b,
            f"{tallies} {a} + {b} = {a + b}."))
    return questions


def _difference(shapes: Sequence[Shape], image_size: int, rng: random.Random) -> list[Question]:
    questions = []
    for first, second in _colour_pairs(shapes, ordered=True):
        a, b, tallies = _two_tallies(shapes, first, second)
        if a > b:  # "how many more" presumes there are more; a negative answer would be a trick
            questions.append(_numeric(
                "difference", f"How many more {first} shapes than {second} shapes are there?",
                a - b, f"{tallies} {a} - {b} = {a - b}."))
    return questions


def _compare_more(shapes: Sequence[Shape], image_size: int, rng: random.Random) -> list[Question]:
    questions = []
    for first, second in _colour_pairs(shapes, ordered=True):
        a, b, tallies = _two_tallies(shapes, first, second)
        verdict = "Yes" if a > b else "No"
        questions.append(_multiple_choice(
            "compare_more", f"Are there more {first} shapes than {second} shapes?",
            ("Yes", "No"), 0 if a > b else 1,
            f"{tallies} {_compare(a, b)}, so the answer is {verdict}"))
    return questions


def _compare_which(shapes: Sequence[Shape], image_size: int, rng: random.Random) -> list[Question]:
    questions = []
    for pair in _colour_pairs(shapes, ordered=False):
        first, second = rng.sample(pair, 2)  # which colour is option A is itself random
        a, b, tallies = _two_tallies(shapes, first, second)
        choices = (first, second, "they have the same number")
        correct = 0 if a > b else 1 if a < b else 2
        outcome = choices[2] if correct == 2 else f"{choices[correct]} has more shapes"
        questions.append(_multiple_choice(
            "compare_which", f"Which colour has more shapes, {first} or {second}?", choices,
            correct, f"{tallies} {_compare(a, b)}, so {outcome}"))
    return questions


# relation -> (axis, +1 when a larger coordinate satisfies it, comparative of the winner)
_RELATIONS: dict[str, tuple[str, int, str]] = {
    "to the left of": ("x", -1, "further left"),
    "to the right of": ("x", 1, "further right"),
    "above": ("y", -1, "higher up"),
    "below": ("y", 1, "lower down"),
}


def _coordinate(item: Shape, axis: str) -> int:
    return item.x if axis == "x" else item.y


def _unique_shapes(shapes: Sequence[Shape]) -> list[Shape]:
    """Shapes whose colour and kind no other shape shares, so "the red circle" is unambiguous."""
    counts = Counter(s.name for s in shapes)
    return [s for s in shapes if counts[s.name] == 1]


def _position_pair(shapes: Sequence[Shape], image_size: int, rng: random.Random) -> list[Question]:
    margin = max(2, round(POSITION_MARGIN * image_size))
    questions = []
    for first, second in itertools.permutations(_unique_shapes(shapes), 2):
        for relation, (axis, sign, comparative) in _RELATIONS.items():
            offset = _coordinate(first, axis) - _coordinate(second, axis)
            if abs(offset) < margin:
                continue
            holds = sign * offset > 0
            winner = first if holds else second
            reasoning = (
                f"The {first.name} is {location(first, image_size)} and the {second.name} is "
                f"{location(second, image_size)}. The {winner.name} is {comparative}, so the "
                f"answer is {'Yes' if holds else 'No'}")
            questions.append(_multiple_choice(
                "position_pair", f"Is the {first.name} {relation} the {second.name}?",
                ("Yes", "No"), 0 if holds else 1, reasoning))
    return questions


# phrase -> (axis, +1 when the extreme is the largest coordinate, listing order)
_EXTREMES: dict[str, tuple[str, int, str]] = {
    "furthest to the left": ("x", -1, "from left to right"),
    "furthest to the right": ("x", 1, "from right to left"),
    "closest to the top": ("y", -1, "from top to bottom"),
    "closest to the bottom": ("y", 1, "from bottom to top"),
}


def _position_extreme(
    shapes: Sequence[Shape], image_size: int, rng: random.Random
) -> list[Question]:
    margin = max(2, round(POSITION_MARGIN * image_size))
    unique = _unique_shapes(shapes)
    questions = []
    for phrase, (axis, sign, order) in _EXTREMES.items():
        ranked = sorted(shapes, key=lambda s: -sign * _coordinate(s, axis))  # extreme first
        extreme, runner_up = ranked[0], ranked[1]
        lead = abs(_coordinate(extreme, axis) - _coordinate(runner_up, axis))
        if extreme not in unique or lead < margin:
            continue
        others = [s.name for s in unique if s is not extreme]
        if not others:
            continue
        options = [extreme.name, *rng.sample(others, min(len(others), len(LETTERS) - 1))]
        rng.shuffle(options)
        listing = join_words([f"{'the' if s in unique else 'a'} {s.name}" for s in ranked])
        reasoning = f"The shapes {order} are: {listing}. The {extreme.name} is {phrase}"
        questions.append(_multiple_choice(
            "position_extreme", f"Which shape is {phrase}?", [f"the {o}" for o in options],
            options.index(extreme.name), reasoning))
    return questions


_Family = Callable[[Sequence[Shape], int, random.Random], list[Question]]
FAMILIES: dict[str, _Family] = {
    "count_colour": _count_colour,
    "count_shape": _count_shape,
    "count_colour_shape": _count_colour_shape,
    "count_total": _count_total,
    "not_colour": _not_colour,
    "sum_colours": _sum_colours,
    "difference": _difference,
    "compare_more": _compare_more,
    "compare_which": _compare_which,
    "position_pair": _position_pair,
    "position_extreme": _position_extreme,
}


def sample_questions(
    shapes: Sequence[Shape], image_size: int, rng: random.Random, num_questions: int,
    families: Sequence[str] = (),
) -> list[Question]:
    """Draw ``num_questions`` distinct questions, one family after another in a shuffled order.

    ``families`` limits the draw to those kinds (empty: every family).
    """
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        raise ValueError(f"unknown question families {unknown}; choose from {', '.join(FAMILIES)}")
    pools = {kind: family(shapes, image_size, rng) for kind, family in FAMILIES.items() if not families or kind in families}
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

