"""Held-out evaluation: greedy chain-of-thought answers, judged by the data pipeline's rules.

A response counts as correct when the pipeline's v1 extraction finds a ``Final answer:`` and
its judge (modes :data:`mpo.demo.stages.MATCH_MODES`) accepts it; an unparsable response counts
as wrong. Generation goes through the pipeline's transformers backend, so a question is encoded
exactly as it was when the training pairs were sampled.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from mpo.demo.stages import MATCH_MODES, cot_prompt, write_jsonl


@dataclass
class EvalResult:
    """Accuracy over the held-out questions, overall and per question family."""

    questions: int
    correct: int
    unparsable: int
    per_kind: dict[str, float] = field(default_factory=dict)

    @property
    def accuracy(self) -> float:
        return self.correct / self.questions if self.questions else 0.0


def judge_response(response: str, answer: str) -> tuple[str | None, str]:
    """(extracted answer, ``correct`` | ``incorrect`` | ``unparsable``) by the pipeline's rules."""
    from data_pipeline.extract import extract_answer
    from data_pipeline.match import judge

    extraction = extract_answer(response, "final_answer")
    if not extraction.ok:
        return None, "unparsable"
    correct = judge(extraction.answer, answer, MATCH_MODES).correct
    return extraction.answer, "correct" if correct else "incorrect"


def evaluate(model_dir: Path, questions: list[dict], image_root: Path, out_path: Path,
             max_new_tokens: int, batch_size: int, prompt: str, desc: str = "eval") -> EvalResult:
    """Answers every question greedily and judges it; writes one JSON line per question.

    Args:
        model_dir: the HF directory to evaluate.
        questions: shapes records (``id``, ``image``, ``question``, ``answer``, ``kind``).
        image_root: the directory the ``image`` paths are relative to.
        out_path: predictions JSONL (question id, kind, response, extracted answer, status).
        max_new_tokens: generation budget per response.
        batch_size: questions per generate call.
        prompt: the chain-of-thought template the model was trained with (``v1`` or ``short``).
    """
    from data_pipeline.backends import GenerationRequest, SamplingParams, TransformersBackend
    from mpo.inputs import load_image

    backend = TransformersBackend(model_dir, device="cpu", dtype="float32")
    params = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens, max_tiles=1)
    # One family per batch where possible: similar lengths, fewer wasted decoding steps.
    ordered = sorted(questions, key=lambda r: r["kind"])
    predictions = []
    with tqdm(total=len(ordered), desc=desc, unit="q", dynamic_ncols=True, mininterval=0.5) as bar:
        for start in range(0, len(ordered), batch_size):
            batch = ordered[start : start + batch_size]
            requests = [GenerationRequest(question=cot_prompt(r["question"], prompt), images=(load_image(image_root / r["image"]),))
                        for r in batch]
            for record, generation in zip(batch, backend.generate(requests, params)):
                response = generation.texts[0]
                extracted, status = judge_response(response, record["answer"])
                predictions.append({"id": record["id"], "kind": record["kind"], "answer": record["answer"],
                                    "response": response, "extracted": extracted, "status": status})
            bar.update(len(batch))
    predictions.sort(key=lambda p: p["id"])
    write_jsonl(out_path, predictions)
    totals, right = Counter(), Counter()
    for p in predictions:
        totals[p["kind"]] += 1
        right[p["kind"]] += p["status"] == "correct"
    return EvalResult(
        questions=len(predictions),
        correct=sum(right.values()),
        unparsable=sum(p["status"] == "unparsable" for p in predictions),
        per_kind={kind: right[kind] / totals[kind] for kind in sorted(totals)},
    )
