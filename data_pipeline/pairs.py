"""Stage 4, pair: chosen/rejected pairs from judged responses.

Per question with a ground truth (the official MMPR rules):

* correctness pairs: every correct x incorrect response, except when the correct answer is a
  substring of the incorrect one (``3`` vs ``13``: the judge may be wrong, so no pair), then at
  most ``max_pairs`` of them, sampled with a per-question seed;
* format pairs: every correct x unparsable response, capped the same way;
* an empty (or whitespace-only) response is never paired: a zero-length response has no tokens
  to score, and the trainer rejects empty sides; it is counted as ``empty_responses``;
* questions with every response correct give no pairs (reported); questions with none correct
  are written out for re-sampling;
* optional answer fix: the chosen response's final answer is rewritten to the ground truth.

Identical responses are merged before pairing and identical pairs dropped after.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from data_pipeline.extract import Extraction, fix_answer
from data_pipeline.records import SampleRecord
from data_pipeline.sharding import derive_seed

CORRECTNESS_SUFFIX = "_pairs_vqa_correctness_rules"
FORMAT_SUFFIX = "_pairs_vqa_format_rules"


@dataclass(frozen=True, eq=False)
class Pair:
    """One preference pair and where it came from.

    ``extra`` (``answer_gt``, ``chosen_meta``, ``rejected_meta``) is carried into the MMPR line
    for inspection; the trainer ignores it.
    """

    dataset: str
    images: tuple[str, ...]
    question: str
    chosen: str
    rejected: str
    line: int  # input line of the question: output order
    extra: dict = field(default_factory=dict)

    def key(self) -> tuple:
        return (self.images, self.question, self.chosen, self.rejected)

    def to_mmpr(self) -> dict:
        """The MMPR line: ``image`` a path, a list, or absent for text-only questions."""
        record: dict = {}
        if len(self.images) == 1:
            record["image"] = self.images[0]
        elif self.images:
            record["image"] = list(self.images)
        record.update(question=self.question, chosen=self.chosen, rejected=self.rejected)
        record.update(self.extra)
        return record


@dataclass
class PairStats:
    """Counts for one dataset."""

    questions: int = 0  # with a ground truth
    all_correct: int = 0
    all_wrong: int = 0  # no correct response: written for re-sampling
    substring_skipped: int = 0
    empty_responses: int = 0  # never paired (see the module docstring)
    correctness_pairs: int = 0
    format_pairs: int = 0


@dataclass
class AnswerPairs:
    correctness: list[Pair] = field(default_factory=list)
    format: list[Pair] = field(default_factory=list)
    resample: list[dict] = field(default_factory=list)  # all-wrong questions, in the input format
    stats: dict[str, PairStats] = field(default_factory=lambda: defaultdict(PairStats))


def _unique(indices: Iterable[int], responses: Sequence[str]) -> list[int]:
    seen, kept = set(), []
    for index in indices:
        if responses[index] not in seen:
            seen.add(responses[index])
            kept.append(index)
    return kept


def _cap(candidates: list, limit: int, seed: int) -> list:
    """At most ``limit`` candidates, a seeded sample, kept in their original order."""
    if len(candidates) <= limit:
        return candidates
    picked = sorted(random.Random(seed).sample(range(len(candidates)), limit))
    return [candidates[i] for i in picked]


def _meta(record: SampleRecord, index: int) -> dict:
    judgement = record.judgements[index]
    meta = {"id": record.id, "index": index, "answer": judgement.answer}
    if judgement.status == "unparsable":
        meta["error"] = judgement.error
    else:
        meta.update(score=round(judgement.score, 4), mode=judgement.mode)
    return meta


def _chosen_text(record: SampleRecord, index: int, answer_fix: bool) -> str:
    response = record.responses[index]
    if not answer_fix:
        return response
    judgement = record.judgements[index]
    truth = record.answer if isinstance(record.answer, str) else record.answer[0]
    return fix_answer(response, Extraction(judgement.answer, None, judgement.start, judgement.end), truth)


def _pair(record: SampleRecord, chosen: int, rejected: int, answer_fix: bool) -> Pair:
    extra = {"answer_gt": record.answer, "chosen_meta": _meta(record, chosen), "rejected_meta": _meta(record, rejected)}
    return Pair(record.dataset, tuple(record.image), record.prompt, _chosen_text(record, chosen, answer_fix),
                record.responses[rejected], record.line, extra)


def build_answer_pairs(matched: Sequence[SampleRecord], max_pairs: int = 15, seed: int = 0, answer_fix: bool = False) -> AnswerPairs:
    """Correctness and format pairs from judged records (those with a ground truth)."""
    result = AnswerPairs()
    for record in matched:
        if record.answer is None:
            continue
        stats = result.stats[record.dataset]
        stats.questions += 1
        status = [j.status for j in record.judgements]
        empty = [i for i, text in enumerate(record.responses) if not text.strip()]
        stats.empty_responses += len(empty)
        status = ["empty" if i in empty else s for i, s in enumerate(status)]
        correct = _unique((i for i, s in enumerate(status) if s == "correct"), record.responses)
        incorrect = _unique((i for i, s in enumerate(status) if s == "incorrect"), record.responses)
        unparsable = _unique((i for i, s in enumerate(status) if s == "unparsable"), record.responses)
        if not correct:
            stats.all_wrong += 1
            line = {"id": record.id, "dataset": record.dataset, "question": record.question, "answer": record.answer}
            if record.image:
                line["image"] = record.image[0] if len(record.image) == 1 else record.image
            result.resample.append(line)
            continue
        if not incorrect and not unparsable:
            stats.all_correct += 1
            continue
        candidates = []
        for c in correct:
            for r in incorrect:
                # Official rule: "3" vs "13" or "red" vs "red and blue" may be a judging error.
                if record.judgements[c].answer.lower() in record.judgements[r].answer.lower():
                    stats.substring_skipped += 1
                    continue
                candidates.append((c, r))
        kept = _cap(candidates, max_pairs, derive_seed(seed, "pairs", record.id))
        result.correctness.extend(_pair(record, c, r, answer_fix) for c, r in kept)
        stats.correctness_pairs += len(kept)
        candidates = [(c, r) for c in correct for r in unparsable]
        kept = _cap(candidates, max_pairs, derive_seed(seed, "format-pairs", record.id))
        result.format.extend(_pair(record, c, r, answer_fix) for c, r in kept)
        stats.format_pairs += len(kept)
    return result


def deduplicate(pairs: Sequence[Pair]) -> tuple[list[Pair], int]:
    """Drops repeated (images, question, chosen, rejected); returns the rest and the count dropped.

    Responses are unique within a question already; repeats come from questions that appear
    twice in the input (same image and text under two ids).
    """
    seen, kept = set(), []
    for pair in pairs:
        if pair.key() not in seen:
            seen.add(pair.key())
            kept.append(pair)
    return kept, len(pairs) - len(kept)
