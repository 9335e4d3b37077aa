"""``mpo train --launch CONFIG RECIPE [key=value ...]``: accelerate's launcher, ending in one line.

``accelerate launch`` ends a failed run with its own traceback after the trainer's one-line error
(``CalledProcessError`` from its one-process launcher; ``ChildFailedError`` and a box of
failures from torchrun for several processes), so the user's last screen is a traceback. This
runs the same launcher (accelerate's ``launch_command``, same config, same flags) in this process
and tells every training process, through ``MPO_ERROR_DIR``, to write its one-line error to a file
instead of the console. When a process fails, the launcher prints the error of the first process
that failed (torchrun's root cause) as its last line and exits with that process's code.

Signals: SIGTERM and SIGINT sent to the launcher are passed on to every training process, and the
launcher waits for them to write their checkpoint and stop (:mod:`mpo.train.signals`): their
one-line stop is its last line and their code (75 after SIGTERM) its code. torchrun would instead
pass the signal on, wait 30 s, kill them, and end in a ``SignalException`` traceback; so it is told
(``--signals-to-handle``, through its ``PET_SIGNALS_TO_HANDLE`` variable) to leave those two to this launcher. The training processes
also stop by themselves if the launcher dies (``MPO_LAUNCHER_PID``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shlex
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from mpo.errors import ERROR_DIR_ENV, EXIT_BAD_INPUT, EXIT_FAILED, EXIT_INTERRUPTED
from mpo.train.report import LAUNCHER_PID_ENV
from mpo.train.signals import LAUNCH_COMMAND_ENV


@dataclass(frozen=True)
class LaunchOptions:
    """What ``mpo train`` passes on to ``accelerate launch`` (None: the config's value)."""

    config_file: str
    num_processes: int | None = None
    num_machines: int | None = None
    machine_rank: int | None = None
    main_process_ip: str | None = None
    main_process_port: int | None = None

    def accelerate_args(self) -> list[str]:
        """``accelerate launch``'s flags: the fields' names, the unset ones left out."""
        return [item for flag, value in dataclasses.asdict(self).items() if value is not None
                for item in (f"--{flag}", str(value))]

    def mpo_args(self) -> list[str]:
        """The same flags as ``mpo train`` spells them (``--num-processes``), the config aside."""
        return [item for flag, value in dataclasses.asdict(self).items() if value is not None and flag != "config_file"
                for item in (f"--{flag.replace('_', '-')}", str(value))]


@contextlib.contextmanager
def _passing_signals_on():
    """While the block runs, SIGTERM and SIGINT sent to this process go to its children (the
    training processes, which this launcher starts itself) and the launcher keeps waiting for them.
    A signal ignored when the launcher started (``nohup``, a script's background job) stays so."""
    import psutil

    def pass_on(number: int, frame) -> None:
        for child in psutil.Process().children():
            try:
                child.send_signal(number)
            except psutil.NoSuchProcess:
                pass

    previous = {number: signal.signal(number, pass_on) for number in (signal.SIGTERM, signal.SIGINT)
                if signal.getsignal(number) is not signal.SIG_IGN}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def launch_training(options: LaunchOptions, train_args: list[str]) -> int:
    """Runs ``accelerate launch <options> -m mpo.train <train_args>``; returns the exit code."""
    if not Path(options.config_file).is_file():
        print(f"error: {options.config_file}: launch config not found (see launch/)", file=sys.stderr)
        return EXIT_BAD_INPUT
    import torch

    if not torch.cuda.is_available():
        # Before accelerate imports DeepSpeed here: its accelerator detection then logs nothing.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from accelerate.commands.launch import launch_command, launch_command_parser
    from accelerate.utils import patch_environment
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = launch_command_parser().parse_args([*options.accelerate_args(), "-m", "mpo.train", *train_args])
    _quiet_torchrun()
    command = shlex.join(["mpo", "train", "--launch", options.config_file, *options.mpo_args(), *train_args])
    with tempfile.TemporaryDirectory(prefix="mpo-launch-") as error_dir, _passing_signals_on():
        environment = {ERROR_DIR_ENV: error_dir, LAUNCHER_PID_ENV: str(os.getpid()), LAUNCH_COMMAND_ENV: command,
                       "PET_SIGNALS_TO_HANDLE": "SIGHUP,SIGQUIT"}
        try:
            with patch_environment(**environment):
                launch_command(args)
        except ChildFailedError as failed:
            first_rank, _ = failed.get_first_failure()
            codes = {rank: failure.exitcode for rank, failure in failed.failures.items()}
            return _report(Path(error_dir), codes, first_rank)
        except subprocess.CalledProcessError as failed:
            # One process (or DeepSpeed's multi-node runner): no rank is known.
            return _report(Path(error_dir), {None: failed.returncode}, None)
        except ValueError as error:
            # accelerate refusing the config or the flags.
            print(f"error: {options.config_file}: {error}", file=sys.stderr)
            return EXIT_BAD_INPUT
        except KeyboardInterrupt:
            print("error: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
    return 0


def _quiet_torchrun() -> None:
    """torchrun logs each failed or stopped process ("failed (exitcode: 2) local_rank: 1 ...",
    "Sending process N closing signal SIGTERM") and an OMP_NUM_THREADS notice; the launcher's last
    line says what failed instead. Its loggers set their own level on import, hence per logger."""
    import torch.distributed.launcher.api  # noqa: F401 - creates the loggers set below
    import torch.distributed.run  # noqa: F401

    for name in list(logging.root.manager.loggerDict):
        if name.startswith(("torch.distributed.elastic", "torch.distributed.launcher", "torch.distributed.run")):
            logging.getLogger(name).setLevel(logging.CRITICAL)


def _report(error_dir: Path, codes: dict[int | None, int], first_rank: int | None) -> int:
    """Prints the first failed process's one-line error (or how it ended) last; returns its code."""
    written = {int(p.stem.removeprefix("rank")): p.read_text().strip() for p in error_dir.glob("rank*.txt")}
    # The root cause's own line if it wrote one, else the line of the lowest rank that did.
    rank = first_rank if first_rank in written else min(written, default=first_rank)
    code = codes.get(rank, codes.get(first_rank, EXIT_FAILED))
    if rank in written:
        print(written[rank], file=sys.stderr)
        # A process that wrote its error and was then stopped by torchrun: the root cause's code.
        return code if code > 0 else max(codes.get(first_rank, EXIT_FAILED), EXIT_FAILED)
    who = "the training process" if rank is None else f"training process {rank}"
    if code < 0:
        # Killed by a signal: the shell's convention, 128 + signal number.
        print(f"error: {who} was killed by {signal.Signals(-code).name}", file=sys.stderr)
        return 128 - code
    print(f"error: {who} exited with code {code}; its output above says why", file=sys.stderr)
    return code
