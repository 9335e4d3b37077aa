"""Held-out evaluation: greedy chain-of-thought answers, judged by the data pipeline's rules.

A response counts as correct when the pipeline's v1 extraction finds a ``Final answer:`` and
its judge (modes :data:`mpo.demo.stages.MATCH_MODES`) accepts it; an unparsable response counts
as wrong. Generation goes through the pipeline's transformers backend, so a question is encoded
exactly as it was when the training pairs were sampled. The SFT model is also asked with the
direct prompt (its whole response is the answer), the way most of its SFT targets were written.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from mpo.demo.stages import MATCH_MODES, cot_prompt, direct_prompt, write_jsonl


@dataclass
class EvalResult:
    """Accuracy over the held-out questions, overall and per question family."""

    questions: int
    correct: int
    unparsable: int
    per_kind: dict[str, float] = field(default_factory=dict)
    predictions: list[dict] = field(default_factory=list, repr=False)
    """One line per question, sorted by id (also written to the predictions JSONL)."""

    @property
    def accuracy(self) -> float:
        return self.correct / self.questions if self.questions else 0.0


def judge_response(response: str, answer: str, direct: bool = False) -> tuple[str | None, str]:
    """(extracted answer, ``correct`` | ``incorrect`` | ``unparsable``) by the pipeline's rules.

    ``direct``: the response to the direct prompt, whose one line is the answer.
    """
    from data_pipeline.extract import extract_answer
    from data_pipeline.match import judge

    if direct:
        extracted = response.strip()
        if not extracted or "\n" in extracted:
            return None, "unparsable"
    else:
        extraction = extract_answer(response, "final_answer")
        if not extraction.ok:
            return None, "unparsable"
        extracted = extraction.answer
    correct = judge(extracted, answer, MATCH_MODES).correct
    return extracted, "correct" if correct else "incorrect"


def evaluate(model_dir: Path, questions: list[dict], image_root: Path, out_path: Path,
             max_new_tokens: int, batch_size: int, prompt: str, desc: str = "eval", direct: bool = False) -> EvalResult:
    """Answers every question greedily and judges it; writes one JSON line per question.

    Args:
        model_dir: the HF directory to evaluate.
        questions: shapes records (``id``, ``image``, ``question``, ``answer``, ``kind``).
        image_root: the directory the ``image`` paths are relative to.
        out_path: predictions JSONL (question id, kind, response, extracted answer, status).
        max_new_tokens: generation budget per response.
        batch_size: questions per generate call.
        prompt: the chain-of-thought template the model was trained with (``v1`` or ``short``).
        direct: ask with the direct prompt instead, and judge the whole response.
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
            requests = [GenerationRequest(question=direct_prompt(r["question"]) if direct else cot_prompt(r["question"], prompt),
                                          images=(load_image(image_root / r["image"]),)) for r in batch]
            for record, generation in zip(batch, backend.generate(requests, params)):
                response = generation.texts[0]
                extracted, status = judge_response(response, record["answer"], direct)
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
        predictions=predictions,
    )


# The image-swap test runs on these models only: each costs one more greedy pass.
IMAGE_SWAP_METHODS = ("sft", "mpo")


def majority_baseline(train: list[dict], test: list[dict]) -> float:
    """Accuracy of answering every test question with its family's most common train answer."""
    by_kind: dict[str, Counter] = {}
    for record in train:
        by_kind.setdefault(record["kind"], Counter())[record["answer"]] += 1
    guesses = {kind: counts.most_common(1)[0][0] for kind, counts in by_kind.items()}
    return sum(guesses.get(r["kind"]) == r["answer"] for r in test) / len(test) if test else 0.0


def swap_images(questions: list[dict]) -> list[dict]:
    """The same questions, each over the next held-out image (cyclically, in image order)."""
    images = sorted({r["image"] for r in questions})
    following = {image: images[(i + 1) % len(images)] for i, image in enumerate(images)}
    return [{**r, "image": following[r["image"]]} for r in questions]


def changed_share(original: list[dict], swapped: list[dict]) -> float:
    """Share of questions (matched by id) whose extracted answer differs between two runs."""
    answers = {p["id"]: p["extracted"] for p in original}
    return sum(answers[p["id"]] != p["extracted"] for p in swapped) / len(swapped) if swapped else 0.0
