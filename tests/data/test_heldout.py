"""The held-out split: whole questions, seeded, each annotation line once."""

from __future__ import annotations

import pytest

from mpo.data.heldout import split_eval
from mpo.types import PreferenceRecord


def record(question: str, line: int, image: str = "a.png") -> PreferenceRecord:
    return PreferenceRecord(question=question, chosen="c", rejected="r", images=[image], source=f"ann.jsonl:{line}")


def test_split_holds_out_whole_questions_seeded():
    """10 questions (question 0 has 3 pairs, question 1 is repeated by repeat_time 2): 0.3 holds
    out 3 questions with every pair of each, the held-out side lists each line once, no prompt is
    on both sides, and the seed alone decides which."""
    records = [record("q0", 1), record("q0", 2), record("q0", 3), record("q1", 4), record("q1", 4)]
    records += [record(f"q{i}", i + 3) for i in range(2, 10)]
    records.append(record("q0", 13, image="b.png"))  # same words, another image: another question
    train, held = split_eval(records, 0.3, seed=7)
    prompts = {(r.question, tuple(r.images)) for r in held}
    assert len(prompts) == round(0.3 * 11) == 3
    assert not prompts & {(r.question, tuple(r.images)) for r in train}
    assert len(train) + sum(records.count(r) for r in held) == len(records)
    assert len({r.source for r in held}) == len(held)
    assert split_eval(records, 0.3, seed=7) == (train, held)
    assert [split_eval(records, 0.3, seed=s)[1] for s in range(5)] != [held] * 5
    with pytest.raises(ValueError, match="leaves none to train on"):
        split_eval(records[:3], 0.5, seed=0)
