"""The one line a failed or stopped process ends with, printed or handed to ``mpo train --launch``.

Under ``mpo train --launch`` every training process is told, through ``MPO_ERROR_DIR``, to write
its last line to ``<dir>/rank<N>.txt`` instead of the console; the launcher prints the line of the
process that failed (or stopped) first as its own last line. Elsewhere the line goes to stderr.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from mpo.errors import ERROR_DIR_ENV
from mpo.jsonl import write_text_atomic

LAUNCHER_PID_ENV = "MPO_LAUNCHER_PID"
"""Set by ``mpo train --launch`` to its own pid: the parent of its training processes."""


def process_rank() -> int:
    """This process's global rank as the launcher set it (0 without a launcher)."""
    return int(os.environ.get("RANK", "0"))


def report_line(line: str) -> None:
    """Prints ``line`` on stderr, or under ``mpo train --launch`` hands it to the launcher.

    A launcher that is gone (killed) cannot print it: then the line goes to stderr, which the
    process inherited from the launcher.
    """
    if handed_to_launcher():
        write_text_atomic(Path(os.environ[ERROR_DIR_ENV]) / f"rank{process_rank()}.txt", line)
    else:
        print(line, file=sys.stderr, flush=True)


def handed_to_launcher() -> bool:
    """Whether :func:`report_line` hands lines to a live ``mpo train --launch``."""
    directory = os.environ.get(ERROR_DIR_ENV)
    launcher = os.environ.get(LAUNCHER_PID_ENV)
    return bool(directory) and Path(directory).is_dir() and (launcher is None or int(launcher) == os.getppid())
