"""Stage 2, match: extract and judge every sampled response.

Adds to each sample record ``"modes"`` (the match modes used) and ``"judgements"``, one per
response: ``{"status": "correct" | "incorrect" | "unparsable" | "unchecked", "answer",
"start", "end", "score", "mode", "error"}``. ``unchecked`` marks a parsed answer to a question
without a ground truth (Dropout-NTP's questions).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from data_pipeline.extract import extract_answer
from data_pipeline.match import CORRECT_THRESHOLD, judge, modes_for_dataset
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
    """One record per id from several shard logs, in input-line order; a conflicting repeat is an error."""
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


def judge_record(record: dict, modes: tuple[str, ...] | None, threshold: float = CORRECT_THRESHOLD) -> dict:
    """The record with ``modes`` and ``judgements`` added (a new dict)."""
    use = modes or modes_for_dataset(record["dataset"])
    judgements = []
    for response in record["responses"]:
        extraction = extract_answer(response, record["answer_format"])
        entry = {"status": "unparsable", "answer": extraction.answer, "start": extraction.start, "end": extraction.end,
                 "score": 0.0, "mode": None, "error": extraction.error}
        if extraction.ok and record["answer"] is None:
            entry["status"] = "unchecked"
        elif extraction.ok:
            verdict = judge(extraction.answer, record["answer"], use, threshold)
            entry.update(status="correct" if verdict.correct else "incorrect", score=verdict.score, mode=verdict.mode)
        judgements.append(entry)
    return {**record, "modes": list(use), "judgements": judgements}


def tally(judged: Iterable[dict]) -> dict[str, MatchStats]:
    """Per-dataset counts of judged records."""
    stats: dict[str, MatchStats] = defaultdict(MatchStats)
    for record in judged:
        s = stats[record["dataset"]]
        checkable = record["answer"] is not None
        s.questions += 1
        s.checkable_questions += checkable
        s.samples += len(record["responses"])
        for entry in record["judgements"]:
            s.parse_failures += entry["status"] == "unparsable"
            s.checkable_parse_failures += entry["status"] == "unparsable" and checkable
            s.correct += entry["status"] == "correct"
            s.incorrect += entry["status"] == "incorrect"
    return dict(stats)


def match_records(records: Sequence[dict], modes: tuple[str, ...] | None, threshold: float = CORRECT_THRESHOLD,
                  progress: bool = False) -> tuple[list[dict], dict[str, MatchStats]]:
    """Judges every non-skipped record; returns the judged records and per-dataset counts."""
    from tqdm import tqdm

    pending = [record for record in records if "skipped" not in record]
    judged = [judge_record(record, modes, threshold)
              for record in tqdm(pending, desc="match", unit="q", disable=not progress, mininterval=0.5)]
    return judged, tally(judged)
