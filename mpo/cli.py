"""``mpo``: one console command, a subcommand per job.

    mpo train RECIPE.yaml [key.sub=value ...]   train (wrap in ``accelerate launch`` for many processes)
    mpo tiny-model OUT_DIR [--size tiny]        write a random tiny InternVL checkpoint
    mpo shapes-task OUT_DIR                     write the synthetic shapes reasoning task
    mpo demo [--out DIR]                        the end-to-end CPU demo: SFT -> data -> MPO -> eval
    mpo bench [...]                             speed and memory of the forward layouts
    mpo precompute-ref RECIPE.yaml              reference log-probs computed once, stored by the data
    mpo memory RECIPE.yaml --world-size N       per-GPU memory estimate under each ZeRO stage
"""

from __future__ import annotations

import importlib
import sys
from typing import Callable

from mpo.errors import DataError

# subcommand -> module whose main(argv) runs it; imported on use so `mpo --help` stays fast.
COMMANDS = {
    "train": "mpo.train",
    "tiny-model": "mpo.tiny_model",
    "shapes-task": "mpo.demo.shapes",
    "demo": "mpo.demo.run",
    "bench": "mpo.bench",
    "precompute-ref": "mpo.precompute",
    "memory": "mpo.memory",
    "validate": "mpo.validate",
}


def exit_on_data_error(job: Callable[[], int]) -> int:
    """Runs ``job``; bad input ends it with one ``error: file:line: field: message`` line, exit 1."""
    try:
        return job()
    except DataError as error:
        # An error raised in a DataLoader worker arrives wrapped; its last line is ours.
        message = str(error).strip().splitlines()[-1].removeprefix("mpo.errors.DataError: ")
        print(f"error: {message}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(COMMANDS[argv[0]])
    return exit_on_data_error(lambda: module.main(argv[1:]))


if __name__ == "__main__":
    sys.exit(main())
