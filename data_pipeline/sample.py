"""Stage 1, sample: K chain-of-thought responses per question, into a resumable log.

Each log line (one per question) is a :class:`~data_pipeline.records.SampleRecord`::

    {"id", "dataset", "line", "image": [rel paths], "question": original text,
     "prompt": the CoT user turn with <image> placeholders, "system_prompt": the system message
     (null: none), "prompt_version": "v1" | "v2" | "custom", "answer": str | [str] | null,
     "answer_format": "final_answer" | "boxed",
     "responses": [K texts], "finish_reasons": [K], "max_tiles": the tile budget, "config": settings hash}

or, for a bad input skipped with ``--skip-bad``, ``{"id", "dataset", "line", "skipped": message}``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from data_pipeline.backends import GenerationRequest, SamplingParams
from data_pipeline.generation import LoopStats, WorkItem, fingerprint, run_resumable
from data_pipeline.prompts import PromptTemplate, build_cot_prompt
from data_pipeline.records import AppendLog, Question, SampleRecord
from data_pipeline.sharding import ShardSpec, derive_seed
from mpo.config import MAX_IMAGE_PIXELS
from mpo.errors import DataError
from mpo.data.media import load_image, open_image, resolve_data_path
from mpo.data.prompting import INTERNVL_SYSTEM_MESSAGE


@dataclass(frozen=True)
class SampleSettings:
    """Everything that decides the sampled responses (all of it goes into the resume fingerprint)."""

    template: PromptTemplate
    num_samples: int = 8
    params: SamplingParams = SamplingParams()
    seed: int = 0
    batch_size: int = 4  # questions per generate call
    system_prompt: str | None = INTERNVL_SYSTEM_MESSAGE  # the text (None: no system turn), as --system-prompt resolves it


def _located(error: DataError, question: Question, field: str) -> DataError:
    return DataError(error.reason, file=question.file, line=question.line, field=error.field or field)


def image_paths(question: Question, image_root: Path, max_pixels: int) -> tuple[Path, ...]:
    """The question's images under the path rule the trainer applies too (so no pair is built that
    training would refuse), each checked cheaply (exists, a readable header, not too large) so a
    long run does not die on line 90,000."""
    paths = []
    for rel in question.images:
        try:
            path = resolve_data_path(image_root, rel)
            open_image(path, max_pixels).close()
        except DataError as error:
            raise DataError(error.reason, file=question.file, line=question.line, field="image") from None
        paths.append(path)
    return tuple(paths)


def sample_questions(
    questions: Sequence[Question],
    image_root: str | os.PathLike,
    backend,
    settings: SampleSettings,
    log_path: str | os.PathLike,
    shard: ShardSpec = ShardSpec(),
    skip_bad: bool = False,
    progress: bool = True,
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> tuple[LoopStats, list[DataError]]:
    """Samples the shard's questions into ``log_path``; returns loop counts and skipped bad inputs.

    Args:
        max_pixels: the largest image accepted (``--max-image-pixels``, the trainer's
            ``data.max_image_pixels``); a larger one is a bad input.

    Raises:
        DataError: a bad input (image outside the root, missing, corrupt or too large; placeholder
            mismatch) without ``skip_bad``.
        ResumeError: the log was written with other settings.
    """
    image_root = Path(image_root)
    owned = [q for q in questions if shard.owns(q.id)]
    by_id = {q.id: q for q in owned}
    config = fingerprint({"stage": "sample", **backend.describe(), **asdict(settings), "root": str(image_root.resolve())})
    bad: list[DataError] = []

    def skipped(question: Question, error: DataError) -> dict:
        if not skip_bad:
            raise error
        bad.append(error)
        return {"id": question.id, "dataset": question.dataset, "line": question.line, "skipped": str(error)}

    # Up-front pass: fail (or mark) bad inputs before spending any generation on the good ones.
    early: dict[str, dict] = {}
    paths: dict[str, tuple[Path, ...]] = {}
    for question in owned:
        try:
            build_cot_prompt(question.question, len(question.images), settings.template)
            paths[question.id] = image_paths(question, image_root, max_pixels)
        except DataError as error:
            early[question.id] = skipped(question, _located(error, question, "question"))

    def prepare(question_id: str) -> WorkItem | dict:
        question = by_id[question_id]
        if question_id in early:
            return early[question_id]
        prompt = build_cot_prompt(question.question, len(question.images), settings.template)
        try:
            images = tuple(load_image(path, max_pixels) for path in paths[question_id])
        except DataError as error:  # passed the header check, fails to decode fully
            return skipped(question, _located(error, question, "image"))
        request = GenerationRequest(
            question=prompt,
            images=images,
            image_paths=paths[question_id],
            system_prompt=settings.system_prompt,
            num_samples=settings.num_samples,
            seed=derive_seed(settings.seed, "sample", question.id),
        )
        return WorkItem(question.id, (request,), (question, prompt))

    def finish(item: WorkItem, generations: list) -> dict:
        question, prompt = item.payload
        generation = generations[0]
        return SampleRecord(
            id=question.id,
            dataset=question.dataset,
            line=question.line,
            image=list(question.images),
            question=question.question,
            prompt=prompt,
            system_prompt=settings.system_prompt,
            prompt_version=settings.template.name,
            answer=question.answer,
            answer_format=settings.template.answer_format,
            responses=list(generation.texts),
            finish_reasons=list(generation.finish_reasons),
            max_tiles=settings.params.max_tiles,
            max_new_tokens=settings.params.max_new_tokens,
        ).to_json()

    counts = {"samples": 0}

    def generate(requests: list[GenerationRequest]) -> list:
        generations = backend.generate(requests, settings.params)
        counts["samples"] += sum(len(g.texts) for g in generations)
        return generations

    with AppendLog(log_path) as log:
        stats = run_resumable(
            log, [q.id for q in owned], settings.batch_size, config, prepare, generate, finish,
            desc=f"sample {shard.tag}" if shard.count > 1 else "sample", progress=progress,
            describe_progress=lambda: {"samples": counts["samples"], "skipped": len(bad)},
        )
    return stats, bad
