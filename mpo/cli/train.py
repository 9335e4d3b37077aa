"""``mpo train``: one recipe trained, in this process or under accelerate's launcher.

    mpo train RECIPE.yaml [key.sub=value ...] [--launch launch/zero2.yaml]
    accelerate launch [--config_file launch/zero2.yaml] -m mpo.train RECIPE.yaml [key.sub=value ...]

The recipe is read and checked before torch, transformers or peft are imported, so a mistyped key
is reported at once; only then does the trainer (:mod:`mpo.train.trainer`) load.
"""

from __future__ import annotations

import argparse
import sys

from mpo.config_keys import format_recipe_keys
from mpo.config import load_recipe
from mpo.cli.main import exit_on_data_error
from mpo.hf_names import flag_hint

LAUNCH_FLAGS = ("--launch", "--num-processes", "--num-machines", "--machine-rank", "--main-process-ip", "--main-process-port")


def train_parser() -> argparse.ArgumentParser:
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


def main(argv: list[str] | None = None) -> int:
    """``mpo train`` (also ``python -m mpo.train``, which ``accelerate launch`` runs)."""
    argv = sys.argv[1:] if argv is None else argv
    parser = train_parser()
    args, unknown = parser.parse_known_intermixed_args(argv)
    flags = [token for token in unknown if token.startswith("-")]
    if flags:
        # HF habits (`--learning_rate 5e-6`, `--num_processes 2`): answered with the spelling here.
        after = argv[argv.index(flags[0]) + 1 :][:1]
        value = after[0] if after and not after[0].startswith("-") and "=" not in after[0] else None
        parser.error(flag_hint(flags[0], [*LAUNCH_FLAGS, "--help"], value))
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return exit_on_data_error(lambda: _train(args))


def _train(args: argparse.Namespace) -> int:
    # Read here, in the launching process too, so a bad recipe fails before any launch.
    recipe = load_recipe(args.recipe, args.overrides)
    if args.launch:
        from mpo.cli.launcher import LaunchOptions, launch_training

        options = LaunchOptions(args.launch, args.num_processes, args.num_machines, args.machine_rank,
                                args.main_process_ip, args.main_process_port)
        return launch_training(options, [args.recipe, *args.overrides])
    from mpo.train.trainer import run

    return run(recipe)


if __name__ == "__main__":
    sys.exit(main())
