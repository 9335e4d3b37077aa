"""Stage 3, Dropout-NTP: pairs for questions without a checkable answer.

The chosen response is one the model wrote *with* the image. Keep its first
``floor(ratio * words)`` words, and let the model continue from there *without* the image: a
text-only prompt (every ``<image>`` removed) with the prefix as the start of the assistant turn.
What it then writes is less grounded, so ``prefix + continuation`` is the rejected response
(MPO paper, section 3.2; ratio 0.5 worked best, 0.25 and 0.75 worse).

Each log line (one per question): ``{"id", "dataset", "line", "continuations": [{"chosen_index",
"prefix", "continuation", "finish_reason"}] (see :class:`Continuation`), "config"}``, or
``{..., "skipped": reason}`` when no response is long enough to cut.
"""

from __future__ import annotations

import math
import os
import random
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from data_pipeline.backends import GenerationRequest, SamplingParams
from data_pipeline.extract import extract_answer
from data_pipeline.generation import LoopStats, WorkItem, fingerprint, run_resumable
from data_pipeline.pairs import Pair
from data_pipeline.prompts import drop_image_placeholders
from data_pipeline.records import AppendLog, SampleRecord
from data_pipeline.sharding import ShardSpec, derive_seed


@dataclass(frozen=True)
class NTPSettings:
    """Dropout-NTP knobs (all in the resume fingerprint)."""

    ratio: float = 0.5
    pairs_per_question: int = 1
    params: SamplingParams = SamplingParams()
    seed: int = 0
    batch_size: int = 4


def subset_suffix(ratio: float) -> str:
    """``_prefix_pair_sr0.5_wo_image``: the MMPR subset name records the start ratio."""
    return f"_prefix_pair_sr{ratio:g}_wo_image"


def truncate_words(text: str, ratio: float) -> str | None:
    """The text up to the end of its ``floor(ratio * words)``-th word (original spacing kept).

    None when that keeps no word or every word (nothing would be left to continue, or nothing cut).
    """
    words = list(re.finditer(r"\S+", text))
    keep = math.floor(ratio * len(words))
    if keep < 1 or keep >= len(words):
        return None
    return text[: words[keep - 1].end()]


def needs_ntp(record: SampleRecord) -> bool:
    """Sampled questions without a checkable answer are Dropout-NTP's input."""
    return record.answer is None


def choose_responses(record: SampleRecord, settings: NTPSettings) -> list[tuple[int, str]]:
    """Picks up to ``pairs_per_question`` (index, prefix) chosen responses, seeded per question.

    Responses that follow the prompt's answer format come first: with no ground truth, a
    well-formed response is the best evidence of a good one.
    """
    candidates = []
    for index, response in enumerate(record.responses):
        prefix = truncate_words(response, settings.ratio)
        if prefix is not None:
            well_formed = extract_answer(response, record.answer_format).ok
            candidates.append((not well_formed, index, prefix))
    rng = random.Random(derive_seed(settings.seed, "ntp-choose", record.id))
    rng.shuffle(candidates)
    candidates.sort(key=lambda c: c[0])  # stable: shuffled within each group, well-formed first
    return [(index, prefix) for _, index, prefix in candidates[: settings.pairs_per_question]]


def continuation_request(record: SampleRecord, prefix: str, seed: int) -> GenerationRequest:
    """The text-only request: no images, placeholders removed, the system message the response was
    sampled with, and the prefix opening the answer (a final assistant message, continued)."""
    return GenerationRequest(question=drop_image_placeholders(record.prompt), system_prompt=record.system_prompt,
                             assistant_prefix=prefix, num_samples=1, seed=seed,
                             source=f"{record.dataset} line {record.line} (id {record.id}), Dropout-NTP")


def continue_without_image(
    records: Sequence[SampleRecord],
    backend,
    settings: NTPSettings,
    log_path: str | os.PathLike,
    shard: ShardSpec = ShardSpec(),
    progress: bool = True,
) -> LoopStats:
    """Generates the continuations for the shard's Dropout-NTP questions into ``log_path``."""
    owned = [r for r in records if needs_ntp(r) and shard.owns(r.id)]
    by_id = {r.id: r for r in owned}
    config = fingerprint({"stage": "dropout-ntp", **backend.describe(), **asdict(settings)})

    def prepare(record_id: str) -> WorkItem | dict:
        record = by_id[record_id]
        chosen = choose_responses(record, settings)
        if not chosen:
            return {"id": record_id, "dataset": record.dataset, "line": record.line,
                    "skipped": f"no response with at least {math.ceil(1 / settings.ratio)} words to cut"}
        requests = tuple(
            continuation_request(record, prefix, derive_seed(settings.seed, "ntp", record_id, index))
            for index, prefix in chosen
        )
        return WorkItem(record_id, requests, chosen)

    def finish(item: WorkItem, generations: list) -> dict:
        record = by_id[item.id]
        continuations = [
            {"chosen_index": index, "prefix": prefix, "continuation": g.texts[0], "finish_reason": g.finish_reasons[0]}
            for (index, prefix), g in zip(item.payload, generations)
        ]
        return {"id": item.id, "dataset": record.dataset, "line": record.line, "continuations": continuations}

    with AppendLog(log_path) as log:
        return run_resumable(
            log, [r.id for r in owned], settings.batch_size, config, prepare,
            lambda requests: backend.generate(requests, settings.params), finish,
            desc=f"dropout-ntp {shard.tag}" if shard.count > 1 else "dropout-ntp", progress=progress,
        )


@dataclass(frozen=True)
class Continuation:
    """One Dropout-NTP continuation, as logged: which response was cut, where, and what followed."""

    chosen_index: int
    prefix: str
    continuation: str
    finish_reason: str


def ntp_pairs(records_by_id: dict[str, SampleRecord], ntp_lines: Sequence[dict]) -> tuple[list[Pair], int]:
    """Pairs from the continuation log; also returns how many continuations equal the chosen one.

    The pair is trained *with* the image: only the continuation was generated without it.
    """
    pairs, identical = [], 0
    for line in ntp_lines:
        if "skipped" in line:
            continue
        record = records_by_id[line["id"]]
        for item in (Continuation(**c) for c in line["continuations"]):
            chosen = record.responses[item.chosen_index]
            rejected = item.prefix + item.continuation
            if rejected == chosen:
                identical += 1  # the model recovered the response exactly: no preference signal
                continue
            extra = {
                "chosen_meta": {"id": record.id, "index": item.chosen_index},
                "rejected_meta": {"id": record.id, "prefix": item.prefix, "finish_reason": item.finish_reason},
            }
            pairs.append(Pair(record.dataset, tuple(record.image), record.prompt, chosen, rejected, record.line, extra))
    return pairs, identical
