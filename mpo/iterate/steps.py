"""The steps of a round, each a function of files on disk that returns what the round reports.

* :func:`sample_and_pair`: ``mpo-data build`` (its Python API) on the round's questions with the
  previous round's model: K samples per question, judged, paired into MMPR, with the per-question
  pass rates; resumable from its own logs.
* :func:`train_round`: the trainer on those pairs, from the previous round's weights.
* :func:`evaluate`: greedy answers to the held-out questions, judged by the same rules.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict
from pathlib import Path

from data_pipeline.backends import SamplingParams
from data_pipeline.build import BuildPaths, PairSettings, run_build
from data_pipeline.dropout_ntp import NTPSettings
from data_pipeline.judging import match_records
from data_pipeline.match import parse_modes
from data_pipeline.pass_rates import pass_rate_line, write_pass_rates
from data_pipeline.prompts import get_template
from data_pipeline.records import Question, read_log, read_questions, split_skipped
from data_pipeline.sample import SampleSettings, sample_questions
from mpo.data.prompting import resolve_system_prompt
from mpo.iterate.config import IterateConfig
from mpo.jsonl import write_jsonl_atomic

BUILD_NAME = "questions"
"""The build's name: its logs and pass rates go to ``round-k/pairs/work/questions/``."""


class IterateError(RuntimeError):
    """A round that cannot go on (no pairs, a failed training launch): one line, exit 1."""


def read_round_questions(path: str, number: int, per_round: int) -> list[Question]:
    """The questions round ``number`` samples: all of them, or its slice of ``per_round``."""
    questions, _ = read_questions(path, Path(path).stem, skip_bad=False)
    if not per_round or per_round >= len(questions):
        return questions
    start = (number - 1) * per_round % len(questions)
    return (questions + questions)[start : start + per_round]


def _template(config: IterateConfig):
    return get_template(config.prompt, config.template or None, config.answer_format or None)


def _image_root(questions: str, image_root: str) -> Path:
    return Path(image_root) if image_root else Path(questions).parent


def sample_and_pair(config: IterateConfig, number: int, backend, batch_size: int, seed: int, out_dir: Path) -> dict:
    """Samples round ``number``'s questions and writes its pairs to ``out_dir`` (an MMPR directory).

    Returns:
        The round's sample statistics: questions, samples, unparsable, sample accuracy, mean pass
        rate, pass@K, the pass-rate histogram, pairs per subset and in all, seconds.

    Raises:
        IterateError: the build wrote no pair (with the pipeline's reason).
    """
    started = time.perf_counter()
    params = SamplingParams(config.temperature, config.top_p, config.top_k, config.max_new_tokens, config.max_tiles)
    questions = read_round_questions(config.questions, number, config.questions_per_round)
    summary = run_build(
        questions, [], _image_root(config.questions, config.image_root), BuildPaths.of(out_dir, BUILD_NAME), backend,
        SampleSettings(_template(config), config.num_samples, params, seed, batch_size, resolve_system_prompt(config.system_prompt)),
        NTPSettings(config.ntp_ratio, config.ntp_pairs_per_question, params, seed, batch_size),
        PairSettings(config.max_pairs, seed, config.answer_fix),
        modes=parse_modes(config.match_modes), threshold=config.match_threshold,
    )
    print(summary.render(), flush=True)
    if not summary.pairs:
        raise IterateError(f"round {number} wrote 0 pairs: {summary.no_pairs_reason()}")
    rates = [json.loads(line) for line in Path(summary.pass_rates["path"]).read_text().splitlines()]
    checkable = [r for r in rates if r["pass_rate"] is not None]
    correct = sum(r["correct"] for r in checkable)
    samples = sum(r["samples"] for r in checkable)
    return {
        "questions": summary.questions,
        "samples": summary.samples,
        "unparsable": summary.parse_failures,
        "sample_accuracy": correct / samples if samples else None,
        "mean_pass_rate": statistics.fmean(r["pass_rate"] for r in checkable) if checkable else None,
        "pass_at_k": sum(r["correct"] > 0 for r in checkable) / len(checkable) if checkable else None,
        "pass_rates": summary.pass_rates,
        "pairs": summary.pairs,
        "subsets": {name: subset["pairs"] for name, subset in summary.subsets.items() if subset["pairs"]},
        "all_correct": summary.all_correct,
        "all_wrong": summary.all_wrong,
        "seconds": time.perf_counter() - started,
    }


def train_round(recipe, train_fn) -> dict:
    """Trains ``recipe`` with ``train_fn(recipe)``; returns the steps, the last logged metrics
    (losses, rewards, the trainer's ``eval/*`` when the recipe holds out pairs) and seconds."""
    started = time.perf_counter()
    train_fn(recipe)
    rows = [json.loads(line) for line in (Path(recipe.output_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]
    last = rows[-1] if rows else {}
    evaluated = next((row for row in reversed(rows) if "eval/loss" in row), {})
    metrics = {k: v for k, v in last.items() if k.startswith(("loss", "rewards/", "bco/"))}
    metrics.update({k: v for k, v in evaluated.items() if k.startswith("eval/")})
    return {"steps": last.get("step", 0), "metrics": metrics, "seconds": time.perf_counter() - started}


def evaluate(config: IterateConfig, backend, batch_size: int, seed: int, out_dir: Path) -> dict:
    """Greedy answers of the backend's model to ``eval_questions``, judged; resumable from its log.

    Returns:
        ``questions`` (with a ground truth), ``correct``, ``unparsable``, ``accuracy``, accuracy
        per dataset, seconds. ``out_dir`` gets ``samples.jsonl``, ``matched.jsonl`` and
        ``pass_rates.jsonl`` (per question, 0 or 1).
    """
    started = time.perf_counter()
    params = SamplingParams(0.0, 1.0, 0, config.eval_max_new_tokens or config.max_new_tokens, config.max_tiles)
    questions, _ = read_questions(config.eval_questions, Path(config.eval_questions).stem, skip_bad=False)
    settings = SampleSettings(_template(config), 1, params, seed, batch_size, resolve_system_prompt(config.system_prompt))
    root = _image_root(config.eval_questions, config.eval_image_root)
    sample_questions(questions, root, backend, settings, out_dir / "samples.jsonl")
    records, _ = split_skipped(read_log(out_dir / "samples.jsonl"))
    matched, stats = match_records(records, parse_modes(config.match_modes), config.match_threshold)
    write_jsonl_atomic(out_dir / "matched.jsonl", (r.to_json() for r in matched))
    write_pass_rates(out_dir / "pass_rates.jsonl", matched)
    judged = [pass_rate_line(record) for record in matched if record.answer is not None]
    correct = sum(line["correct"] for line in judged)
    return {
        "questions": len(judged),
        "correct": correct,
        "unparsable": sum(line["unparsable"] for line in judged),
        "accuracy": correct / len(judged) if judged else None,
        "per_dataset": {name: asdict(stat) | {"accuracy": stat.accuracy} for name, stat in sorted(stats.items())},
        "seconds": time.perf_counter() - started,
    }
