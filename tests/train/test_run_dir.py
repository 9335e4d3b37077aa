"""One run per output_dir: a second trainer is refused while the first runs, a stale lock is named
and taken over, a new run does not mix into an old one (``--overwrite`` moves the old one aside),
and the W&B run id is reused only by a resumed run."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from processes import RECIPE, last_line, logged_steps, run_env, start, train_overrides, wait_for_step

from mpo.errors import DataError
from mpo.train.metrics import wandb_run_id
from mpo.train.run_dir import LOCK_FILE

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_second_trainer_on_a_busy_output_dir_is_refused(tiny_model_dir, tiny_mmpr_dir, tmp_path):
    """A real trainer runs; a second `mpo train` into its output_dir ends in one line naming the
    first (its pid, host, start and command, from the lock record), exit 2, and writes nothing:
    the first run's metrics.jsonl holds each of its steps once. Old: both trained, one died with
    `FileExistsError ... step-N.tmp`, and metrics.jsonl kept duplicated steps."""
    out = tmp_path / "run"
    args = ["train", str(RECIPE), *train_overrides(tiny_model_dir, tiny_mmpr_dir, out, "train.save_every=2")]
    first = start(args, run_env(), tmp_path / "first.log")
    try:
        wait_for_step(out, 1, first, tmp_path / "first.log")
        record = json.loads((out / LOCK_FILE).read_text())
        assert record["pid"] == first.pid and record["host"] == socket.gethostname()
        second = subprocess.run([sys.executable, "-m", "mpo", *args], cwd=ROOT, env=run_env(), capture_output=True, text=True,
                                timeout=300)
        assert second.returncode == 2, second.stderr[-3000:]
        assert last_line(second.stderr) == (
            f"error: output_dir: {out} is in use by another run (process {first.pid} on {record['host']}, started "
            f"{record['started']}: {record['command']}); wait for it to end, or choose another output_dir")
        assert "MPO run" not in second.stdout  # refused before anything loaded
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=300)
    steps = logged_steps(out)
    assert steps == list(range(1, len(steps) + 1))
    assert (out / LOCK_FILE).read_text() == ""  # released when the run ended


def test_stale_lock_of_a_dead_run_is_named_and_taken_over(tiny_model_dir, tiny_mmpr_dir, tmp_path, make_recipe,
                                                          train_in_process, capsys):
    """A process takes the lock and is killed (SIGKILL: it releases nothing): the next run names it
    in a note and trains; its own record is emptied when it ends."""
    out = tmp_path / "run"
    program = ("import os, signal, sys; from pathlib import Path; from mpo.train.run_dir import RunDirLock; "
               "RunDirLock.acquire(Path(sys.argv[1])); os.kill(os.getpid(), signal.SIGKILL)")
    holder = subprocess.run([sys.executable, "-c", program, str(out)], cwd=ROOT, env=run_env(), check=False)
    assert holder.returncode == -signal.SIGKILL
    record = json.loads((out / LOCK_FILE).read_text())
    train_in_process(make_recipe(tiny_model_dir, tiny_mmpr_dir, out, max_steps=1))
    assert (f"note: {out / LOCK_FILE}: taking over the lock of a run that ended without releasing it (process "
            f"{record['pid']} on {record['host']}, started {record['started']}: {record['command']})") in capsys.readouterr().out
    assert (out / LOCK_FILE).read_text() == ""


def test_new_run_never_mixes_into_an_old_one(tiny_model_dir, tiny_mmpr_dir, tmp_path, make_recipe, run_trainer, accelerate_reset):
    """Run A (4 steps, checkpoints 2 and 4); a new run B into the same directory is refused, A
    untouched. Old: B overwrote final/, cut metrics.jsonl to its own steps, keep_last deleted B's
    step 2 and kept A's step 4, and resume_from=latest then resumed A's weights under B's rate.
    With --overwrite A moves aside intact and B trains alone; B's resume continues B."""
    from mpo.config import recipe_from_dict
    from mpo.train.trainer import MPOTrainer

    out = tmp_path / "run"
    first = make_recipe(tiny_model_dir, tiny_mmpr_dir, out, max_steps=4, save_every=2)
    assert [row["step"] for row in run_trainer(first)] == [1, 2, 3, 4]
    second = make_recipe(tiny_model_dir, tiny_mmpr_dir, out, max_steps=2, save_every=2, lr=5e-4)
    with pytest.raises(DataError) as refused:
        run_trainer(second)
    assert str(refused.value) == (
        f"output_dir: {out} holds another run (last checkpoint step-00000004, final/, metrics.jsonl); continue it with "
        "resume_from=latest, or pass --overwrite to move it aside (nothing is deleted), or choose another output_dir")
    assert logged_steps(out) == [1, 2, 3, 4] and sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "step-00000002", "step-00000004"]

    try:
        MPOTrainer(recipe_from_dict(second), overwrite=True).train()
    finally:
        accelerate_reset()
    (aside,) = tmp_path.glob("run.old-*")
    assert logged_steps(aside) == [1, 2, 3, 4] and (aside / "final" / "config.json").exists()
    assert sorted(p.name for p in (aside / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]
    assert not (aside / LOCK_FILE).exists() and (out / LOCK_FILE).read_text() == ""
    assert logged_steps(out) == [1, 2] and sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002"]

    resumed = run_trainer(dict(second, resume_from="latest", train=dict(second["train"], max_steps=3)))
    assert [row["step"] for row in resumed] == [1, 2, 3]
    assert [row["lr"] for row in resumed] == [5e-4] * 3  # B's rate throughout: B's run continued


def test_overwrite_and_resume_together_are_refused(tmp_path, capsys):
    from mpo.cli.train import main

    assert main([str(RECIPE), f"output_dir={tmp_path}", "resume_from=latest", "--overwrite"]) == 2
    assert last_line(capsys.readouterr().err) == (
        "error: resume_from: --overwrite starts a new run; it cannot resume one (drop resume_from or --overwrite)")


def test_wandb_run_id_is_reused_only_when_resuming(tmp_path):
    """Old: every run into a directory logged into the W&B run id found there, a new run included."""
    first = wandb_run_id(tmp_path, resuming=False)
    assert (tmp_path / "wandb_run_id").read_text() == first
    second = wandb_run_id(tmp_path, resuming=False)
    assert second != first
    assert wandb_run_id(tmp_path, resuming=True) == second
