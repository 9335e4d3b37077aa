"""The held-out pairs a run evaluates on.

They come from ``data.eval_meta_path`` / ``data.eval_jsonl_path``, or from a seeded
``data.eval_fraction`` of the training questions (:func:`split_eval`: every pair of a question
lands on the same side, so no held-out prompt is trained on). Each held-out annotation line is
kept once, however often ``repeat_time`` repeats it.
"""

from __future__ import annotations

import dataclasses
import random

from mpo.config import DataConfig
from mpo.data.records import load_records, unique_by_source
from mpo.errors import DataError
from mpo.types import PreferenceRecord


def _prompt(record: PreferenceRecord) -> tuple:
    """What makes two pairs the same question: the prompt and its images or video."""
    return record.question, tuple(record.images), record.video


def split_eval(records: list[PreferenceRecord], fraction: float, seed: int) -> tuple[list[PreferenceRecord], list[PreferenceRecord]]:
    """(training, held-out) records: a seeded ``fraction`` of the questions, all their pairs, held out.

    Raises:
        DataError: the fraction would leave no question to train on.
    """
    questions = list(dict.fromkeys(_prompt(record) for record in records))
    count = max(1, round(fraction * len(questions)))
    if count >= len(questions):
        raise DataError(f"holding out {count} of {len(questions)} question(s) leaves none to train on", field="data.eval_fraction")
    held = {questions[i] for i in random.Random(f"{seed}:eval").sample(range(len(questions)), count)}
    train = [record for record in records if _prompt(record) not in held]
    return train, unique_by_source([record for record in records if _prompt(record) in held])


def load_eval_records(config: DataConfig, seed: int, records: list[PreferenceRecord],
                      skipped: list[DataError] | None) -> tuple[list[PreferenceRecord], list[PreferenceRecord]]:
    """(training, held-out) records: ``records`` split by ``data.eval_fraction``, or ``records``
    and the pairs of ``data.eval_meta_path`` / ``data.eval_jsonl_path`` (none without either)."""
    if config.eval_fraction:
        return split_eval(records, config.eval_fraction, seed)
    if not (config.eval_meta_path or config.eval_jsonl_path):
        return records, []
    held_out = dataclasses.replace(config, meta_path=config.eval_meta_path, jsonl_path=config.eval_jsonl_path,
                                   dataset_path="", image_root=config.eval_image_root)
    return records, unique_by_source(load_records(held_out, seed, skipped, prefix="eval_"))
