"""``mpo iterate`` end to end on a taught tiny model: two rounds, the files of each, resume.

In process with the transformers sampler: every file of ``round-k/`` and the numbers the report and
the table give are those of the files (pairs = the annotation lines, pass rates = the judged
samples, accuracy = the judged greedy answers); round 2 samples round 1's model (the settings hash
of its sample log names it) and trains from its weights with it as the reference (DPO = ln 2 at
step 1). A run stopped after round 2's first checkpoint resumes there and trains the weights of an
uninterrupted run. Then a real kill: ``mpo iterate`` with a server sampler (``mpo-data serve`` as
the server command, a process of its own) killed with SIGKILL between the rounds, while its server
runs; ``--resume`` stops that server by its recorded process ID and finishes round 2.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from data_pipeline.generation import fingerprint
from data_pipeline.sample import SampleSettings
from data_pipeline.backends import SamplingParams
from iterate_cases import EVAL_QUESTIONS, QUESTIONS, TEMPLATE, alive, kill_after_round_one, lines, write_config, write_workspace
from mpo.cli.iterate import main
from mpo.data.prompting import INTERNVL_SYSTEM_MESSAGE
from mpo.errors import EXIT_BAD_INPUT
from mpo.iterate.table import render_table

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    # One thread: the same sums (and sampled tokens) in every run of the module.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield write_workspace(tmp_path_factory.mktemp("iterate"), tiny_model_dir)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def two_rounds(workspace: Path) -> Path:
    out = workspace / "run"
    assert main([str(write_config(workspace, out, "transformers"))]) == 0
    return out


def _sample_config_hash(model: Path, root: Path, seed: int) -> str:
    """The settings hash a sample log written by the transformers sampler on ``model`` carries."""
    params = SamplingParams(1.0, 1.0, 0, 16, 2)
    settings = SampleSettings(TEMPLATE, 4, params, seed, 2, INTERNVL_SYSTEM_MESSAGE)
    return fingerprint({"stage": "sample", "backend": "transformers", "model": str(model.resolve()), **asdict(settings),
                        "root": str(root.resolve())})


def test_each_round_samples_the_model_before_it(two_rounds: Path, workspace: Path) -> None:
    out = two_rounds
    starts = {1: workspace / "model", 2: out / "round-1" / "train" / "final"}
    for number, start in starts.items():
        directory = out / f"round-{number}"
        log = lines(directory / "pairs" / "work" / "questions" / "samples.shard-0-of-1.jsonl")
        assert [r["id"] for r in log] == [q["id"] for q in QUESTIONS]
        # round k samples round k-1's model with seed + k - 1 (the recipe's seed is 3)
        assert {r["config"] for r in log} == {_sample_config_hash(start, workspace / "images", 3 + number - 1)}
        recipe = yaml.safe_load((directory / "train" / "recipe.yaml").read_text())
        assert recipe["model"]["name_or_path"] == str(start.resolve())
        assert recipe["reference"]["name_or_path"] == ""  # reference: previous, the model it starts from
        assert recipe["data"]["meta_path"] == str(directory / "pairs" / "meta.json")
        metrics = lines(directory / "train" / "metrics.jsonl")
        assert [m["step"] for m in metrics] == [1, 2, 3]
        assert metrics[0]["loss/dpo"] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference at step 1
        assert (directory / "train" / "final" / "model.safetensors").exists()


def test_reports_are_the_files_numbers(two_rounds: Path) -> None:
    out = two_rounds
    reports = lines(out / "rounds.jsonl")
    assert [r["round"] for r in reports] == [0, 1, 2]
    for report in reports[1:]:
        directory = out / f"round-{report['round']}"
        sample = report["steps"]["sample"]
        meta = json.loads((directory / "pairs" / "meta.json").read_text())
        subsets = {name: len(lines(Path(entry["annotation"]) if Path(entry["annotation"]).is_absolute()
                                   else directory / "pairs" / entry["annotation"])) for name, entry in meta.items()}
        assert sample["subsets"] == {name: entry["length"] for name, entry in meta.items()} == subsets
        assert sample["pairs"] == sum(subsets.values()) > 0
        rates = lines(directory / "pairs" / "work" / "questions" / "pass_rates.jsonl")
        checkable = [r for r in rates if r["pass_rate"] is not None]
        assert len(checkable) == 3 and len(rates) == 4  # q4 has no answer (Dropout-NTP)
        matched = lines(directory / "pairs" / "work" / "questions" / "matched.jsonl")
        statuses = [j["status"] for r in matched if r["answer"] is not None for j in r["judgements"]]
        assert sample["sample_accuracy"] == pytest.approx(statuses.count("correct") / len(statuses))
        assert sample["mean_pass_rate"] == pytest.approx(sum(r["pass_rate"] for r in checkable) / 3)
        assert sample["pass_at_k"] == pytest.approx(sum(r["correct"] > 0 for r in checkable) / 3)
        assert report["steps"]["train"]["steps"] == 3
    for report in reports:
        evaluation = report["steps"]["evaluate"]
        directory = out / f"round-{report['round']}" / "eval"
        judged = lines(directory / "matched.jsonl")
        assert [r["id"] for r in judged] == [q["id"] for q in EVAL_QUESTIONS]
        assert all(len(r["responses"]) == 1 for r in judged)
        correct = sum(r["judgements"][0]["status"] == "correct" for r in judged)
        assert (evaluation["questions"], evaluation["correct"]) == (3, correct)
        assert evaluation["accuracy"] == pytest.approx(correct / 3)
    # e3's truth (5) is no response the model knows: greedy is right on at most e1 and e2
    assert all(r["steps"]["evaluate"]["correct"] <= 2 for r in reports)
    table = (out / "rounds.md").read_text().splitlines()
    assert table == render_table(reports).splitlines()
    first = reports[1]["steps"]["sample"]
    assert table[3].startswith(f"| 1 | {100 * first['sample_accuracy']:.1f} | {100 * first['mean_pass_rate']:.1f} | "
                               f"{100 * first['pass_at_k']:.1f} | {first['pass_rates']['mmpr_tiny']} | {first['pairs']} | 3 | ")
    assert table[2].startswith("| 0 | - | - | - | - | - | - | ")
    with Image.open(out / "rounds.png") as image:
        assert image.format == "PNG" and image.size[0] > 100
    assert not (out / "server.json").exists()


def test_resume_at_a_training_checkpoint(two_rounds: Path, workspace: Path) -> None:
    # As a run stopped after round 2's first checkpoint leaves it: its report without the train
    # step, checkpoint 1 only, one metrics line. --resume trains on from step 2 to the same weights.
    out = workspace / "stopped"
    assert main([str(write_config(workspace, out, "transformers")), "--rounds", "1"]) == 0
    config = write_config(workspace, out, "transformers")
    assert main([str(config), "--resume"]) == 0  # round 2 in full, then cut back to its first checkpoint
    train = out / "round-2" / "train"
    finished = load_file(train / "final" / "model.safetensors")
    report = json.loads((out / "round-2" / "report.json").read_text())
    del report["steps"]["train"], report["steps"]["evaluate"]
    (out / "round-2" / "report.json").write_text(json.dumps(report))
    shutil.rmtree(train / "final")
    for checkpoint in ("step-00000002", "step-00000003"):
        shutil.rmtree(train / "checkpoints" / checkpoint)
    (train / "metrics.jsonl").write_text((train / "metrics.jsonl").read_text().splitlines(keepends=True)[0])
    assert main([str(config), "--resume"]) == 0
    assert [m["step"] for m in lines(train / "metrics.jsonl")] == [1, 2, 3]
    resumed = load_file(train / "final" / "model.safetensors")
    assert resumed.keys() == finished.keys() and all(torch.equal(resumed[k], finished[k]) for k in resumed)
    assert lines(out / "rounds.jsonl")[2]["steps"]["evaluate"]["correct"] == lines(two_rounds / "rounds.jsonl")[2]["steps"]["evaluate"]["correct"]


def test_a_run_is_not_replaced_or_mixed_by_accident(two_rounds: Path, workspace: Path, capsys: pytest.CaptureFixture) -> None:
    config = write_config(workspace, two_rounds, "transformers")
    assert main([str(config)]) == EXIT_BAD_INPUT
    assert "holds an mpo iterate run: pass --resume to continue it, or --overwrite to start over" in capsys.readouterr().err
    assert main([str(config), "--resume", "iterate.num_samples=3"]) == EXIT_BAD_INPUT
    assert "these keys differ from" in capsys.readouterr().err.splitlines()[-1]
    foreign = workspace / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert main([str(write_config(workspace, foreign, "transformers")), "--overwrite"]) == EXIT_BAD_INPUT
    assert "holds files that mpo iterate did not write" in capsys.readouterr().err
    assert (foreign / "notes.txt").read_text() == "mine"


# `sampler: server` with the project's own OpenAI-compatible server, on the port mpo iterate picks.
SERVE_COMMAND = [sys.executable, "-m", "data_pipeline", "serve", "--model", "{model}", "--served-model-name", "{model}",
                 "--port", "{port}", "--host", "127.0.0.1"]


def _child_env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return env


@pytest.mark.slow
def test_a_killed_run_resumes_and_stops_its_server(workspace: Path) -> None:
    out = workspace / "killed"
    config = write_config(workspace, out, "server", server_command=SERVE_COMMAND, server_timeout=300.0)
    run = [sys.executable, "-m", "mpo", "iterate", str(config)]
    with open(workspace / "killed.log", "wb") as log:
        process = subprocess.Popen(run, stdout=log, stderr=subprocess.STDOUT, env=_child_env(), cwd=REPO)
    # Between the rounds: round 1 finished (its evaluation done on a server of its model, which
    # also serves round 2's sampling), round 2 not yet.
    kill_after_round_one(process, out, workspace / "killed.log", timeout=600)
    record = json.loads((out / "server.json").read_text())
    assert record["model"] == str((out / "round-1" / "train" / "final").resolve())
    assert alive(record["pid"])  # the killed run's server lives on, holding its memory
    round1 = (out / "round-1" / "report.json").read_text()
    weights = (out / "round-1" / "train" / "final" / "model.safetensors").stat().st_mtime_ns

    resumed = subprocess.run([*run, "--resume"], capture_output=True, text=True, env=_child_env(), cwd=REPO, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"stopped the server an earlier run left on {record['model']} (pid {record['pid']})" in resumed.stderr
    assert not alive(record["pid"])
    assert not (out / "server.json").exists()
    assert (out / "round-1" / "report.json").read_text() == round1  # round 1 is not run again
    assert (out / "round-1" / "train" / "final" / "model.safetensors").stat().st_mtime_ns == weights
    reports = lines(out / "rounds.jsonl")
    assert [r["round"] for r in reports] == [0, 1, 2]
    assert set(reports[2]["steps"]) == {"sample", "train", "evaluate"}
    recipe = yaml.safe_load((out / "round-2" / "train" / "recipe.yaml").read_text())
    assert recipe["model"]["name_or_path"] == record["model"]
    # every server this run started was stopped: none is left serving either round's model
    assert "starting the server on" in resumed.stderr and "stopping the server on" in resumed.stderr


@pytest.mark.slow
def test_sigterm_stops_the_server_it_started(workspace: Path) -> None:
    # A preempted job gets SIGTERM: the run ends as interrupted (130) and stops its server on the way out.
    out = workspace / "terminated"
    config = write_config(workspace, out, "server", server_command=SERVE_COMMAND, server_timeout=300.0)
    with open(workspace / "terminated.log", "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "mpo", "iterate", str(config)], stdout=log, stderr=subprocess.STDOUT,
                                   env=_child_env(), cwd=REPO)
    try:
        deadline = time.monotonic() + 600
        while not (out / "server.json").exists():
            assert process.poll() is None, (workspace / "terminated.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no server started in 10 minutes"
            time.sleep(0.1)
        pid = json.loads((out / "server.json").read_text())["pid"]
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=120) == 130
    finally:
        if process.poll() is None:
            process.kill()
    assert not alive(pid) and not (out / "server.json").exists()
    assert (workspace / "terminated.log").read_text().splitlines()[-1] == "error: interrupted"
