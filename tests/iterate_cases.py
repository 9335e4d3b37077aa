"""The workspace of the ``mpo iterate`` tests: a taught tiny model, questions, images, a config.

The model is taught three responses (:mod:`taught_model`): a right answer, a wrong one and an
unparsable one, so every round's samples mix them and give correctness, format and (for the
describe question, which has no answer) Dropout-NTP pairs; greedy decoding picks one of them.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import yaml
from PIL import Image

from data_pipeline.prompts import get_template
from mpo.data.prompting import INTERNVL_SYSTEM_MESSAGE
from taught_model import teach

TEMPLATE = get_template("custom", '{question}\nThink, then write "Final answer: ..".', "final_answer")
TARGETS = ["I count the shapes.\nFinal answer: 3", "I count the shapes.\nFinal answer: 4", "I am not sure about it."]
QUESTIONS = [
    {"id": "q1", "image": "a.png", "question": "How many shapes are there?", "answer": "3"},
    {"id": "q2", "image": "b.png", "question": "How many shapes are there?", "answer": "4"},
    {"id": "q3", "image": "a.png", "question": "How many shapes are there?", "answer": "3"},
    {"id": "q4", "image": "b.png", "question": "Describe the image."},
]
EVAL_QUESTIONS = [
    {"id": "e1", "image": "a.png", "question": "How many shapes are there?", "answer": "3"},
    {"id": "e2", "image": "b.png", "question": "How many shapes are there?", "answer": "4"},
    {"id": "e3", "image": "a.png", "question": "How many shapes are there?", "answer": "5"},
]
MAX_TILES = 2
TAUGHT_LOSS = 0.1


def write_workspace(root: Path, model_dir: Path, taught: bool = True) -> Path:
    """Images, ``questions.jsonl``, ``eval.jsonl`` and ``model/`` (a copy of ``model_dir``, taught
    the TARGETS unless ``taught`` is false) under ``root``."""
    (root / "images").mkdir(parents=True)
    for name in ("a.png", "b.png"):
        Image.new("RGB", (64, 64), (200, 40, 40)).save(root / "images" / name)
    for name, lines in (("questions.jsonl", QUESTIONS), ("eval.jsonl", EVAL_QUESTIONS)):
        (root / name).write_text("".join(json.dumps(line) + "\n" for line in lines))
    shutil.copytree(model_dir, root / "model")
    if not taught:
        return root
    prompts = [("How many shapes are there?", 1), ("Describe the image.", 1)]
    teach(root / "model", root / "images" / "a.png", TEMPLATE, prompts, TARGETS, INTERNVL_SYSTEM_MESSAGE, MAX_TILES, TAUGHT_LOSS)
    return root


def write_config(root: Path, out: Path, sampler: str, **iterate) -> Path:
    """An ``mpo iterate`` config over the workspace: 2 rounds, 4 samples a question, 3 training
    steps of 2 pairs a round (a checkpoint after each), writing to ``out``."""
    section = {
        "rounds": 2, "questions": str(root / "questions.jsonl"), "image_root": str(root / "images"),
        "eval_questions": str(root / "eval.jsonl"), "eval_image_root": str(root / "images"), "sampler": sampler,
        "num_samples": 4, "temperature": 1.0, "max_new_tokens": 16, "max_tiles": MAX_TILES, "batch_size": 2,
        "prompt": "custom", "template": TEMPLATE.text, "answer_format": "final_answer", "match_modes": "numeric", **iterate,
    }
    config = {
        "iterate": section,
        "model": {"name_or_path": str(root / "model"), "dtype": "float32"},
        "data": {"max_length": 512},
        "train": {"lr": 1e-3, "warmup_ratio": 0.0, "lr_scheduler": "constant", "micro_batch_size": 2, "max_steps": 3,
                  "mixed_precision": "no", "save_every": 1, "keep_last": 3},
        "output_dir": str(out),
        "seed": 3,
    }
    path = root / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def alive(pid: int) -> bool:
    """Whether ``pid`` is a running process (a zombie has no command line)."""
    try:
        return bool(Path(f"/proc/{pid}/cmdline").read_bytes())
    except OSError:
        return False


def kill_after_round_one(process: subprocess.Popen, out: Path, log: Path, timeout: float, poll_s: float = 0.2) -> None:
    """SIGKILLs an ``mpo iterate`` run between its rounds: once round 1's evaluation is recorded,
    before round 2 has finished."""
    try:
        report = out / "round-1" / "report.json"
        deadline = time.monotonic() + timeout
        while not (report.exists() and "evaluate" in json.loads(report.read_text())["steps"]):
            assert process.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, f"round 1 did not finish in {timeout:.0f} s:\n" + log.read_text()[-3000:]
            time.sleep(poll_s)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
