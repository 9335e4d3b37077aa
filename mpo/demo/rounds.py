"""One seed of the demo, stage by stage: the task, SFT, then the preference rounds.

Round 1 is the single pass: the SFT model's samples give one set of pairs, and every method
trains from the SFT model on it. Round r > 1 is the iteration (arXiv 2404.19733, Kwai Keye-VL):
each method's round r-1 model is sampled, its own pairs built and chain-checked, and it trains
from those weights with the reference ``DemoSettings.reference`` (``previous``: the round r-1
model itself; ``initial``: the SFT model). MPO iterated is iterative MPO, SFT on chosen iterated
is rejection-sampling fine-tuning, DPO alone iterated is iterative DPO.

Layout under ``seed<N>/``: ``task/``, ``model/``, ``sft_data/``, ``sft/``, ``eval/`` (the SFT
model's answers), then per round ``round<r>/``: ``pairs-<source>/`` (the pipeline's MMPR
directory; ``source`` is ``sft`` in round 1, else the method sampled), ``pairs-<source>_checked/``
(the pairs trained on, judged by their chains: ``DemoSettings.pairing``), ``<method>/`` (the training run; ``final/``
is the model) and ``eval/<method>.jsonl``.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

from data_pipeline.pairs import CORRECTNESS_SUFFIX
from mpo.demo.accuracy import (IMAGE_SWAP_METHODS, by_kind, changed_share, evaluate, evaluate_tallies, majority_baseline,
                               swap_images)
from mpo.demo.chains import chain_shares
from mpo.demo.pair_filter import keep_right_chains, pair_by_chains
from mpo.demo.results import RoundResult, Samples, SeedResult
from mpo.demo.settings import DemoSettings
from mpo.demo.stages import (DATASET, METHODS, LossWeights, build_model, build_pairs, generate_task, read_jsonl, task_records,
                             train, write_sft_data)

SFT_WEIGHTS = LossWeights(0.0, 0.0, 1.0)
BUILD_COUNTS = ("questions", "samples", "parse_failures", "all_correct", "all_wrong", "ntp_skipped", "ntp_identical")


def pass_at_k(matched_path: Path) -> float:
    """Share of sampled questions with at least one correct response among their K."""
    records = read_jsonl(matched_path)
    hits = sum(any(j["status"] == "correct" for j in r["judgements"]) for r in records)
    return hits / len(records) if records else 0.0


def chosen_responses(pairs_dir: Path, records: dict[str, dict]) -> list[tuple[str, dict]]:
    """Each distinct (question, chosen response) of the correctness pairs, with its task record."""
    seen = {}
    for path in sorted((pairs_dir / "annotations").glob(f"*{CORRECTNESS_SUFFIX}.jsonl")):
        for line in read_jsonl(path):
            question_id = line["chosen_meta"]["id"]
            seen[(question_id, line["chosen"])] = records[question_id]
    return [(chosen, record) for (_, chosen), record in sorted(seen.items())]


def preference_steps(settings: DemoSettings, pairs: int) -> int:
    """A round's training steps: ``pref_steps``, or fewer when that would pass over its ``pairs``
    more than ``pref_epochs`` times."""
    if not settings.pref_epochs:
        return settings.pref_steps
    return max(1, min(settings.pref_steps, round(settings.pref_epochs * pairs / settings.pref_batch)))


def stage_count(settings: DemoSettings) -> int:
    """Stages of one seed: task + model, SFT, its evaluation, round 1's sampling and one stage per
    method, then one stage per method for each later round (its sampling, training, evaluation)."""
    return 4 + len(METHODS) * settings.rounds


class SeedRun:
    """The stages of one seed under ``out``; each fills :attr:`result`.

    With ``resume``, what an interrupted run of the same settings finished is kept: the task, the
    model and each trained model (``final/`` is written last, atomically); the pipeline resumes its
    sampling from its own logs; the evaluations run again.
    """

    def __init__(self, settings: DemoSettings, seed: int, out: Path, resume: bool, stage):
        self.settings, self.seed, self.out, self.resume = settings, seed, out, resume
        self.stage = stage  # stage(timings, name, number, total, seed): a context manager that times a stage
        self.result = SeedResult(seed=seed)
        self.task = out / "task"
        self.number = 0

    @contextmanager
    def _stage(self, name: str) -> Iterator[None]:
        self.number += 1
        with self.stage(self.result.timings, name, self.number, stage_count(self.settings), self.seed):
            yield

    def run(self) -> SeedResult:
        settings = self.settings
        with self._stage("task + model"):
            if not (self.resume and (self.out / "model" / "config.json").exists()):
                generate_task(self.task, settings, self.seed)
                build_model(self.task, self.out / "model", settings, self.seed)
        self._load_task()
        with self._stage("SFT"):
            self.result.sft_data = write_sft_data(self.task, self.out / "sft_data" / "sft.jsonl", settings.prompt,
                                                  settings.cot_share, self.seed)
            sft_model = self._trained(self.out / "model", {"jsonl_path": str(self.out / "sft_data" / "sft.jsonl"),
                                                           "image_root": str(self.task)},
                                      self.out / "sft", SFT_WEIGHTS, settings.sft_steps, settings.sft_batch, settings.sft_lr,
                                      settings.sft_warmup)
            self.result.runs["sft"] = str(self.out / "sft")
        with self._stage("eval SFT"):
            self._evaluate("sft", sft_model, self.out / "eval", swap=True)
            self._evaluate("sft_direct", sft_model, self.out / "eval", direct=True)
        models = {method: sft_model for method in METHODS}
        for number in range(1, settings.rounds + 1):
            models = self._round(number, models, sft_model)
        (self.out / "result.json").write_text(json.dumps(asdict(self.result), indent=2) + "\n")
        return self.result

    def _load_task(self) -> None:
        train_questions = task_records(self.task, "train")[0]
        self.test_questions, self.test_describe = task_records(self.task, "test")
        self.train_by_id = {r["id"]: r for r in train_questions}
        self.test_by_id = {r["id"]: r for r in self.test_questions}
        self.swapped_questions = swap_images(self.test_questions)
        result = self.result
        result.eval_questions = len(self.test_questions)
        result.majority_baseline = majority_baseline(train_questions, self.test_questions)
        result.per_kind_baseline = {kind: majority_baseline(train_questions, group)
                                    for kind, group in by_kind(self.test_questions).items()}

    def _round(self, number: int, starts: dict[str, Path], sft_model: Path) -> dict[str, Path]:
        """Round ``number`` from each method's model ``starts``; returns each method's new model."""
        settings, directory = self.settings, self.out / f"round{number}"
        round_result = RoundResult(round=number)
        self.result.rounds.append(round_result)
        last = number == settings.rounds
        finals = {}
        if number == 1:
            with self._stage("round 1: sample + pairs (SFT model)"):
                meta = self._pairs("sft", sft_model, directory, number, round_result)
        for method, weights in METHODS.items():
            name = f"round {number}: train + eval {method}" if number == 1 else f"round {number}: {method} (sample, pairs, train, eval)"
            with self._stage(name):
                if number > 1:
                    meta = self._pairs(method, starts[method], directory, number, round_result)
                # Round 1 starts from the SFT model, which is then its reference either way.
                reference = sft_model if number > 1 and settings.reference == "initial" else None
                run_dir = directory / method
                source = "sft" if number == 1 else method
                steps = preference_steps(settings, sum(round_result.samples[source].pairs.values()))
                lr = settings.pref_lr * settings.lr_decay ** (number - 1)
                finals[method] = self._trained(starts[method], {"meta_path": meta}, run_dir, weights, steps,
                                               settings.pref_batch, lr, settings.pref_warmup, reference)
                round_result.runs[method] = str(run_dir)
                evaluation = self._evaluate(method, finals[method], directory / "eval", swap=last and method in IMAGE_SWAP_METHODS)
                round_result.accuracy[method] = evaluation.accuracy
                round_result.per_kind[method] = evaluation.per_kind
                round_result.unparsable[method] = evaluation.unparsable
                round_result.eval_chains[method] = self.result.eval_chains[method]
                if last:
                    self.result.runs[method] = str(run_dir)
        return finals

    def _pairs(self, source: str, model: Path, directory: Path, number: int, round_result: RoundResult) -> str:
        """Samples ``model``, builds its pairs (judged by their chains, ``DemoSettings.pairing``) and
        records what they hold; returns the ``meta.json`` to train on."""
        settings = self.settings
        pairs_dir = directory / f"pairs-{source}"
        built = build_pairs(model, self.task, pairs_dir, settings, self.seed, round_number=number)
        samples = Samples(source=source, pairs=built["subsets"])
        samples.build = {key: sum(s[key] for s in built["summaries"].values()) for key in BUILD_COUNTS}
        checked = directory / f"pairs-{source}_checked"
        kept = None  # pairing "answer": the pipeline's pairs as they are
        if settings.pairing == "right_chains":
            kept = keep_right_chains(Path(built["meta"]), self.train_by_id, checked)
        elif settings.pairing in ("chains", "first_error"):
            kept = pair_by_chains(Path(built["meta"]), pairs_dir / "work" / DATASET / "matched.jsonl", self.train_by_id, checked,
                                  settings.max_pairs, self.seed + number - 1, settings.pairing == "first_error")
        if kept is not None:
            built = {**built, "meta": kept["meta"]}
            samples.pairs = kept["subsets"]
            samples.build["wrong_chains_dropped"] = kept["dropped"]
        samples.sample_accuracy = built["summaries"][DATASET]["datasets"][DATASET]["accuracy"]
        samples.pass_at_k = pass_at_k(pairs_dir / "work" / DATASET / "matched.jsonl")
        samples.chosen_chains = chain_shares(chosen_responses(pairs_dir, self.train_by_id))
        round_result.samples[source] = samples
        return built["meta"]

    def _trained(self, start: Path, data: dict, run_dir: Path, weights: LossWeights, steps: int, batch: int, lr: float,
                 warmup: float, reference: Path | None = None) -> Path:
        if self.resume and (run_dir / "final" / "config.json").exists():
            return run_dir / "final"
        if run_dir.exists():
            shutil.rmtree(run_dir)  # an unfinished run of this demo: trained again from its start
        return train(start, data, run_dir, weights, steps, batch, lr, warmup, self.settings, self.seed, reference)

    def _evaluate(self, method: str, model_dir: Path, eval_dir: Path, direct: bool = False, swap: bool = False):
        """Greedy answers of ``model_dir`` on the held-out questions, into :attr:`result` under
        ``method`` (the last value of a method is its last round's); with ``swap`` also the
        image-swap test and the describe tallies."""
        settings, result = self.settings, self.result
        evaluation = evaluate(model_dir, self.test_questions, self.task, eval_dir / f"{method}.jsonl", settings.max_new_tokens,
                              settings.eval_batch, settings.prompt, desc=f"eval {method}", direct=direct)
        if swap:
            swapped = evaluate(model_dir, self.swapped_questions, self.task, eval_dir / f"{method}_swapped_images.jsonl",
                               settings.max_new_tokens, settings.eval_batch, settings.prompt, desc=f"swap {method}")
            result.image_sensitivity[method] = changed_share(evaluation.predictions, swapped.predictions)
            swapped_by_kind = by_kind(swapped.predictions)
            result.per_kind_swap[method] = {kind: changed_share(group, swapped_by_kind[kind])
                                            for kind, group in by_kind(evaluation.predictions).items()}
            result.tallies[method] = evaluate_tallies(model_dir, self.test_describe, self.task, eval_dir / f"{method}_tallies.jsonl",
                                                      settings.max_new_tokens, settings.eval_batch, settings.prompt)
        if not direct:
            result.eval_chains[method] = chain_shares([(p["response"], self.test_by_id[p["id"]]) for p in evaluation.predictions])
        result.accuracy[method] = evaluation.accuracy
        result.per_kind[method] = evaluation.per_kind
        result.unparsable[method] = evaluation.unparsable
        print(f"   held-out accuracy of {method}: {100 * evaluation.accuracy:.1f}% ({evaluation.unparsable} unparsable)",
              file=sys.stderr, flush=True)
        return evaluation
