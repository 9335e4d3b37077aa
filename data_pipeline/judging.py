"""Stage 2, match: extract and judge every sampled response.

Fills in each :class:`SampleRecord`'s ``modes`` (the match modes used), ``match_threshold`` and
``judgements`` (a :class:`ResponseJudgement` per response). ``unchecked`` marks a parsed answer to a question
without a ground truth (Dropout-NTP's questions).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from data_pipeline.extract import extract_answer
from data_pipeline.match import CORRECT_THRESHOLD, judge, modes_for_dataset
from data_pipeline.records import ResponseJudgement, SampleRecord
from mpo.errors import DataError


@dataclass
class MatchStats:
    """Per-dataset counts; accuracy counts unparsable responses as wrong."""

    questions: int = 0
    checkable_questions: int = 0
    samples: int = 0
    parse_failures: int = 0
    correct: int = 0
    incorrect: int = 0
    checkable_parse_failures: int = 0  # unparsable answers to questions with a ground truth

    @property
    def accuracy(self) -> float | None:
        judged = self.correct + self.incorrect + self.checkable_parse_failures
        return self.correct / judged if judged else None


def merge_sample_logs(logs: Iterable[tuple[str, list[dict]]]) -> list[dict]:
    """One line per id from several shard logs, in input-line order; a conflicting repeat is an error."""
    merged: dict[str, dict] = {}
    origin: dict[str, str] = {}
    for path, records in logs:
        for record in records:
            record_id = record["id"]
            if record_id in merged and merged[record_id] != record:
                raise DataError(f"question id {record_id!r} also appears, differently, in {origin[record_id]} "
                                "(overlapping shards or runs with different settings)", file=path, field="id")
            merged[record_id] = record
            origin[record_id] = path
    return sorted(merged.values(), key=lambda r: (r["line"], r["id"]))


def judge_record(record: SampleRecord, modes: tuple[str, ...] | None, threshold: float = CORRECT_THRESHOLD) -> SampleRecord:
    """The record with ``modes``, ``match_threshold`` and ``judgements`` filled in (a copy)."""
    use = modes or modes_for_dataset(record.dataset)
    judgements = []
    for response in record.responses:
        extraction = extract_answer(response, record.answer_format)
        if not extraction.ok:
            judgements.append(ResponseJudgement("unparsable", None, error=extraction.error))
        elif record.answer is None:
            judgements.append(ResponseJudgement("unchecked", extraction.answer, extraction.start, extraction.end))
        else:
            verdict = judge(extraction.answer, record.answer, use, threshold)
            status = "correct" if verdict.correct else "incorrect"
            judgements.append(ResponseJudgement(status, extraction.answer, extraction.start, extraction.end, verdict.score, verdict.mode))
    return replace(record, modes=list(use), match_threshold=threshold, judgements=judgements)


def tally(judged: Iterable[SampleRecord]) -> dict[str, MatchStats]:
    """Per-dataset counts of judged records."""
    stats: dict[str, MatchStats] = defaultdict(MatchStats)
    for record in judged:
        s = stats[record.dataset]
        checkable = record.answer is not None
        s.questions += 1
        s.checkable_questions += checkable
        s.samples += len(record.responses)
        for judgement in record.judgements:
            s.parse_failures += judgement.status == "unparsable"
            s.checkable_parse_failures += judgement.status == "unparsable" and checkable
            s.correct += judgement.status == "correct"
            s.incorrect += judgement.status == "incorrect"
    return dict(stats)


def match_records(records: Sequence[SampleRecord], modes: tuple[str, ...] | None, threshold: float = CORRECT_THRESHOLD,
                  progress: bool = False) -> tuple[list[SampleRecord], dict[str, MatchStats]]:
    """Judges every record; returns the judged records and per-dataset counts."""
    from tqdm import tqdm

    judged = [judge_record(record, modes, threshold)
              for record in tqdm(records, desc="match", unit="q", disable=not progress, mininterval=0.5)]
    return judged, tally(judged)
