"""Real servers on loopback ports for the tests: ``mpo-data serve`` in a thread, a server process
(vLLM, ``transformers serve``) started and stopped by PID, and free ports."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from data_pipeline.server import ChatServer

START_TIMEOUT = 900  # seconds; vLLM takes 60-120 s on an idle 2-core machine, several times that under load


def free_port() -> int:
    """A loopback port nobody listens on (at the time of asking)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def serving(server: ChatServer) -> Iterator[str]:
    """Runs ``server`` in a thread of this process; yields its ``http://host:port/v1`` and stops it."""
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    try:
        yield f"http://{host}:{port}/v1"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=30)


@contextmanager
def server_process(command: list[str], health_url: str, log_path: Path) -> Iterator[subprocess.Popen]:
    """Starts a server in its own process group, waits for ``health_url``; stops it by PID at the end.

    The environment is this one without ``PYTHONPATH`` (a server from another virtual environment
    must not import this checkout's packages), offline, vLLM on CPU.
    """
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(VLLM_TARGET_DEVICE="cpu", VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1")
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.time() + START_TIMEOUT
        while True:
            if process.poll() is not None:
                pytest.fail(f"{command[0]} exited with {process.returncode} at start-up:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(health_url, timeout=5):
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.time() > deadline:
                pytest.fail(f"{command[0]} did not answer {health_url} within {START_TIMEOUT} s:\n{log_path.read_text()[-3000:]}")
            time.sleep(1)
        yield process
    finally:
        # The server's engine runs in child processes: the whole group it leads goes.
        for sig, wait in ((signal.SIGTERM, 60), (signal.SIGKILL, 30)):
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                break
            try:
                process.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
