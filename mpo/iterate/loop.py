"""The rounds of ``mpo iterate``, each resumable at the step it stopped at.

Round k (1..N), under ``OUT/round-k/``:

1. ``sample``: round k-1's model (the starting model in round 1) answers the round's questions K
   times; the answers are judged and paired: ``pairs/`` is an MMPR directory (``meta.json``,
   ``annotations/``), ``pairs/work/questions/`` holds the sample log, ``matched.jsonl`` and
   ``pass_rates.jsonl``.
2. ``train``: from round k-1's weights on those pairs, with round k-1's model (``reference:
   previous``) or the starting model (``initial``) as the reference: ``train/`` is the trainer's
   output directory, ``train/final/`` the round's checkpoint.
3. ``evaluate`` (with ``eval_questions``): greedy answers of round k's model, ``eval/``.

``round-0/`` holds the starting model's evaluation. ``round-k/report.json`` is rewritten
(atomically) after each step with what the step measured; a resumed run skips the steps it lists,
resumes an unfinished sampling from its log and an unfinished training from its latest checkpoint
(``train.save_every``). After each round ``OUT/rounds.md`` (the table), ``OUT/rounds.jsonl`` and
``OUT/rounds.png`` are written again.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from mpo.iterate.config import IterateSetup, round_dir, round_recipe
from mpo.iterate.sampling import Sampler
from mpo.iterate.server import stop_recorded
from mpo.iterate.steps import evaluate, sample_and_pair, train_round
from mpo.iterate.table import render_table, write_plot
from mpo.jsonl import write_json_atomic, write_jsonl_atomic, write_text_atomic

SERVER_RECORD = "server.json"


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def read_report(output_dir: Path, number: int) -> dict:
    """Round ``number``'s ``report.json``, or a new one with no step done."""
    path = round_dir(output_dir, number) / "report.json"
    return json.loads(path.read_text()) if path.exists() else {"round": number, "steps": {}}


def _save(output_dir: Path, report: dict) -> None:
    write_json_atomic(round_dir(output_dir, report["round"]) / "report.json", report)


def initial_model(setup: IterateSetup) -> Path:
    """The starting policy as a directory (``builtin:`` models are built into the cache first)."""
    from mpo.model.loading import resolve_model_path

    return Path(resolve_model_path(setup.initial_model)).resolve()


def run_rounds(setup: IterateSetup, train_fn: Callable) -> list[dict]:
    """Runs (or resumes) every round of ``setup``; returns the round reports, round 0 first.

    Args:
        setup: the checked config.
        train_fn: ``train_fn(recipe)`` trains one round (in this process, or under a launcher).
    """
    config, out = setup.config, setup.output_dir
    stop_recorded(out / SERVER_RECORD)
    sampler = Sampler(config, out / SERVER_RECORD)
    seed = setup.seed
    model = initial_model(setup)
    try:
        reports = [read_report(out, 0)]
        reports[0]["model"] = str(model)
        if config.eval_questions and "evaluate" not in reports[0]["steps"]:
            _say(f"round 0: evaluating the starting model {model}")
            backend = sampler.backend(model, round_dir(out, 0) / "server.log")
            reports[0]["steps"]["evaluate"] = evaluate(config, backend, sampler.batch_size, seed, round_dir(out, 0) / "eval")
            _save(out, reports[0])
        for number in range(1, config.rounds + 1):
            report = _round(setup, sampler, number, model, seed, train_fn)
            reports.append(report)
            model = Path(report["model"])
            _write_table(out, reports)
    finally:
        sampler.release()
    return reports


def _round(setup: IterateSetup, sampler: Sampler, number: int, start: Path, seed: int, train_fn: Callable) -> dict:
    config, out = setup.config, setup.output_dir
    directory = round_dir(out, number)
    report = read_report(out, number)
    steps = report["steps"]
    report.update(start=str(start), model=str((directory / "train" / "final").resolve()),
                  reference=str(start) if config.reference == "previous" or number == 1 else str(initial_model(setup)))
    if steps:
        _say(f"round {number}: resuming after {', '.join(steps)}")
    if "sample" not in steps:
        _say(f"round {number}: sampling {start}")
        backend = sampler.backend(start, round_dir(out, number - 1) / "server.log")
        steps["sample"] = sample_and_pair(config, number, backend, sampler.batch_size, seed + number - 1, directory / "pairs")
        _save(out, report)
    if "train" not in steps:
        sampler.release()  # the server's memory is the trainer's now
        train_dir = directory / "train"
        checkpoints = sorted((train_dir / "checkpoints").glob("step-*"))
        resume = any((c / "trainer_state.json").exists() for c in checkpoints)
        if train_dir.exists() and not resume:
            shutil.rmtree(train_dir)  # a training that saved no checkpoint starts over
        recipe = round_recipe(setup, number, str(start), directory / "pairs" / "meta.json", resume)
        _say(f"round {number}: training from {start}" + (" (resuming from its latest checkpoint)" if resume else ""))
        steps["train"] = train_round(recipe, train_fn)
        _save(out, report)
    if config.eval_questions and "evaluate" not in steps:
        model = Path(report["model"])
        _say(f"round {number}: evaluating {model}")
        backend = sampler.backend(model, directory / "server.log")
        steps["evaluate"] = evaluate(config, backend, sampler.batch_size, seed, directory / "eval")
        _save(out, report)
    return report


def _write_table(out: Path, reports: list[dict]) -> None:
    table = render_table(reports)
    write_text_atomic(out / "rounds.md", table + "\n")
    write_jsonl_atomic(out / "rounds.jsonl", reports)
    write_plot(reports, out / "rounds.png")
    print("\n" + table, flush=True)
