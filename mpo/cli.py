"""``mpo``: one console command, a subcommand per job; ``mpo COMMAND --help`` describes each.

Exit codes, the same for mpo and mpo-data:

    0    done
    1    the job failed while running: a crash (its traceback is printed), a launched process
         that died, a model or server that failed, a run that produced nothing
    2    usage or bad input: an unknown command, flag or recipe key, a bad value, a bad data
         line; the last line says what to change
    130  interrupted (Ctrl-C)
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path
from typing import Callable

from mpo import __version__
from mpo.errors import DataError

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130
# Set by the launcher (mpo.launcher): each training process writes its one-line error to
# <dir>/rank<N>.txt instead of the console, and the launcher prints it as its last line.
ERROR_DIR_ENV = "MPO_ERROR_DIR"

# subcommand -> (module whose main(argv) runs it, one line for `mpo --help`); modules are
# imported on use so that `mpo --help` stays fast.
COMMANDS = {
    "train": ("mpo.train", "train with MPO: mpo train RECIPE.yaml [key.sub=value ...] [--launch CONFIG]"),
    "precompute-ref": ("mpo.precompute", "compute the reference log-probs once and store them next to the data"),
    "memory": ("mpo.memory", "per-GPU memory of a recipe under DDP and ZeRO-1/2/3 (+offload)"),
    "bench": ("mpo.bench", "speed and memory of the forward layouts (plain, shared_prefix, packed)"),
    "tiny-model": ("mpo.tiny_model", "write a random tiny InternVL checkpoint (tests, laptops)"),
    "shapes-task": ("mpo.demo.shapes", "write the synthetic shapes reasoning task of the demo"),
    "demo": ("mpo.demo.run", "the end-to-end CPU demo: SFT -> preference data -> MPO -> evaluation"),
    "validate": ("mpo.validate", "check every record, image and video a recipe will use, before training"),
}


def report_error(line: str) -> None:
    """Prints a one-line error, or, under ``mpo train --launch``, hands it to the launcher."""
    directory = os.environ.get(ERROR_DIR_ENV)
    if directory:
        rank = os.environ.get("RANK", "0")
        path = Path(directory) / f"rank{rank}.txt"
        path.with_suffix(".tmp").write_text(line)
        path.with_suffix(".tmp").replace(path)
    else:
        print(line, file=sys.stderr, flush=True)


def exit_on_data_error(job: Callable[[], int]) -> int:
    """Runs ``job``; bad input ends it with one ``error: file:line: field: message`` line, exit 2."""
    try:
        return job()
    except DataError as error:
        # An error raised in a DataLoader worker arrives wrapped; its last line is ours.
        message = str(error).strip().splitlines()[-1].removeprefix("mpo.errors.DataError: ")
        report_error(f"error: {message}")
        return EXIT_BAD_INPUT


def train_parser() -> argparse.ArgumentParser:
    from mpo.config import format_recipe_keys

    parser = argparse.ArgumentParser(
        prog="mpo train",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Train a recipe with MPO. Without --launch it runs in this process (one CPU or GPU, or as a\n"
            "process of `accelerate launch -m mpo.train ...`); with --launch it starts accelerate's launcher\n"
            "on a config of launch/ and ends with the first failed process's one-line error and exit code."
        ),
        epilog="recipe keys (in the YAML, or key.sub=value after it):\n" + format_recipe_keys(),
    )
    parser.add_argument("recipe", metavar="RECIPE", help="a recipe YAML (see recipes/)")
    parser.add_argument("overrides", metavar="KEY=VALUE", nargs="*", help="recipe keys to override, e.g. train.lr=5e-6")
    group = parser.add_argument_group("launcher (accelerate's, run for you)")
    group.add_argument("--launch", metavar="CONFIG", help="an accelerate config, e.g. launch/zero3.yaml (default: no launcher)")
    group.add_argument("--num-processes", metavar="N", type=int, help="processes in all (default: the config's)")
    group.add_argument("--num-machines", metavar="N", type=int, help="machines (default: the config's)")
    group.add_argument("--machine-rank", metavar="R", type=int, help="this machine's rank (default: the config's)")
    group.add_argument("--main-process-ip", metavar="IP", help="address of machine 0 (default: the config's)")
    group.add_argument("--main-process-port", metavar="PORT", type=int, help="port of the rendezvous (default: the config's, else 29500)")
    return parser


def train_command(argv: list[str]) -> int:
    """``mpo train`` (also ``python -m mpo.train``, which ``accelerate launch`` runs)."""
    args = train_parser().parse_intermixed_args(argv)
    if args.launch:
        from mpo.launcher import LaunchOptions, launch_training

        options = LaunchOptions(args.launch, args.num_processes, args.num_machines, args.machine_rank,
                                args.main_process_ip, args.main_process_port)
        return launch_training(options, [args.recipe, *args.overrides])
    from mpo.train import run

    return exit_on_data_error(lambda: run(args.recipe, args.overrides))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mpo",
        description="Mixed Preference Optimization for InternVL: training, its tools and the CPU demo.",
        epilog=__doc__.split("\n\n", 1)[1] + "\nPreference data is built by `mpo-data` (mpo-data --help).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"mpo {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, summary) in COMMANDS.items():
        # Each command parses its own arguments (its --help included), so none are declared here.
        commands.add_parser(name, help=summary, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args, rest = build_parser().parse_known_args(argv)
    try:
        if args.command == "train":
            return train_command(rest)
        module = importlib.import_module(COMMANDS[args.command][0])
        return exit_on_data_error(lambda: module.main(rest))
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
