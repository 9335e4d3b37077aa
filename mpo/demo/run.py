"""``mpo demo``: the whole method end to end on CPU, on the synthetic shapes task.

Launch::

    mpo demo                          # seed 0, the default preset (~14 minutes on 2 CPU cores)
    mpo demo --seeds 0 1 2            # three seeds, mean ± spread in the report
    mpo demo --preset quick           # every stage on a handful of questions, into outputs/demo-quick
    mpo demo --resume                 # continue an interrupted run: keep its task, model and trained models
    mpo demo --set sft_steps=200 --set temperature=0.8   # any knob of mpo.demo.settings

Per seed, under ``OUT/seed<N>/``:

1. ``task/``        the shapes task (mpo.demo.shapes): train/test images that never repeat.
2. ``model/``       a random small InternVL (mpo.model.tiny), tokenizer trained on the task text.
3. ``sft/``         stage 1: the trainer with loss weights 0/0/1 on the reference chains of
                    thought (``sft/final`` is the SFT model).
4. ``pairs/``       stage 2: the data pipeline samples K responses per train question from the
                    SFT model, judges them, and writes MMPR pairs (correctness, format, Dropout-NTP).
5. ``mpo/``, ``dpo/``, ``sft_chosen/``  stage 3: from the SFT model, on the same pairs, with the
                    paper's weights 0.8/0.2/1.0, with DPO alone 1/0/0, and with SFT on the chosen
                    responses 0/0/1.
6. ``eval/``        stage 4: greedy CoT answers of every model on the held-out questions.

Then ``OUT/report.md``, ``OUT/accuracy.png``, ``OUT/training_curves_seed<N>.png`` and
``OUT/results.json``. A run is deterministic for a given seed and settings.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

from data_pipeline.pairs import CORRECTNESS_SUFFIX
from mpo.demo.report import accuracy_table, write_report
from mpo.demo.results import METHOD_LABELS, SeedResult
from mpo.demo.settings import PRESETS, DemoSettings, apply_overrides
from mpo.demo.stages import read_jsonl

MARKER = ".mpo-demo"  # marks a directory this command made, so a rerun may replace it


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@contextmanager
def _stage(timings: dict, name: str, number: int, total: int, seed: int):
    print(f"\n== seed {seed} · stage {number}/{total}: {name}", file=sys.stderr, flush=True)
    wall, cpu = time.perf_counter(), _cpu_seconds()
    yield
    timings[name] = {"wall": time.perf_counter() - wall, "cpu": _cpu_seconds() - cpu}
    print(f"   {name}: {timings[name]['wall']:.0f} s", file=sys.stderr, flush=True)


def _fresh_dir(path: Path) -> Path:
    """An empty directory; an existing one is replaced only if an earlier demo made it."""
    if path.exists():
        if not (path / MARKER).exists() and any(path.iterdir()):
            raise SystemExit(f"error: {path} exists and was not made by `mpo demo`; choose another --out")
        shutil.rmtree(path)
    path.mkdir(parents=True)
    (path / MARKER).touch()
    return path


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


def default_out(preset: str) -> Path:
    """Each preset's own folder, so a quick check never replaces the full demo's results."""
    return Path("outputs/demo" if preset == "default" else f"outputs/demo-{preset}")


def claim_out_dir(out: Path, preset: str, settings: DemoSettings, force: bool) -> None:
    """Creates ``out`` and records what runs there; results of another preset or other settings
    are replaced only with ``force``, and a folder ``mpo demo`` did not make never."""
    if out.exists() and any(out.iterdir()) and not (out / MARKER).exists():
        raise SystemExit(f"error: {out} exists and was not made by `mpo demo`; choose another --out")
    claim = {"preset": preset, "settings": settings.to_dict()}
    if (out / MARKER).exists() and not force:
        text = (out / MARKER).read_text()
        previous = json.loads(text) if text.strip() else {"preset": "unknown (an earlier version)"}
        if previous != claim:
            raise SystemExit(f"error: {out} holds the results of `mpo demo --preset {previous['preset']}` with other settings; "
                             "choose another --out, or pass --force to replace them")
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text(json.dumps(claim, sort_keys=True) + "\n")


def run_seed(settings: DemoSettings, seed: int, out: Path, resume: bool = False) -> SeedResult:
    """Every stage for one seed under ``out``; returns what the report needs.

    With ``resume``, an interrupted run of the same settings keeps what it finished: the task, the
    model and each trained model (``final/`` is written last, atomically) are not made again; the
    pipeline resumes its sampling from its own logs; the evaluations (minutes) run again.
    """
    from mpo.demo.chains import chain_shares
    from mpo.demo.accuracy import IMAGE_SWAP_METHODS, by_kind, changed_share, evaluate, evaluate_tallies, majority_baseline, swap_images
    from mpo.demo.pair_filter import keep_right_chains
    from mpo.demo.stages import (DATASET, METHODS, LossWeights, build_model, build_pairs, generate_task, task_records, train,
                                  write_sft_data)

    out = out if resume and (out / MARKER).exists() else _fresh_dir(out)
    result = SeedResult(seed=seed)
    timings = result.timings
    task, total = out / "task", 7
    with _stage(timings, "task + model", 1, total, seed):
        if not (resume and (out / "model" / "config.json").exists()):
            generate_task(task, settings, seed)
            build_model(task, out / "model", settings, seed)
        model = out / "model"
    train_questions = task_records(task, "train")[0]
    test_questions, test_describe = task_records(task, "test")
    result.eval_questions = len(test_questions)
    result.majority_baseline = majority_baseline(train_questions, test_questions)
    result.per_kind_baseline = {kind: majority_baseline(train_questions, group) for kind, group in by_kind(test_questions).items()}
    swapped_questions = swap_images(test_questions)

    def trained(start: Path, data: dict, run_dir: Path, weights: LossWeights, steps: int, batch: int, lr: float,
                warmup: float) -> Path:
        if resume and (run_dir / "final" / "config.json").exists():
            return run_dir / "final"
        return train(start, data, run_dir, weights, steps, batch, lr, warmup, settings, seed)

    def run_eval(method: str, model_dir: Path, direct: bool = False) -> None:
        evaluation = evaluate(model_dir, test_questions, task, out / "eval" / f"{method}.jsonl",
                              settings.max_new_tokens, settings.eval_batch, settings.prompt, desc=f"eval {method}", direct=direct)
        if method in IMAGE_SWAP_METHODS:
            swapped = evaluate(model_dir, swapped_questions, task, out / "eval" / f"{method}_swapped_images.jsonl",
                               settings.max_new_tokens, settings.eval_batch, settings.prompt, desc=f"swap {method}")
            result.image_sensitivity[method] = changed_share(evaluation.predictions, swapped.predictions)
            swapped_by_kind = by_kind(swapped.predictions)
            result.per_kind_swap[method] = {kind: changed_share(group, swapped_by_kind[kind])
                                            for kind, group in by_kind(evaluation.predictions).items()}
            result.tallies[method] = evaluate_tallies(model_dir, test_describe, task, out / "eval" / f"{method}_tallies.jsonl",
                                                      settings.max_new_tokens, settings.eval_batch, settings.prompt)
        if not direct:
            by_id = {r["id"]: r for r in test_questions}
            result.eval_chains[method] = chain_shares([(p["response"], by_id[p["id"]]) for p in evaluation.predictions])
        result.accuracy[method] = evaluation.accuracy
        result.per_kind[method] = evaluation.per_kind
        result.unparsable[method] = evaluation.unparsable
        print(f"   held-out accuracy of {method}: {100 * evaluation.accuracy:.1f}% "
              f"({evaluation.unparsable} unparsable)", file=sys.stderr, flush=True)

    with _stage(timings, "SFT", 2, total, seed):
        result.sft_data = write_sft_data(task, out / "sft_data" / "sft.jsonl", settings.prompt, settings.cot_share, seed)
        sft_model = trained(model, {"jsonl_path": str(out / "sft_data" / "sft.jsonl"), "image_root": str(task)},
                            out / "sft", LossWeights(0.0, 0.0, 1.0), settings.sft_steps, settings.sft_batch,
                            settings.sft_lr, settings.sft_warmup)
        result.runs["sft"] = str(out / "sft")
    with _stage(timings, "eval SFT", 3, total, seed):
        run_eval("sft", sft_model)
        run_eval("sft_direct", sft_model, direct=True)
    with _stage(timings, "sample + pairs", 4, total, seed):
        built = build_pairs(sft_model, task, out / "pairs", settings, seed)
        if settings.right_chains_only:
            kept = keep_right_chains(Path(built["meta"]), {r["id"]: r for r in train_questions}, out / "pairs_checked")
            built = {**built, "meta": kept["meta"], "subsets": kept["subsets"], "wrong_chains_dropped": kept["dropped"]}
    result.pairs = built["subsets"]
    checkable = built["summaries"][DATASET]
    result.sample_accuracy = checkable["datasets"][DATASET]["accuracy"]
    result.pass_at_k = pass_at_k(out / "pairs" / "work" / DATASET / "matched.jsonl")
    result.chosen_chains = chain_shares(chosen_responses(out / "pairs", {r["id"]: r for r in train_questions}))
    result.build = {key: sum(s[key] for s in built["summaries"].values())
                    for key in ("questions", "samples", "parse_failures", "all_correct", "all_wrong", "ntp_skipped", "ntp_identical")}
    if settings.right_chains_only:
        result.build["wrong_chains_dropped"] = built["wrong_chains_dropped"]
    for number, (method, weights) in enumerate(METHODS.items(), start=5):
        with _stage(timings, f"train + eval {method}", number, total, seed):
            final = trained(sft_model, {"meta_path": built["meta"]}, out / method, weights, settings.pref_steps,
                            settings.pref_batch, settings.pref_lr, settings.pref_warmup)
            result.runs[method] = str(out / method)
            run_eval(method, final)
    (out / "result.json").write_text(json.dumps(asdict(result), indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mpo demo", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 2)[2])
    parser.add_argument("--out", help="output directory (default: outputs/demo, or outputs/demo-PRESET for another preset)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds to run (default: 0)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default", help="settings preset")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting")
    parser.add_argument("--force", action="store_true",
                        help="replace the results in --out even if they were made with another preset or settings")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted run of the same settings in --out: keep its task, model and trained models")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (0: torch's default, one per core); 1 is faster on a machine other jobs keep busy")
    args = parser.parse_args(argv)
    try:
        settings = apply_overrides(PRESETS[args.preset], args.set)
    except ValueError as error:
        parser.error(str(error))
    if len(set(args.seeds)) != len(args.seeds):
        parser.error("--seeds must be distinct")

    import torch
    from transformers.utils import logging as hf_logging

    if args.threads:
        torch.set_num_threads(args.threads)

    hf_logging.disable_progress_bar()  # weight loading/saving bars would bury the stage bars
    hf_logging.set_verbosity_error()
    out = Path(args.out or default_out(args.preset))
    claim_out_dir(out, args.preset, settings, args.force)
    wall, cpu, load = time.perf_counter(), _cpu_seconds(), os.getloadavg()[0]
    results = [run_seed(settings, seed, out / f"seed{seed}", args.resume) for seed in args.seeds]
    total_wall, total_cpu = time.perf_counter() - wall, _cpu_seconds() - cpu
    machine = (f"{os.cpu_count()} CPU core(s), {torch.get_num_threads()} torch thread(s), "
               f"load average {load:.1f} at the start and {os.getloadavg()[0]:.1f} at the end")
    report = write_report(out, settings.to_dict(), results, args.preset, total_wall, total_cpu, machine)
    (out / "results.json").write_text(json.dumps({"preset": args.preset, "settings": settings.to_dict(),
                                                  "total_wall_s": total_wall, "total_cpu_s": total_cpu,
                                                  "seeds": [asdict(r) for r in results]}, indent=2) + "\n")
    print("\n" + "\n".join(accuracy_table(results)))
    print(f"\nreport: {report} ({total_wall:.0f} s)")
    return 0


__all__ = ["METHOD_LABELS", "main", "run_seed"]

if __name__ == "__main__":
    raise SystemExit(main())
