"""``mpo train --launch``: real ``accelerate launch`` runs on CPU end in the one-line error; the
checks that need no model run before any model loads."""

from __future__ import annotations

import fcntl
import os
import pty
import shutil
import socket
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "recipes" / "tiny_cpu.yaml"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _mpo(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, "-m", "mpo", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def _overrides(model_dir: Path, data_dir: Path, out: Path, *extra: str) -> list[str]:
    return [f"model.name_or_path={model_dir}", f"data.meta_path={data_dir / 'meta.json'}", f"output_dir={out}",
            "train.max_steps=2", "train.save_every=0", *extra]


def _assert_ends_in(result: subprocess.CompletedProcess, line: str) -> None:
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.rstrip("\n").splitlines()[-1] == line, result.stderr[-3000:]
    assert result.stderr.count("error:") == 1  # the processes hand it over; only the launcher prints it
    assert "Traceback" not in result.stderr and "ChildFailedError" not in result.stderr


@pytest.mark.slow
def test_two_process_launch_ends_in_the_first_failed_process_error(tiny_model_dir, escaping_annotation, tmp_path):
    """Both processes of a DDP launch stop at a line whose image path leaves the image root; the
    last stderr line is that one error, the exit code the processes' 2 (no launcher traceback)."""
    data = escaping_annotation.parents[1]
    result = _mpo("train", "--launch", "launch/ddp.yaml", "--num-processes", "2", "--main-process-port", str(_free_port()),
                  str(RECIPE), *_overrides(tiny_model_dir, data, tmp_path / "run"))
    _assert_ends_in(result, f"error: {escaping_annotation}:3: image: path '../../../etc/passwd' is outside the image root "
                            f"{data / 'images'}: '..' is not allowed")


def _mpo_on_a_terminal(*args: str) -> tuple[int, str]:
    """``python -m mpo ARGS`` with its stderr on a pseudo-terminal (where the bar is drawn): the
    exit code and what the terminal showed."""
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a new pty is 0 columns wide
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false")
    process = subprocess.Popen([sys.executable, "-m", "mpo", *args], cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=terminal)
    os.close(terminal)
    shown = b""
    while True:
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # the terminal closed with the process
            break
        if not chunk:
            break
        shown += chunk
    os.close(controller)
    return process.wait(timeout=600), shown.decode(errors="replace").replace("\r\n", "\n")


@pytest.mark.slow
def test_one_process_launch_closes_the_bar_before_the_error(tiny_model_dir, tiny_mmpr_dir, tmp_path):
    """A corrupt image is found when its pair is first encoded, inside the training loop: on a
    terminal the progress bar is closed first, so the error is a line of its own, and the last one."""
    data = tmp_path / "data"
    shutil.copytree(tiny_mmpr_dir, data)
    (data / "images" / "shapes_02.png").write_bytes(b"not a png")
    code, shown = _mpo_on_a_terminal("train", "--launch", "launch/single_gpu.yaml", str(RECIPE),
                                     *_overrides(tiny_model_dir, data, tmp_path / "run", "data.shuffle=false"))
    image = data / "images" / "shapes_02.png"
    annotation = data / "annotations" / "shapes_pairs_vqa_correctness_rules.jsonl"
    assert code == 2, shown[-3000:]
    assert shown.rstrip("\n").splitlines()[-1] == (
        f"error: {annotation}:3: image: cannot decode image {image}: cannot identify image file '{image}'"), shown[-3000:]
    assert "mpo:   0%" in shown  # the bar was on screen when the error came


@pytest.mark.slow
def test_launch_ends_in_the_cause_not_see_above(tiny_model_dir, tiny_mmpr_dir, tmp_path):
    """Under --launch, W&B without a key ends in its one line before anything loads (old: a 100-line
    traceback, then "its output above says why"); a crash no check foresees (weights that are not
    safetensors) keeps its traceback above and ends in its exception as the last line."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("WANDB_")}
    result = subprocess.run([sys.executable, "-m", "mpo", "train", "--launch", "launch/single_gpu.yaml", str(RECIPE),
                             *_overrides(tiny_model_dir, tiny_mmpr_dir, tmp_path / "run", "report_to=wandb")],
                            cwd=REPO, env=dict(env, HOME=str(tmp_path), HF_HUB_OFFLINE="1"), capture_output=True, text=True,
                            timeout=600)
    _assert_ends_in(result, "error: report_to: wandb has no API key: run `wandb login` (or set WANDB_API_KEY), or log offline "
                            "with WANDB_MODE=offline and upload later with `wandb sync`")
    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    result = _mpo("train", "--launch", "launch/single_gpu.yaml", str(RECIPE), *_overrides(broken, tiny_mmpr_dir, tmp_path / "run2"))
    assert result.returncode == 1, result.stderr[-3000:]
    last = result.stderr.rstrip("\n").splitlines()[-1]
    assert last.startswith("error: process 0 failed: ") and "Error" in last and "see above" not in last, last
    assert "Traceback" in result.stderr
