"""A recipe's preference records, whatever the input format, and the record helpers shared by the
stages that read them.

``data.meta_path`` / ``data.jsonl_path`` are MMPR (:mod:`mpo.data.mmpr`), ``data.dataset_path``
the preference rows of TRL, ms-swift or LLaMA-Factory (:mod:`mpo.data.preference_files`); data
in a key that reads another format is answered with the key it goes in (:mod:`mpo.data.format_hints`).
"""

from __future__ import annotations

from mpo.config import DataConfig
from mpo.data.format_hints import check_data_key
from mpo.data.mmpr import read_mmpr
from mpo.errors import DataError
from mpo.types import PreferenceRecord


def load_records(
    config: DataConfig, seed: int, skipped: list[DataError] | None = None, notes: list[str] | None = None, prefix: str = ""
) -> list[PreferenceRecord]:
    """All training records of a recipe, ``repeat_time`` applied, in file order (possibly none,
    when every line was bad and skipped: :func:`mpo.data.checks.load_checked_records` refuses that).

    Args:
        config: the recipe's ``data`` section.
        seed: seeds the ``repeat_time`` samples.
        skipped: collects bad records in skip mode; ``None`` raises at the first one.
        notes: collects a line for each subset whose recorded system message ``data.system_prompt``
            overrides, for the caller to report.
        prefix: the keys ``config`` was read from: ``""`` for the training data, ``"eval_"`` for
            the held-out pairs (named in the errors).
    """
    if config.dataset_path:
        from mpo.data.preference_files import read_dataset

        check_data_key(config.dataset_path, "dataset_path", prefix)
        return read_dataset(config, skipped, notes)
    if config.jsonl_path:
        check_data_key(config.jsonl_path, "jsonl_path", prefix)
    else:
        check_data_key(config.meta_path, "meta_path", prefix)
    return read_mmpr(config, seed, skipped, notes)


def unique_by_source(records: list[PreferenceRecord]) -> list[PreferenceRecord]:
    """One record per annotation line, in first-use order (``repeat_time`` > 1 repeats lines, and
    scoring, checking or storing one copy suffices)."""
    return list({record.source: record for record in records}.values())


def source_location(source: str) -> tuple[str, int | None]:
    """``(file, line)`` of a record's ``source`` (``file:line``)."""
    file, _, line = source.rpartition(":")
    return file, int(line) if line.isdigit() else None
