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

from mpo.demo.chains import TALLY_ENTRY
from mpo.demo.stages import MATCH_MODES, SYSTEM_PROMPT, cot_prompt, direct_prompt, write_jsonl


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


def greedy_responses(model_dir: Path, records: list[dict], image_root: Path, prompts: list[str],
                     max_new_tokens: int, batch_size: int, desc: str) -> list[str]:
    """The greedy response to each ``prompts[i]`` over ``records[i]["image"]``, in input order."""
    from data_pipeline.backends import GenerationRequest, SamplingParams, TransformersBackend
    from mpo.data.media import load_image
    from mpo.data.prompting import resolve_system_prompt

    backend = TransformersBackend(model_dir, device="cpu", dtype="float32")
    params = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens, max_tiles=1)
    # One family per batch where possible: similar lengths, fewer wasted decoding steps.
    order = sorted(range(len(records)), key=lambda i: records[i]["kind"])
    responses: list[str] = [""] * len(records)
    with tqdm(total=len(order), desc=desc, unit="q", dynamic_ncols=True, mininterval=0.5) as bar:
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            requests = [GenerationRequest(question=prompts[i], images=(load_image(image_root / records[i]["image"]),),
                                          system_prompt=resolve_system_prompt(SYSTEM_PROMPT)) for i in batch]
            for i, generation in zip(batch, backend.generate(requests, params)):
                responses[i] = generation.texts[0]
            bar.update(len(batch))
    return responses


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
    prompts = [direct_prompt(r["question"]) if direct else cot_prompt(r["question"], prompt) for r in questions]
    predictions = []
    for record, response in zip(questions, greedy_responses(model_dir, questions, image_root, prompts, max_new_tokens, batch_size, desc)):
        extracted, status = judge_response(response, record["answer"], direct)
        predictions.append({"id": record["id"], "kind": record["kind"], "answer": record["answer"],
                            "response": response, "extracted": extracted, "status": status})
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


def tally_accuracy(responses: list[str], describe: list[dict]) -> tuple[float, float]:
    """(share of responses that are exactly the reference tallies, share of tally entries right).

    The entries are the three colour counts of a describe item; one missing from a response counts
    as wrong.
    """
    exact = entries = total = 0
    for response, record in zip(responses, describe, strict=True):
        exact += response.strip() == record["cot"]
        truth = dict(TALLY_ENTRY.findall(record["cot"]))
        stated = dict(TALLY_ENTRY.findall(response))
        entries += sum(stated.get(name) == value for name, value in truth.items())
        total += len(truth)
    return (exact / len(describe), entries / total) if describe else (0.0, 0.0)


def evaluate_tallies(model_dir: Path, describe: list[dict], image_root: Path, out_path: Path,
                     max_new_tokens: int, batch_size: int, prompt: str) -> tuple[float, float]:
    """The perception check: greedy describe responses on held-out images against their tallies."""
    prompts = [cot_prompt(r["question"], prompt) for r in describe]
    responses = greedy_responses(model_dir, describe, image_root, prompts, max_new_tokens, batch_size, "tallies")
    write_jsonl(out_path, [{"id": r["id"], "reference": r["cot"], "response": response}
                           for r, response in zip(describe, responses)])
    return tally_accuracy(responses, describe)


def by_kind(records: list[dict]) -> dict[str, list[dict]]:
    """Records grouped by question family, families in sorted order."""
    groups: dict[str, list[dict]] = {}
    for record in sorted(records, key=lambda r: r["kind"]):
        groups.setdefault(record["kind"], []).append(record)
    return groups


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
