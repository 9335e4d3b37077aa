"""The resumable loop shared by the two generation stages (sample and Dropout-NTP).

Work is a list of items in a fixed order, cut into fixed batches. For each batch with any item
not yet in the log, the whole batch is generated again (so a batched backend sees exactly the
batch it saw in an uninterrupted run, and samples the same tokens), and the missing items'
records are appended to the log in one durable write. Killed at any point and restarted, the
stage ends with every item's record exactly once.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from tqdm import tqdm

from data_pipeline.backends import GenerationRequest
from data_pipeline.records import AppendLog, ResumeError

Item = TypeVar("Item")


def fingerprint(settings: dict) -> str:
    """A short hash of everything that changes a stage's outputs, stored on every log line."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode("utf-8")).hexdigest()[:16]


@dataclass
class LoopStats:
    items: int = 0  # owned by this shard
    already_done: int = 0  # found in the log at start
    written: int = 0  # records appended by this run


@dataclass(frozen=True)
class WorkItem(Generic[Item]):
    """One unit of work: its id, what to generate (None when it needs no generation), the payload."""

    id: str
    requests: tuple[GenerationRequest, ...]
    payload: Item


def run_resumable(
    log: AppendLog,
    ids: Sequence[str],
    batch_size: int,
    config: str,
    prepare: Callable[[str], WorkItem | dict],
    generate: Callable[[list[GenerationRequest]], list],
    finish: Callable[[WorkItem, list], dict],
    desc: str,
    progress: bool,
    describe_progress: Callable[[], dict] | None = None,
) -> LoopStats:
    """Runs ``ids`` through ``prepare`` -> ``generate`` -> ``finish`` into ``log``.

    Args:
        log: the open append log of this stage and shard.
        ids: every item this shard owns, in a fixed order.
        batch_size: items per ``generate`` call; fixed batches keep batched sampling reproducible.
        config: the settings fingerprint; a log written with other settings is refused.
        prepare: id -> a WorkItem, or a finished record (e.g. a skipped bad input) to log as is.
        generate: the backend call for a batch's requests (flattened, in order).
        finish: a WorkItem and its generations -> the record to log.
        desc: progress-bar label.
        progress: show a tqdm bar (counts and rate).
        describe_progress: extra postfix counters for the bar.
    """
    done = set()
    for record in log.read():
        if record.get("config") != config:
            raise ResumeError(
                f"{log.path} was written with other settings (model, sampling, prompt or seed); "
                "use another output path, or delete it to start over"
            )
        done.add(record["id"])
    stats = LoopStats(items=len(ids), already_done=sum(1 for i in ids if i in done))
    bar = tqdm(total=len(ids), initial=stats.already_done, desc=desc, unit="q", disable=not progress,
               file=sys.stderr, dynamic_ncols=True, mininterval=0.5)
    try:
        for start in range(0, len(ids), batch_size):
            batch = ids[start : start + batch_size]
            if all(i in done for i in batch):
                continue
            prepared = [prepare(i) for i in batch]
            work = [p for p in prepared if isinstance(p, WorkItem) and p.requests]
            requests = [r for item in work for r in item.requests]
            generations = generate(requests) if requests else []
            records, cursor = [], 0
            by_id = {}
            for item in work:
                by_id[item.id] = generations[cursor : cursor + len(item.requests)]
                cursor += len(item.requests)
            for item_id, value in zip(batch, prepared):
                if item_id in done:
                    continue
                record = finish(value, by_id.get(item_id, [])) if isinstance(value, WorkItem) else value
                record["config"] = config
                records.append(record)
            log.append(records)
            done.update(r["id"] for r in records)
            stats.written += len(records)
            bar.update(len(records))
            if describe_progress is not None:
                bar.set_postfix(describe_progress(), refresh=False)
    finally:
        bar.close()
    return stats
