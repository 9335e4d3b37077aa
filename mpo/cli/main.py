"""``mpo``: one console command, a subcommand per job; ``mpo COMMAND --help`` describes each.

Its exit codes, the same for mpo and mpo-data, are :mod:`mpo.errors`'s (``mpo --help`` lists them).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Callable

from mpo import __version__, errors
from mpo.errors import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_INTERRUPTED, DataError, RunStopped
from mpo.train.report import report_line

# subcommand -> (module whose main(argv) runs it, one line for `mpo --help`); modules are
# imported on use so that `mpo --help` stays fast.
COMMANDS = {
    "train": ("mpo.cli.train", "train with MPO: mpo train RECIPE.yaml [key.sub=value ...] [--launch CONFIG]"),
    "iterate": ("mpo.cli.iterate", "iterative MPO: sample the policy, pair, train, evaluate, round after round"),
    "precompute-ref": ("mpo.cli.precompute_ref", "compute the reference log-probs once and store them next to the data"),
    "memory": ("mpo.tools.memory.planner", "per-GPU memory of a recipe under DDP and ZeRO-1/2/3 (+offload)"),
    "bench": ("mpo.tools.bench.race", "training speed and memory of the layouts, optionally against TRL (--against trl)"),
    "grad-accum": ("mpo.tools.grad_accum", "the error of bf16 gradient accumulation against fp32, and fp32's memory cost"),
    "gpu-check": ("mpo.tools.gpu_check", "on a GPU: FlexAttention vs SDPA, bf16 vs fp32 loss terms, mpo bench with MFU"),
    "tiny-model": ("mpo.cli.tiny_model", "write a random tiny InternVL checkpoint (tests, laptops)"),
    "shapes-task": ("mpo.demo.shapes", "write the synthetic shapes reasoning task of the demo"),
    "demo": ("mpo.demo.run", "the end-to-end CPU demo: SFT -> preference data -> MPO -> evaluation"),
    "validate": ("mpo.cli.validate", "check every record, image and video a recipe will use, before training"),
}
SELF_REPORTING = {"train"}
"""Commands that turn their own errors into one line (``mpo train`` also under a launcher)."""


def exit_on_data_error(job: Callable[[], int]) -> int:
    """Runs ``job``; bad input ends it with one ``error: file:line: field: message`` line, exit 2;
    a run stopped by a guard (:class:`mpo.errors.RunStopped`) with one ``error:`` line, exit 1."""
    try:
        return job()
    except DataError as error:
        # An error raised in a DataLoader worker arrives wrapped; its last line is ours.
        message = str(error).strip().splitlines()[-1].removeprefix("mpo.errors.DataError: ")
        report_line(f"error: {message}")  # under mpo train --launch: handed to the launcher
        return EXIT_BAD_INPUT
    except RunStopped as error:
        report_line(f"error: {error}")
        return EXIT_FAILED


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mpo",
        description="Mixed Preference Optimization for InternVL: training, its tools and the CPU demo.",
        epilog=errors.__doc__.split("\n\n", 1)[1] + "\nPreference data is built by `mpo-data` (mpo-data --help).",
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
        module = importlib.import_module(COMMANDS[args.command][0])
        if args.command in SELF_REPORTING:
            return module.main(rest)
        return exit_on_data_error(lambda: module.main(rest))
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
