"""``mpo demo``: the whole method end to end on CPU, on the synthetic shapes task.

Launch::

    mpo demo                          # seed 0, the default preset (two rounds; ~25 minutes on 2 CPU cores)
    mpo demo --seeds 0 1 2            # three seeds, mean ± spread in the report
    mpo demo --preset quick           # every stage on a handful of questions, into outputs/demo-quick
    mpo demo --resume                 # continue an interrupted run: keep its task, model and trained models
    mpo demo --set rounds=3 --set reference=initial   # any knob of mpo.demo.settings

Per seed, under ``OUT/seed<N>/``:

1. ``task/``        the shapes task (mpo.demo.shapes): train/test images that never repeat.
2. ``model/``       a random small InternVL (mpo.model.tiny), tokenizer trained on the task text.
3. ``sft/``         the trainer with loss weights 0/0/1 on the reference chains of thought
                    (``sft/final`` is the SFT model); ``eval/`` its held-out answers.
4. ``round1/``      the data pipeline samples K responses per train question from the SFT model
                    and writes MMPR pairs (``pairs-sft/``, chain-checked in ``pairs-sft_checked/``);
                    from the SFT model, on those pairs: MPO (0.8/0.2/1.0), DPO alone (1/0/0) and
                    SFT on the chosen responses (0/0/1) in ``mpo/``, ``dpo/``, ``sft_chosen/``;
                    their greedy held-out answers in ``eval/``.
5. ``round<r>/``    each method's round r-1 model sampled (``pairs-<method>/``) and trained again
                    from its own weights on its own pairs (:mod:`mpo.demo.rounds`).

Then ``OUT/report.md``, ``OUT/accuracy.png``, ``OUT/rounds.png``, ``OUT/training_curves_seed<N>.png``
and ``OUT/results.json``. A run is deterministic for a given seed and settings.
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

from mpo.demo.report import accuracy_table, write_report
from mpo.demo.results import METHOD_LABELS, SeedResult
from mpo.demo.settings import PRESETS, DemoSettings, apply_overrides

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
    """Every stage for one seed under ``out`` (:class:`mpo.demo.rounds.SeedRun`); returns what the
    report needs. With ``resume``, an interrupted run of the same settings keeps what it finished."""
    from mpo.demo.rounds import SeedRun

    out = out if resume and (out / MARKER).exists() else _fresh_dir(out)
    return SeedRun(settings, seed, out, resume, _stage).run()


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
