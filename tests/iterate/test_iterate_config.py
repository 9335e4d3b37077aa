"""The ``mpo iterate`` config: typed keys refused by name, each round's recipe, the output folder."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import yaml

from mpo.cli.iterate import _differences, claim_output_dir, main
from mpo.errors import EXIT_BAD_INPUT, DataError
from mpo.iterate.config import IterateConfig, load_iterate, round_recipe

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "iterate" / "tiny_cpu.yaml"


@pytest.fixture
def in_repo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)  # the example's paths are relative to the repository, as the recipes' are


def test_each_round_recipe(in_repo) -> None:
    setup = load_iterate(EXAMPLE, ["output_dir=/runs/it"])
    assert (setup.config.rounds, setup.config.sampler, setup.config.num_samples) == (2, "transformers", 4)
    first = round_recipe(setup, 1, "builtin:tiny", Path("/runs/it/round-1/pairs/meta.json"), resume=False)
    assert (first.model.name_or_path, first.data.meta_path, first.output_dir) == (
        "builtin:tiny", "/runs/it/round-1/pairs/meta.json", "/runs/it/round-1/train")
    assert (first.reference.name_or_path, first.resume_from, first.train.lr, first.seed) == ("", "", 1e-3, 42)
    second = round_recipe(setup, 2, "/runs/it/round-1/train/final", Path("/runs/it/round-2/pairs/meta.json"), resume=True)
    assert (second.model.name_or_path, second.output_dir, second.resume_from) == (
        "/runs/it/round-1/train/final", "/runs/it/round-2/train", "latest")
    assert second.reference.name_or_path == ""  # previous: the model the round starts from
    initial = load_iterate(EXAMPLE, ["iterate.reference=initial"], rounds=3)
    assert initial.config.rounds == 3
    assert round_recipe(initial, 2, "/x/final", Path("/x/meta.json"), False).reference.name_or_path == "builtin:tiny"
    assert round_recipe(initial, 1, "builtin:tiny", Path("/x/meta.json"), False).reference.name_or_path == ""


@pytest.mark.parametrize("override, message", [
    ("iterate.num_sample=3", "unknown key iterate.num_sample; valid keys here: iterate.rounds, iterate.reference, "),
    ("iterate.rounds=two", "iterate.rounds: expected an integer, got 'two'"),
    ("iterate.reference=last", "iterate.reference: must be one of ['previous', 'initial'], got 'last'"),
    ("iterate.rounds=0", "iterate.rounds: must be at least 1, got 0"),
    ("iterate.num_samples=1", "iterate.num_samples: must be at least 2"),
    ("iterate.temperature=0", "iterate.temperature: must be above 0"),
    ("iterate.questions=nowhere.jsonl", "iterate.questions: no such file: nowhere.jsonl"),
    ("iterate.match_modes=fuzzy", "iterate.match_modes: unknown match mode(s) ['fuzzy']"),
    ("iterate.prompt=custom", "iterate.prompt: --prompt custom needs --template"),
    ("data.meta_path=x/meta.json", "data.meta_path: is set by mpo iterate for each round; remove it from the config"),
    ("resume_from=latest", "resume_from: is set by mpo iterate for each round"),
    ("reference.name_or_path=/ckpt/other", "reference.name_or_path: is set by mpo iterate for each round"),
    ("reference.precomputed_path=ref.safetensors", "reference.precomputed_path: is set by mpo iterate for each round"),
    ("train.micro_batch_size=0", "tiny_cpu.yaml (round 1): train.micro_batch_size: must be at least 1"),
    ("iterate.server_command=[x]", "iterate.server_command: is read with sampler: server only"),
    ("iterate.sampler=server", "iterate.server_command: needs {model} and {port} among its arguments"),
    ("model.lora.enabled=true", "model.lora.enabled: mpo iterate trains full models (each round's final/ is the next "
                                "round's model and sampler); set model.lora.enabled: false"),
])
def test_bad_keys_are_refused_by_name(in_repo, override: str, message: str) -> None:
    with pytest.raises(DataError) as error:
        load_iterate(EXAMPLE, [override])
    assert message in str(error.value)


def test_a_config_without_the_section(tmp_path: Path) -> None:
    path = tmp_path / "plain.yaml"
    path.write_text(yaml.safe_dump({"model": {"name_or_path": "builtin:tiny"}}))
    with pytest.raises(DataError, match=r"plain.yaml: needs an `iterate:` section"):
        load_iterate(path)


def test_vllm_needs_its_environment(in_repo, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="iterate.vllm_python: no Python at /nowhere/bin/python: build vLLM's environment"):
        load_iterate(EXAMPLE, ["iterate.sampler=vllm", "iterate.vllm_python=/nowhere/bin/python"])


def test_the_cli_says_what_to_change_in_one_line(in_repo, capsys: pytest.CaptureFixture) -> None:
    assert main([str(EXAMPLE), "iterate.num_sample=3"]) == EXIT_BAD_INPUT
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: {EXAMPLE}: unknown key iterate.num_sample; valid keys here:")


def test_help_documents_every_key(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for field in dataclasses.fields(IterateConfig):
        assert f"  iterate.{field.name}: " in text, field.name
    assert "iterate.reference: previous|initial (default: previous)" in text
    assert "      The frozen reference of round k: ``previous``, the round k-1 model" in text


def test_output_dir_claims(tmp_path: Path) -> None:
    out = tmp_path / "run"
    text = yaml.safe_dump({"iterate": {"rounds": 2, "num_samples": 4}, "train": {"lr": 1e-3}})
    lock = claim_output_dir(out, text, resume=False, overwrite=False)
    (out / "round-1").mkdir()
    # While a run holds the folder, neither --resume nor --overwrite touches it (the trainer's lock).
    for resume, overwrite in ((True, False), (False, True)):
        with pytest.raises(DataError, match=f"output_dir: {out} is in use by another run \\(process {os.getpid()} "):
            claim_output_dir(out, text, resume=resume, overwrite=overwrite)
    assert (out / "round-1").exists()
    lock.release()
    with pytest.raises(DataError, match="holds an mpo iterate run: pass --resume to continue it, or --overwrite"):
        claim_output_dir(out, text, resume=False, overwrite=False)
    more_rounds = text.replace("rounds: 2", "rounds: 5")
    claim_output_dir(out, more_rounds, resume=True, overwrite=False).release()  # a resumed run may add rounds
    assert (out / "round-1").exists()
    other = more_rounds.replace("lr: 0.001", "lr: 0.002").replace("num_samples: 4", "num_samples: 8")
    with pytest.raises(DataError, match="these keys differ from .*iterate.yaml: iterate.num_samples, train.lr$"):
        claim_output_dir(out, other, resume=True, overwrite=False)
    claim_output_dir(out, other, resume=False, overwrite=True).release()
    assert not (out / "round-1").exists() and yaml.safe_load((out / "iterate.yaml").read_text())["train"]["lr"] == 0.002
    assert sorted(p.name for p in out.iterdir()) == [".mpo-run.lock", "iterate.yaml"]
    assert _differences({"a": {"b": 1}, "c": 2}, {"a": {"b": 1, "d": 3}}) == ["a.d", "c"]
