"""``mpo train --launch``: real ``accelerate launch`` runs on CPU end in the one-line error; the
checks that need no model run before any model loads."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
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


@pytest.mark.slow
def test_one_process_launch_closes_the_bar_before_the_error(tiny_model_dir, tiny_mmpr_dir, tmp_path):
    """A corrupt image is found when its pair is first encoded, inside the training loop: the
    progress bar is closed first, so the error is a line of its own, and the last one."""
    data = tmp_path / "data"
    shutil.copytree(tiny_mmpr_dir, data)
    (data / "images" / "shapes_02.png").write_bytes(b"not a png")
    result = _mpo("train", "--launch", "launch/single_gpu.yaml", str(RECIPE),
                  *_overrides(tiny_model_dir, data, tmp_path / "run", "data.shuffle=false"))
    image = data / "images" / "shapes_02.png"
    annotation = data / "annotations" / "shapes_pairs_vqa_correctness_rules.jsonl"
    _assert_ends_in(result, f"error: {annotation}:3: image: cannot decode image {image}: cannot identify image file '{image}'")
    assert "mpo:   0%" in result.stderr  # the bar was on screen when the error came


