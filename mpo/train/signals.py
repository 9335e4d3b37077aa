"""Stopping cleanly: SIGTERM (preemption) and SIGINT (Ctrl-C) end a run with a checkpoint, and a
trainer whose launcher died stops instead of running on.

SLURM, Kubernetes and most schedulers send SIGTERM some seconds before they kill a job. Here the
first SIGTERM or SIGINT only raises a flag; the step under way finishes, every process agrees on
stopping after the same step (:meth:`StopRequest.agreed`, one all-reduce of the flag after each
step: a signal may reach only some processes, e.g. on one node), the checkpoint of that step is
written, and :class:`TrainingStopped` ends the run with one line: the step, the checkpoint and the
command that resumes it. The exit code is 75 after SIGTERM (``EXIT_PREEMPTED``: "try again
later", which a job script or a pod failure policy turns into a requeue) and 130 after SIGINT.

A second Ctrl-C, more than :data:`SAME_REQUEST_S` after the first, stops at once without saving
(one Ctrl-C reaches a one-process launcher and its trainer both, and the launcher passes it on:
those copies are one request). A repeated SIGTERM changes nothing; the scheduler's SIGKILL follows.

A launcher that dies (SIGKILL, an out-of-memory kill) leaves its training processes running on,
writing checkpoints a restarted job then races with. :func:`stop_with_launcher` asks Linux to send
this process SIGTERM when its launcher dies (``prctl(PR_SET_PDEATHSIG)``, what torchrun's own
workers lack), so such an orphan saves and stops like a preempted run.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from mpo.errors import EXIT_INTERRUPTED, EXIT_PREEMPTED
from mpo.train.report import LAUNCHER_PID_ENV

SAME_REQUEST_S = 2.0
"""Signals this close to the first one are copies of the same request."""

LAUNCH_COMMAND_ENV = "MPO_LAUNCH_COMMAND"
"""Set by ``mpo train --launch`` to its own command line, from which the resume command is made."""

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


@dataclass
class TrainingStopped(Exception):
    """Raised by :meth:`mpo.train.trainer.MPOTrainer.train` when a signal stopped the run.

    Attributes:
        signal_name: ``SIGTERM`` or ``SIGINT``.
        step: the last optimizer step trained.
        total_steps: the steps the run was to train.
        checkpoint: the checkpoint to resume from (``None``: nothing saved yet).
        saved: whether ``checkpoint`` was written at ``step`` (False after a second Ctrl-C).
        main_process: whether this is the process that prints the line.
    """

    signal_name: str
    step: int
    total_steps: int
    checkpoint: Path | None
    saved: bool
    main_process: bool

    @property
    def exit_code(self) -> int:
        return EXIT_PREEMPTED if self.signal_name == "SIGTERM" else EXIT_INTERRUPTED

    def line(self, resume_command: str) -> str:
        """The run's last line: what stopped it, where it stands, and how to go on."""
        cause = "interrupted (Ctrl-C)" if self.signal_name == "SIGINT" else f"stopped by {self.signal_name}"
        if self.saved:
            where = f"checkpoint {self.checkpoint}"
        elif self.checkpoint is not None:
            where = f"not saved; the last checkpoint is {self.checkpoint}"
        else:
            where = "no checkpoint yet"
        return f"{cause} at step {self.step} of {self.total_steps}, {where}; resume with: {resume_command}"


class StopRequest:
    """The flag SIGTERM and SIGINT raise (:meth:`install`), read by the training loop."""

    def __init__(self, announce: bool = True):
        self.signal_name: str | None = None
        self.first_at = 0.0
        self.announce = announce
        self._pid = os.getpid()
        self._previous: dict[int, object] = {}

    def install(self) -> StopRequest:
        """Takes over SIGTERM and SIGINT (main thread only). A signal ignored when the process
        started (``nohup``, a background job of a script) stays ignored."""
        self._pid = os.getpid()
        for number in (signal.SIGTERM, signal.SIGINT):
            if signal.getsignal(number) is not signal.SIG_IGN:
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def restore(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    def _handle(self, number: int, frame) -> None:
        if os.getpid() != self._pid:
            return  # a forked DataLoader worker, which inherited the handler: the trainer decides
        now = time.monotonic()
        if self.signal_name is None:
            self.signal_name, self.first_at = signal.Signals(number).name, now
            if self.announce:
                # os.write: a handler may run in the middle of a print, which print cannot re-enter.
                again = " (Ctrl-C again to stop at once, unsaved)" if number == signal.SIGINT else ""
                os.write(2, f"\n{self.signal_name}: stopping after this step, once its checkpoint is written{again}\n".encode())
        elif number == signal.SIGINT and now - self.first_at > SAME_REQUEST_S:
            raise KeyboardInterrupt

    def agreed(self, accelerator) -> str | None:
        """The signal every process stops for (``None``: go on); a collective when several run.

        SIGTERM wins over SIGINT when processes got different ones: the run was preempted.
        """
        flags = [self.signal_name == "SIGTERM", self.signal_name == "SIGINT"]
        if accelerator.num_processes > 1:
            import torch

            total = accelerator.reduce(torch.tensor(flags, dtype=torch.float32, device=accelerator.device), reduction="sum")
            flags = [bool(value) for value in total.tolist()]
        if flags[0]:
            return "SIGTERM"
        return "SIGINT" if flags[1] else None


def _launcher_pid() -> int | None:
    """The pid of the launcher that started this process, or ``None`` without one.

    ``mpo train --launch`` names itself; torchrun (``accelerate launch`` of several processes) is the
    parent of its workers; ``accelerate launch`` of one process is a parent whose command is it.
    A process started from a shell has none: it must outlive a closed terminal under ``nohup``.
    """
    if LAUNCHER_PID_ENV in os.environ:
        return int(os.environ[LAUNCHER_PID_ENV])
    if "TORCHELASTIC_RUN_ID" in os.environ:
        return os.getppid()
    try:
        parent = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    names = [Path(part.decode(errors="replace")).name for part in parent[:3]]
    if "launch" in [part.decode(errors="replace") for part in parent] and ("accelerate" in names or "accelerate-launch" in names):
        return os.getppid()
    return None


def stop_with_launcher() -> None:
    """Under a launcher, have Linux send this process SIGTERM when the launcher dies, and send it
    now if the launcher died before this ran. Elsewhere (another OS, no launcher) nothing."""
    launcher = _launcher_pid()
    if launcher is None or not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        return  # not allowed here (a sandbox): the launcher's own signals still arrive
    if os.getppid() != launcher:
        os.kill(os.getpid(), signal.SIGTERM)
