"""``mpo iterate`` on a real vLLM server (CPU build): two rounds end to end, killed between them.

The command starts vLLM on each round's checkpoint itself (``sampler: vllm``, the environment of
``scripts/setup_vllm.sh`` at ``$MPO_VLLM_VENV``), serves the round's evaluation and the next
round's sampling from it, and stops it by its process ID before training. The run is killed with
SIGKILL once round 1 is finished, while vLLM serves round 1's model; ``--resume`` stops that
orphaned server (its whole process group: the engine runs in child processes) and finishes round 2.

The model is the ``small`` tiny size (vLLM's CPU attention needs a head size of at least 32),
random: its answers are unparsable, so the pairs are the describe question's Dropout-NTP pairs
(two continuations a round), enough to train on; the numbers of the report are checked on a taught
model in ``test_iterate.py``. Without a vLLM environment the test skips and says why, unless
``MPO_REQUIRE_VLLM=1`` (CI sets it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from iterate_cases import alive, kill_after_round_one, lines, write_config, write_workspace
from mpo.model.tiny import build_tiny_model

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
VENV = Path(os.environ.get("MPO_VLLM_VENV", REPO / ".cache" / "vllm-venv"))
REQUIRED = os.environ.get("MPO_REQUIRE_VLLM") == "1"
CPU_SERVER_ARGS = ["--dtype", "float32", "--max-model-len", "2048", "--max-num-seqs", "8", "--enforce-eager",
                   "--limit-mm-per-prompt", '{"image": 2, "video": 0}']
ROUND_TIMEOUT = 1200  # seconds; a vLLM start takes 25-120 s on 2 cores, several times that under load


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not (VENV / "bin" / "python").exists():
        message = f"no vLLM environment at {VENV}"
        if REQUIRED:
            pytest.fail(f"{message} (MPO_REQUIRE_VLLM=1)")
        pytest.skip(f"{message}; build it with scripts/setup_vllm.sh (make vllm-venv) or point MPO_VLLM_VENV at one")
    root = tmp_path_factory.mktemp("iterate_vllm")
    return write_workspace(root, build_tiny_model(root / "small", size="small", seed=0), taught=False)


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
                VLLM_TARGET_DEVICE="cpu", VLLM_CPU_KVCACHE_SPACE="1")


def test_two_rounds_on_vllm_killed_between_rounds(workspace: Path) -> None:
    out = workspace / "run"
    config = write_config(workspace, out, "vllm", vllm_python=str(VENV / "bin" / "python"), server_args=CPU_SERVER_ARGS,
                          ntp_pairs_per_question=2, server_timeout=900.0)
    run = [sys.executable, "-m", "mpo", "iterate", str(config)]
    with open(workspace / "first.log", "wb") as log:
        process = subprocess.Popen(run, stdout=log, stderr=subprocess.STDOUT, env=_env(), cwd=REPO)
    kill_after_round_one(process, out, workspace / "first.log", timeout=ROUND_TIMEOUT, poll_s=0.5)
    record = json.loads((out / "server.json").read_text())
    assert record["model"] == str((out / "round-1" / "train" / "final").resolve())
    assert record["command"][:3] == [str(VENV / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server"]
    assert alive(record["pid"])
    first_round = (out / "round-1" / "report.json").read_text()

    resumed = subprocess.run([*run, "--resume"], capture_output=True, text=True, env=_env(), cwd=REPO, timeout=2 * ROUND_TIMEOUT)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"stopped the server an earlier run left on {record['model']} (pid {record['pid']})" in resumed.stderr
    assert not alive(record["pid"]) and not (out / "server.json").exists()
    assert (out / "round-1" / "report.json").read_text() == first_round
    reports = lines(out / "rounds.jsonl")
    assert [r["round"] for r in reports] == [0, 1, 2]
    for report in reports[1:]:
        directory = out / f"round-{report['round']}"
        assert report["steps"]["sample"]["pairs"] == sum(e["length"] for e in json.loads((directory / "pairs" / "meta.json").read_text()).values()) > 0
        assert report["steps"]["train"]["steps"] == 3
        assert len(lines(directory / "eval" / "matched.jsonl")) == 3
    # round 2 sampled round 1's model on vLLM (the sample log's hash names the served model) and
    # trained from its weights
    log = lines(out / "round-2" / "pairs" / "work" / "questions" / "samples.shard-0-of-1.jsonl")
    assert len(log) == 4 and all(len(r["responses"]) == 4 for r in log)
    recipe = yaml.safe_load((out / "round-2" / "train" / "recipe.yaml").read_text())
    assert recipe["model"]["name_or_path"] == record["model"]
    servers = [line for line in resumed.stderr.splitlines() if line.startswith("starting the server on")]
    assert [line.split()[4].rstrip(":") for line in servers] == [record["model"], str((out / "round-2" / "train" / "final").resolve())]
