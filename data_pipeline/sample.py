"""Stage 1, sample: K chain-of-thought responses per question, into a resumable log.

Each log line (one per question) is a :class:`~data_pipeline.records.SampleRecord`::

    {"id", "dataset", "line", "image": [rel paths], "question": original text,
     "prompt": the CoT user turn with <image> placeholders, "system_prompt": the system message
     (null: none), "answer": str | [str] | null, "answer_format": "final_answer" | "boxed",
     "responses": [K texts], "finish_reasons": [K], "config": settings hash}

or, for a bad input skipped with ``--skip-bad``, ``{"id", "dataset", "line", "skipped": message}``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from data_pipeline.backends import GenerationRequest, SamplingParams
from data_pipeline.generation import LoopStats, WorkItem, fingerprint, run_resumable
from data_pipeline.prompts import PromptTemplate, build_cot_prompt
from data_pipeline.records import AppendLog, Question, SampleRecord
from data_pipeline.sharding import ShardSpec, derive_seed
from mpo.errors import DataError
from mpo.prompting import INTERNVL_SYSTEM_MESSAGE


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


def check_images(question: Question, image_root: Path) -> None:
    """Cheap up-front check (exists, readable header) so a long run does not die on line 90,000."""
    for rel in question.images:
        path = image_root / rel
        try:
            with Image.open(path):
                pass
        except FileNotFoundError:
            raise DataError(f"image not found: {path}", file=question.file, line=question.line, field="image") from None
        except (UnidentifiedImageError, OSError) as error:
            raise DataError(f"cannot decode image {path}: {error}", file=question.file, line=question.line, field="image") from None


def sample_questions(
    questions: Sequence[Question],
    image_root: str | os.PathLike,
    backend,
    settings: SampleSettings,
    log_path: str | os.PathLike,
    shard: ShardSpec = ShardSpec(),
    skip_bad: bool = False,
    progress: bool = True,
) -> tuple[LoopStats, list[DataError]]:
    """Samples the shard's questions into ``log_path``; returns loop counts and skipped bad inputs.

    Raises:
        DataError: a bad input (missing/corrupt image, placeholder mismatch) without ``skip_bad``.
        ResumeError: the log was written with other settings.
    """
    from mpo.inputs import load_image

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
    for question in owned:
        try:
            build_cot_prompt(question.question, len(question.images), settings.template)
            check_images(question, image_root)
        except DataError as error:
            early[question.id] = skipped(question, _located(error, question, "question"))

    def prepare(question_id: str) -> WorkItem | dict:
        question = by_id[question_id]
        if question_id in early:
            return early[question_id]
        prompt = build_cot_prompt(question.question, len(question.images), settings.template)
        try:
            images = tuple(load_image(image_root / rel) for rel in question.images)
        except DataError as error:  # passed the header check, fails to decode fully
            return skipped(question, _located(error, question, "image"))
        request = GenerationRequest(
            question=prompt,
            images=images,
            image_paths=tuple(image_root / rel for rel in question.images),
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
            answer=question.answer,
            answer_format=settings.template.answer_format,
            responses=list(generation.texts),
            finish_reasons=list(generation.finish_reasons),
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
