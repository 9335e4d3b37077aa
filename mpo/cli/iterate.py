"""``mpo iterate``: iterative MPO, each round on the previous round's own samples.

    mpo iterate CONFIG.yaml [key.sub=value ...] [--rounds N] [--resume | --overwrite]
    mpo iterate recipes/iterate_tiny_cpu.yaml --rounds 3 iterate.num_samples=6 train.lr=5e-6
    mpo iterate CONFIG.yaml --launch launch/zero2.yaml      # each round's training under accelerate's launcher

CONFIG is a training recipe (``mpo train --help``) plus an ``iterate:`` section (its keys below).
Round k samples round k-1's model (the recipe's ``model.name_or_path`` in round 1), builds MMPR
pairs with the data pipeline, trains from round k-1's weights with round k-1's model as the
reference (``iterate.reference: previous``; ``initial`` keeps the starting model), evaluates on
``iterate.eval_questions``, and writes ``output_dir/round-k/``::

    round-k/pairs/               meta.json and annotations/ (the pairs trained on)
    round-k/pairs/work/questions/  the sample log, matched.jsonl, pass_rates.jsonl, summary.json
    round-k/train/               the trainer's output (metrics.jsonl, checkpoints/); final/ is the round's model
    round-k/eval/                the greedy held-out answers (samples, matched.jsonl, pass_rates.jsonl)
    round-k/report.json          what each finished step measured; round-0/ the starting model's evaluation
    rounds.md, rounds.jsonl, rounds.png   the per-round table and plot

``--resume`` continues a stopped run where it stopped: the round and step (an unfinished sampling
from its log, an unfinished training from its latest checkpoint, ``train.save_every``); a server
that a killed run left running is stopped first. ``--rounds`` may grow on resume; every other key
must equal the stopped run's.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
from pathlib import Path

import yaml

from mpo.cli.main import exit_on_data_error
from mpo.config_keys import format_recipe_keys, recipe_keys
from mpo.errors import EXIT_FAILED, DataError
from mpo.jsonl import write_text_atomic

SAVED_CONFIG = "iterate.yaml"
"""The resolved config of the run in ``output_dir``: it marks the folder as an ``mpo iterate``
run and is what ``--resume`` compares against."""


def iterate_parser() -> argparse.ArgumentParser:
    from mpo.iterate.config import IterateConfig

    keys = format_recipe_keys(keys=recipe_keys(IterateConfig, "iterate."))
    parser = argparse.ArgumentParser(
        prog="mpo iterate", formatter_class=argparse.RawDescriptionHelpFormatter, description=__doc__.split("\n\n", 1)[0],
        epilog=__doc__.split("\n\n", 1)[1] + "\niterate keys (the recipe's own: mpo train --help):\n" + keys,
    )
    parser.add_argument("config", metavar="CONFIG", help="a recipe with an iterate: section")
    parser.add_argument("overrides", metavar="KEY=VALUE", nargs="*", help="keys to override, e.g. iterate.num_samples=4 train.lr=5e-6")
    parser.add_argument("--rounds", type=int, help="rounds to run (default: iterate.rounds)")
    start = parser.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true", help="continue the run in output_dir at the round and step it stopped at")
    start.add_argument("--overwrite", action="store_true", help="delete the run in output_dir and start over")
    group = parser.add_argument_group("launcher (each round's training under accelerate's, as mpo train --launch)")
    group.add_argument("--launch", metavar="CONFIG", help="an accelerate config, e.g. launch/zero2.yaml (default: in this process)")
    group.add_argument("--num-processes", metavar="N", type=int, help="processes in all (default: the config's)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = iterate_parser().parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    return exit_on_data_error(lambda: _iterate(args))


def claim_output_dir(out: Path, config_text: str, resume: bool, overwrite: bool):
    """Starts a run in ``out``, or checks that ``--resume`` continues the same run there; returns
    the held lock of ``out`` (:class:`mpo.train.run_dir.RunDirLock`, the trainer's), so that a
    second ``mpo iterate`` on a live run neither stops its server nor deletes it.

    Raises:
        DataError: another run holds ``out``; ``out`` holds files ``mpo iterate`` did not write,
            holds a run and neither flag says what to do with it, or holds a run of another config
            (the keys that differ named).
    """
    from mpo.train.run_dir import LOCK_FILE, RunDirLock

    saved = out / SAVED_CONFIG
    if out.exists() and any(p.name != LOCK_FILE for p in out.iterdir()) and not saved.exists():
        raise DataError(f"{out} holds files that mpo iterate did not write; choose another output_dir", field="output_dir")
    lock = RunDirLock.acquire(out)
    try:
        if saved.exists():
            if overwrite:
                for path in out.iterdir():
                    if path.name != LOCK_FILE:
                        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
            elif not resume:
                raise DataError(f"{out} holds an mpo iterate run: pass --resume to continue it, or --overwrite to start over",
                                field="output_dir")
            else:
                changed = _differences(yaml.safe_load(saved.read_text()), yaml.safe_load(config_text))
                if changed:
                    raise DataError(f"--resume needs the stopped run's config; these keys differ from {saved}: "
                                    f"{', '.join(changed)}", field="output_dir")
        write_text_atomic(saved, config_text)
    except BaseException:
        lock.release()
        raise
    return lock


def _differences(before: dict, now: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ (``iterate.rounds`` may: a resumed run may add rounds)."""
    keys = []
    for key in sorted(before.keys() | now.keys()):
        dotted, old, new = prefix + key, before.get(key), now.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            keys += _differences(old, new, dotted + ".")
        elif old != new and dotted != "iterate.rounds":
            keys.append(dotted)
    return keys


def _train_function(args: argparse.Namespace):
    """How a round trains: in this process, or under accelerate's launcher from a recipe file."""
    if not args.launch:
        def train(recipe) -> None:
            from mpo.train.trainer import run

            run(recipe)

        return train
    from mpo.cli.launcher import LaunchOptions, launch_training

    options = LaunchOptions(args.launch, args.num_processes, None, None, None, None)

    def launched(recipe) -> None:
        path = Path(recipe.output_dir).parent / "recipe.yaml"
        write_text_atomic(path, recipe.to_yaml())
        code = launch_training(options, [str(path)])
        if code:
            raise TrainingFailed(code)

    return launched


class TrainingFailed(RuntimeError):
    """A launched training exited non-zero (the launcher printed its one-line error)."""

    def __init__(self, code: int):
        super().__init__(f"the round's training exited with code {code}")
        self.code = code


def _stop_on_sigterm(signum, frame) -> None:
    # Unwinds like Ctrl-C, so that the server this run started is stopped on the way out.
    raise KeyboardInterrupt


def _iterate(args: argparse.Namespace) -> int:
    from mpo.iterate.config import load_iterate

    setup = load_iterate(args.config, args.overrides, args.rounds)
    lock = claim_output_dir(setup.output_dir, setup.to_yaml(), args.resume, args.overwrite)
    try:
        return _run(setup, args)
    finally:
        lock.release()


def _run(setup, args: argparse.Namespace) -> int:
    train = _train_function(args)
    from data_pipeline.backends import BackendError
    from mpo.iterate.loop import run_rounds
    from mpo.iterate.server import ServerError
    from mpo.iterate.steps import IterateError

    previous = signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        reports = run_rounds(setup, train)
    except TrainingFailed as failed:
        return failed.code
    except ServerError as error:
        print(error.log_tail, file=sys.stderr)
        print(f"error: {error}", file=sys.stderr, flush=True)
        return EXIT_FAILED
    except (IterateError, BackendError) as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return EXIT_FAILED
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(f"{len(reports) - 1} round(s) done: {setup.output_dir / 'rounds.md'}, {setup.output_dir / 'rounds.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
