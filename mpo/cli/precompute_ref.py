"""``mpo precompute-ref``: the reference log-probs of every pair, computed once before training.

    mpo precompute-ref RECIPE.yaml [--out PATH] [key.sub=value ...]
    accelerate launch --config_file launch/zero3.yaml -m mpo.cli.precompute_ref RECIPE.yaml   # distributed

Train with ``reference.precomputed_path`` set to the file it writes (see :mod:`mpo.model.precomputed`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mpo.config import load_recipe


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mpo precompute-ref", description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe", help="the training recipe (YAML)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, as for training")
    parser.add_argument("--out", type=Path, default=None, help="output file (default: next to the data)")
    args = parser.parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    recipe = load_recipe(args.recipe, args.overrides)  # a bad recipe is refused before torch loads
    from mpo.train.precompute import compute

    compute(recipe, args.out)
    return 0


if __name__ == "__main__":
    from mpo.cli.main import exit_on_data_error

    sys.exit(exit_on_data_error(main))
