"""What a run prints into a log that is not a terminal: a metric line every ``train.log_every``
steps (and at the last), no progress bar redrawn with carriage returns."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from processes import RECIPE, REPO, run_env, train_overrides

from mpo.train.console import metric_line


def test_metric_line():
    metrics = {"loss": 0.83178, "loss/dpo": 0.693147, "loss/bco": 1.386294, "loss/sft": 0.0, "rewards/accuracies": 0.5,
               "rewards/margins": -0.00012, "grad_norm": 1.2345, "lr": 5e-6, "tokens_per_s": 812.4, "epoch": 0.1}
    assert metric_line(2, 10, metrics, elapsed_s=3.4, steps_done=2) == (
        "step 2/10  loss 0.8318  dpo 0.6931  bco 1.3863  sft 0.0000  acc 0.50  margin -0.0001  grad_norm 1.23  lr 5.00e-06  "
        "tok/s 812  elapsed 0:00:03  eta 0:00:14")
    assert metric_line(1, 1, {"loss": 2.0, "loss/sft": 2.0}, 0.5, 1) == "step 1/1  loss 2.0000  sft 2.0000  elapsed 0:00:00  eta 0:00:00"


@pytest.mark.slow
def test_log_file_gets_a_line_every_log_every_steps(tiny_model_dir, tiny_mmpr_dir, tmp_path):
    """5 steps, log_every 2, stdout and stderr files: lines for steps 2, 4 and 5 carrying the
    losses of metrics.jsonl, no bar. Old: no metric line at all, only tqdm's carriage returns."""
    out = tmp_path / "run"
    with open(tmp_path / "out.log", "w") as stdout, open(tmp_path / "err.log", "w") as stderr:
        result = subprocess.run([sys.executable, "-m", "mpo", "train", str(RECIPE),
                                 *train_overrides(tiny_model_dir, tiny_mmpr_dir, out, "train.max_steps=5", "train.log_every=2")],
                                cwd=REPO, env=run_env(), stdout=stdout, stderr=stderr, timeout=600)
    assert result.returncode == 0, (tmp_path / "err.log").read_text()[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    lines = [line for line in (tmp_path / "out.log").read_text().splitlines() if re.match(r"step \d+/", line)]
    assert [line.split("  ")[:2] for line in lines] == [[f"step {row['step']}/5", f"loss {row['loss']:.4f}"] for row in rows]
    assert [row["step"] for row in rows] == [2, 4, 5]
    errors = (tmp_path / "err.log").read_text()
    assert "\r" not in errors and "mpo:" not in errors
