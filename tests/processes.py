"""Real ``mpo train`` processes for the tests of runs and processes: started, watched until they
train, signalled, and read back (their last line, their checkpoints)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "tiny_cpu.yaml"


def train_overrides(model_dir: Path, data_dir: Path, out: Path, *extra: str) -> list[str]:
    """The tiny recipe on the test model and data, 200 constant-rate steps (a run to interrupt)."""
    return [f"model.name_or_path={model_dir}", f"data.meta_path={data_dir / 'meta.json'}", f"output_dir={out}",
            "train.max_steps=200", "train.save_every=0", "train.warmup_ratio=0", "train.lr_scheduler=constant", *extra]


def run_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """``python -m mpo ARGS`` from the repository root, stdout and stderr into ``log`` (a file:
    a pipe nobody reads would block the process once full)."""
    with open(log, "w") as handle:
        return subprocess.Popen([sys.executable, "-m", "mpo", *args], cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT)


def logged_steps(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


def wait_for_step(out: Path, step: int, process: subprocess.Popen, log: Path, timeout_s: float = 300) -> None:
    """Waits until the run in ``out`` has logged ``step`` (the process must still be running)."""
    deadline = time.monotonic() + timeout_s
    while not any(logged >= step for logged in logged_steps(out)):
        assert process.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.2)


def children_by_rank(pid: int, count: int, timeout_s: float = 120) -> dict[int, int]:
    """The pids of the ``count`` training processes a launcher started, by their ``RANK``."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = {}
        for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
            try:
                environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            ranks = [item.removeprefix(b"RANK=") for item in environ if item.startswith(b"RANK=")]
            if ranks:
                found[int(ranks[0])] = int(child)
        if len(found) == count:
            return found
        assert time.monotonic() < deadline, f"launcher {pid} has training processes {found}"
        time.sleep(0.2)


def gone(pid: int) -> bool:
    """Whether ``pid`` has exited (a zombie not yet reaped by its parent counts as exited)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state in ("Z", "X")


def wait_gone(pids: list[int], timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while not all(gone(pid) for pid in pids):
        assert time.monotonic() < deadline, f"still running: {[pid for pid in pids if not gone(pid)]}"
        time.sleep(0.2)


def last_line(text: str) -> str:
    return text.rstrip("\n").splitlines()[-1]


def checkpoint_steps(out: Path) -> list[int]:
    root = out / "checkpoints"
    return sorted(int(p.name.removeprefix("step-")) for p in root.iterdir() if p.name.startswith("step-") and "." not in p.name) if root.is_dir() else []
