"""An inference server on one checkpoint, started as a process of its own and stopped by its ID.

The server leads a new process group (vLLM's engine runs in child processes), so stopping it
signals the whole group: SIGTERM, then SIGKILL after a grace period. Its process ID, group, port,
model and command line are written to ``server.json`` in the iteration's folder while it runs, so a
run that was killed (``kill -9``, a lost node) leaves a record: the next ``mpo iterate --resume``
stops that server first, after checking that the recorded process still runs the recorded command
(a recycled process ID is left alone).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from mpo.jsonl import write_json_atomic

STOP_GRACE = 60.0  # seconds between SIGTERM and SIGKILL


class ServerError(RuntimeError):
    """A server that exited or did not answer in time; ``log_tail`` is the end of its log."""

    def __init__(self, message: str, log_tail: str):
        super().__init__(message)
        self.log_tail = log_tail


@dataclass(frozen=True)
class ServerRecord:
    """What ``server.json`` holds about a running server."""

    pid: int
    port: int
    model: str
    command: list[str]
    log: str


def free_port() -> int:
    """A loopback port nobody listens on (at the time of asking)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def fill_command(template: list[str], model: str, port: int) -> list[str]:
    """``template`` with ``{model}`` and ``{port}`` replaced in every argument."""
    return [part.replace("{model}", model).replace("{port}", str(port)) for part in template]


def _log_tail(path: Path, characters: int = 3000) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return text[-characters:]


class ServedModel:
    """A server process on ``model``; :meth:`start` returns once ``GET /v1/models`` answers.

    Args:
        command: the full command line (``{model}``/``{port}`` already filled in).
        model: the checkpoint it serves (its absolute path, also its served name).
        port: the loopback port it listens on.
        log_path: the server's stdout and stderr.
        record_path: ``server.json``, written while it runs.
        timeout: seconds it may take to answer.
        own_environment: the server runs in an environment of its own (vLLM's venv), which this
            run's ``PYTHONPATH`` would shadow: it is not passed on.
    """

    def __init__(self, command: list[str], model: str, port: int, log_path: Path, record_path: Path, timeout: float,
                 own_environment: bool):
        self.command, self.model, self.port = command, model, port
        self.log_path, self.record_path, self.timeout = log_path, record_path, timeout
        self.own_environment = own_environment
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ServedModel:
        env = {k: v for k, v in os.environ.items() if not (self.own_environment and k == "PYTHONPATH")}
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True)
        write_json_atomic(self.record_path, asdict(ServerRecord(self.process.pid, self.port, self.model, self.command,
                                                                str(self.log_path))))
        try:
            self._wait_until_ready()
        except BaseException:  # Ctrl-C or SIGTERM while it starts: it must not outlive this run
            self.stop()
            raise
        return self

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + self.timeout
        while True:
            if self.process.poll() is not None:
                code = self.process.returncode
                raise ServerError(f"the server on {self.model} exited with {code} at start-up; see its log {self.log_path}",
                                  _log_tail(self.log_path))
            try:
                with urllib.request.urlopen(self.url + "/v1/models", timeout=5):
                    return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            if time.monotonic() > deadline:
                raise ServerError(f"the server on {self.model} did not answer {self.url}/v1/models within {self.timeout:.0f} s "
                                  f"(iterate.server_timeout); see its log {self.log_path}", _log_tail(self.log_path))
            time.sleep(1)

    def stop(self) -> None:
        """Stops the server's process group (SIGTERM, then SIGKILL) and removes ``server.json``."""
        if self.process is not None:
            stop_group(self.process.pid, lambda timeout: _wait(self.process, timeout))
            self.process = None
        self.record_path.unlink(missing_ok=True)


def _wait(process: subprocess.Popen, timeout: float) -> bool:
    try:
        process.wait(timeout=timeout)
        return True
    except subprocess.TimeoutExpired:
        return False


def stop_group(pid: int, wait) -> None:
    """SIGTERM to the process group ``pid`` leads, then SIGKILL if ``wait(seconds)`` says it lives on."""
    for sig, grace in ((signal.SIGTERM, STOP_GRACE), (signal.SIGKILL, 30.0)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        if wait(grace):
            return


def _cmdline(pid: int) -> list[str] | None:
    """The command line of a running process (Linux ``/proc``), or None when there is none."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    # A zombie (exited, not yet reaped) has an empty command line: it runs nothing any more.
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part] or None


def _gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _cmdline(pid) is None:
            return True
        time.sleep(0.5)
    return _cmdline(pid) is None


def stop_recorded(record_path: Path) -> str | None:
    """Stops the server a killed run left running (``server.json``); returns what was done.

    The recorded process is signalled only while it still runs the recorded command, so a process
    ID the system has given to another program since is left alone.
    """
    if not record_path.exists():
        return None
    record = ServerRecord(**json.loads(record_path.read_text()))
    running = _cmdline(record.pid)
    if running is None:
        note = f"the server of an earlier run (pid {record.pid}) is no longer running"
    elif running != record.command:
        note = f"pid {record.pid} of server.json now runs another program; left alone"
    else:
        stop_group(record.pid, lambda timeout: _gone(record.pid, timeout))
        note = f"stopped the server an earlier run left on {record.model} (pid {record.pid})"
    record_path.unlink()
    print(note, file=sys.stderr, flush=True)
    return note
