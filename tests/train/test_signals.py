"""Preemption and faults, with real signals to real processes: SIGTERM and SIGINT end a run with a
checkpoint, one line and exit 75 / 130, the processes of a launch stop at the same step, launchers
pass signals on, an orphaned trainer stops, and a frozen process is named."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from loopback import free_port
from processes import (
    RECIPE,
    REPO,
    checkpoint_steps,
    children_by_rank,
    gone,
    last_line,
    logged_steps,
    run_env,
    start,
    train_overrides,
    wait_for_step,
    wait_gone,
)

from mpo.errors import EXIT_INTERRUPTED, EXIT_PREEMPTED
from mpo.train.signals import SAME_REQUEST_S, StopRequest, TrainingStopped


def _stopped_line(cause: str, step: int, out, args: list[str]) -> str:
    return (f"{cause} at step {step} of 200, checkpoint {out / 'checkpoints' / f'step-{step:08d}'}; resume with: "
            f"{' '.join(args)} resume_from=latest")


def test_stop_request_takes_repeats_as_one_and_a_late_second_ctrl_c_as_stop_now():
    before = signal.getsignal(signal.SIGINT)
    stop = StopRequest(announce=False).install()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.signal_name == "SIGINT"
        os.kill(os.getpid(), signal.SIGINT)  # the same Ctrl-C, passed on by a launcher
        os.kill(os.getpid(), signal.SIGTERM)  # a launcher's death signal after it
        assert stop.signal_name == "SIGINT"
        time.sleep(SAME_REQUEST_S + 0.1)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGINT) is before


def test_stop_lines():
    saved = TrainingStopped("SIGTERM", 7, 100, REPO / "out" / "checkpoints" / "step-00000007", saved=True, main_process=True)
    assert saved.exit_code == EXIT_PREEMPTED == 75
    assert saved.line("mpo train r.yaml resume_from=latest") == (
        f"stopped by SIGTERM at step 7 of 100, checkpoint {REPO}/out/checkpoints/step-00000007; resume with: "
        "mpo train r.yaml resume_from=latest")
    unsaved = TrainingStopped("SIGINT", 9, 100, REPO / "c", saved=False, main_process=True)
    assert unsaved.exit_code == EXIT_INTERRUPTED
    assert unsaved.line("X") == f"interrupted (Ctrl-C) at step 9 of 100, not saved; the last checkpoint is {REPO}/c; resume with: X"
    assert TrainingStopped("SIGINT", 0, 5, None, False, True).line("X") == (
        "interrupted (Ctrl-C) at step 0 of 5, no checkpoint yet; resume with: X")


@pytest.mark.slow
@pytest.mark.parametrize("number, cause, code", [(signal.SIGTERM, "stopped by SIGTERM", 75),
                                                 (signal.SIGINT, "interrupted (Ctrl-C)", 130)])
def test_signal_saves_the_step_and_says_how_to_resume(tiny_model_dir, tiny_mmpr_dir, tmp_path, number, cause, code):
    """`mpo train` gets SIGTERM (what SLURM and Kubernetes send) or SIGINT mid-run: it finishes the
    step, saves it, ends with one line naming it and the resume command, exit 75 / 130; that
    command continues from the next step. Old: SIGTERM saved nothing and exited 143 without a
    word; SIGINT printed `error: interrupted` with no hint."""
    out = tmp_path / "run"
    args = ["train", str(RECIPE), *train_overrides(tiny_model_dir, tiny_mmpr_dir, out)]
    log = tmp_path / "run.log"
    process = start(args, run_env(), log)
    wait_for_step(out, 2, process, log)
    process.send_signal(number)
    assert process.wait(timeout=300) == code, log.read_text()[-3000:]
    (step,) = checkpoint_steps(out)
    assert last_line(log.read_text()) == _stopped_line(cause, step, out, ["mpo", *args])
    assert logged_steps(out) == list(range(1, step + 1)) and not (out / "final").exists()
    resumed = subprocess.run([sys.executable, "-m", "mpo", *args, "resume_from=latest", f"train.max_steps={step + 1}"], cwd=REPO,
                             env=run_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {out / 'checkpoints' / f'step-{step:08d}'} at step {step}" in resumed.stdout
    assert logged_steps(out) == list(range(1, step + 2))


@pytest.mark.slow
def test_preempted_launch_stops_every_process_at_one_step_quietly(tiny_model_dir, tiny_mmpr_dir, tmp_path):
    """SIGTERM to `mpo train --launch` of 2 ZeRO-2 processes: both finish the step, write their
    parts of its checkpoint (each its optimizer shard) and stop; the launcher's last line is the
    stop line, exit 75. The log carries no library noise (DeepSpeed's "Setting accelerator to CPU",
    torch's FutureWarnings) and, not being a terminal, a metric line per step instead of a bar.
    Old: a torchrun `SignalException` traceback, exit 1, nothing saved."""
    out = tmp_path / "run"
    args = ["train", "--launch", "launch/zero2.yaml", "--num-processes", "2", "--main-process-port", str(free_port()),
            str(RECIPE), *train_overrides(tiny_model_dir, tiny_mmpr_dir, out)]
    log = tmp_path / "launch.log"
    env = run_env(TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(tmp_path / "extensions")))
    env.pop("DS_ACCELERATOR", None)
    process = start(args, env, log)
    wait_for_step(out, 2, process, log)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=300) == EXIT_PREEMPTED, log.read_text()[-3000:]
    text = log.read_text()
    (step,) = checkpoint_steps(out)
    assert last_line(text) == _stopped_line("stopped by SIGTERM", step, out, ["mpo", *args])
    shards = sorted(path.name for path in (out / "checkpoints" / f"step-{step:08d}").rglob("*optim_states.pt"))
    assert len(shards) == 2, shards  # both processes saved the same step
    for noise in ("Traceback", "SignalException", "Setting accelerator to CPU", "FutureWarning", "Loading weights", "\r"):
        assert noise not in text, noise
    assert [line.split("  ")[0] for line in text.splitlines() if re.match(r"step \d+/", line)] == [f"step {n}/200" for n in range(1, step + 1)]


@pytest.mark.slow
def test_a_signal_to_one_process_stops_all_at_the_same_step(tiny_model_dir, tiny_mmpr_dir, tmp_path):
    """SIGTERM reaches only process 1 (a signal to one node): after each step the processes agree,
    so both stop after the same step and process 0 writes its checkpoint; exit 75 with the line."""
    out = tmp_path / "run"
    args = ["train", "--launch", "launch/ddp.yaml", "--num-processes", "2", "--main-process-port", str(free_port()),
            str(RECIPE), *train_overrides(tiny_model_dir, tiny_mmpr_dir, out)]
    log = tmp_path / "launch.log"
    process = start(args, run_env(), log)
    wait_for_step(out, 2, process, log)
    os.kill(children_by_rank(process.pid, 2)[1], signal.SIGTERM)
    assert process.wait(timeout=300) == EXIT_PREEMPTED, log.read_text()[-3000:]
    (step,) = checkpoint_steps(out)
    assert last_line(log.read_text()) == _stopped_line("stopped by SIGTERM", step, out, ["mpo", *args])


@pytest.mark.slow
def test_trainer_of_a_dead_one_process_launcher_saves_and_stops(tiny_model_dir, tiny_mmpr_dir, tmp_path, launch_command):
    """Plain `accelerate launch` of one process gets SIGTERM and dies without passing it on: its
    trainer, told by Linux that its parent died, saves its step and stops. Old: the trainer
    trained on to the end, writing checkpoints a restarted job raced with."""
    out = tmp_path / "run"
    command = launch_command("single_gpu.yaml", ["-m", "mpo.train"], [str(RECIPE), *train_overrides(tiny_model_dir, tiny_mmpr_dir, out)],
                             processes=1)
    log = tmp_path / "launch.log"
    with open(log, "w") as handle:
        launcher = subprocess.Popen(command, cwd=REPO, env=run_env(), stdout=handle, stderr=subprocess.STDOUT)
    wait_for_step(out, 2, launcher, log)
    trainer = int(Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()[0])
    launcher.send_signal(signal.SIGTERM)
    assert launcher.wait(timeout=60) == -signal.SIGTERM
    wait_gone([trainer])
    (step,) = checkpoint_steps(out)
    assert not (out / "final").exists()
    assert f"stopped by SIGTERM at step {step} of 200, checkpoint {out / 'checkpoints' / f'step-{step:08d}'}" in log.read_text()


@pytest.mark.slow
def test_processes_of_a_killed_launcher_save_and_stop(tiny_model_dir, tiny_mmpr_dir, tmp_path):
    """SIGKILL to `mpo train --launch` of 2 processes (nothing can be passed on): both processes
    stop at one step with its checkpoint. Old: both trained to the end, and a restart in that
    window crashed on a checkpoint the orphans had just deleted."""
    out = tmp_path / "run"
    args = ["train", "--launch", "launch/ddp.yaml", "--num-processes", "2", "--main-process-port", str(free_port()),
            str(RECIPE), *train_overrides(tiny_model_dir, tiny_mmpr_dir, out)]
    log = tmp_path / "launch.log"
    process = start(args, run_env(), log)
    wait_for_step(out, 2, process, log)
    ranks = children_by_rank(process.pid, 2)
    process.kill()
    process.wait(timeout=60)
    wait_gone(list(ranks.values()))
    (step,) = checkpoint_steps(out)
    assert not (out / "final").exists() and logged_steps(out) == list(range(1, step + 1))


@pytest.mark.slow
def test_frozen_process_is_named_within_the_collective_timeout(tiny_model_dir, tiny_mmpr_dir, tmp_path):
    """SIGSTOP freezes process 1 of 2: within train.collective_timeout (4 s here) the run ends with
    one line naming it, exit 1. Old: the job hung silently for gloo's 30 minutes."""
    out = tmp_path / "run"
    args = ["train", "--launch", "launch/ddp.yaml", "--num-processes", "2", "--main-process-port", str(free_port()),
            str(RECIPE), *train_overrides(tiny_model_dir, tiny_mmpr_dir, out, "train.collective_timeout=4")]
    log = tmp_path / "launch.log"
    # torchrun waits this long for the frozen process before it kills it (default 30 s).
    process = start(args, run_env(PET_SHUTDOWN_TIMEOUT="5"), log)
    wait_for_step(out, 2, process, log)
    frozen = children_by_rank(process.pid, 2)[1]
    os.kill(frozen, signal.SIGSTOP)
    try:
        assert process.wait(timeout=300) == 1, log.read_text()[-3000:]
    finally:
        if not gone(frozen):
            os.kill(frozen, signal.SIGKILL)
    line = last_line(log.read_text())
    prefix = f"error: process 1 (pid {frozen} on {socket.gethostname()}) stopped answering: it has not run for "
    assert line.startswith(prefix), line
    assert line.endswith(" s (train.collective_timeout=4): frozen (SIGSTOP), swapped out, or its machine unreachable; "
                         "the other processes stopped"), line
