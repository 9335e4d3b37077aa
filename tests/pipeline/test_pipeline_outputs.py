"""What ``mpo-data`` leaves behind and prints: a built folder that still loads after a move, Dropout-NTP
under the sampling's token limit, and the generation rate of ``build``.

Before: ``meta.json`` held absolute paths (a moved folder no longer loaded); ``dropout-ntp``
continued up to 1024 tokens whatever the samples were drawn with (125 s for 4 questions); ``build``
printed no samples/s line, though the README promised one.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from PIL import Image

from data_pipeline.__main__ import main
from data_pipeline.mmpr import write_mmpr
from data_pipeline.pairs import Pair
from data_pipeline.records import read_log
from mpo.config import DataConfig
from mpo.data.records import load_records


def test_a_built_folder_loads_after_it_moves(tmp_path):
    data = tmp_path / "project" / "data"
    (data / "images").mkdir(parents=True)
    Image.new("RGB", (32, 32), (200, 30, 30)).save(data / "images" / "a.png")
    pairs = [Pair("toy", ("a.png",), "<image>\nHow many?", "Two.\nFinal answer: 2", "Five.\nFinal answer: 5", 1, {})]
    write_mmpr(data / "mmpr", data / "images", {"toy_pairs_vqa_correctness_rules": pairs}, 6, {"toy_pairs_vqa_correctness_rules": None})
    meta = json.loads((data / "mmpr" / "meta.json").read_text())
    assert meta["toy_pairs_vqa_correctness_rules"]["root"] == "../images"
    assert meta["toy_pairs_vqa_correctness_rules"]["annotation"] == "annotations/toy_pairs_vqa_correctness_rules.jsonl"

    moved = shutil.move(str(tmp_path / "project"), str(tmp_path / "elsewhere"))
    (record,) = load_records(DataConfig(meta_path=str(Path(moved) / "data" / "mmpr" / "meta.json")), seed=0)
    assert record.images == [str(Path(moved) / "data" / "images" / "a.png")]
    assert (record.chosen, record.rejected) == ("Two.\nFinal answer: 2", "Five.\nFinal answer: 5")


def test_an_image_root_elsewhere_stays_absolute(tmp_path):
    """A root outside the folder above meta.json's (e.g. a shared filesystem) would not move with it."""
    pairs = [Pair("toy", ("a.png",), "<image>\nQ", "a", "b", 1, {})]
    write_mmpr(tmp_path / "a" / "b" / "mmpr", tmp_path / "shared" / "images", {"t_pairs_vqa_correctness_rules": pairs}, 6,
               {"t_pairs_vqa_correctness_rules": None})
    meta = json.loads((tmp_path / "a" / "b" / "mmpr" / "meta.json").read_text())
    assert meta["t_pairs_vqa_correctness_rules"]["root"] == str(tmp_path / "shared" / "images")


@pytest.fixture
def questions(tmp_path: Path) -> Path:
    Image.new("RGB", (64, 64), (30, 200, 30)).save(tmp_path / "a.png")
    lines = [{"id": "d1", "image": "a.png", "question": "Describe the image."},
             {"id": "d2", "image": "a.png", "question": "What is in the picture?"},
             {"id": "c1", "image": "a.png", "question": "How many shapes?", "answer": "1"}]
    path = tmp_path / "questions.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_dropout_ntp_continues_under_the_samplings_token_limit(questions, tiny_model_dir, tmp_path, capsys):
    model = ["--model", str(tiny_model_dir), "--seed", "0", "--no-progress", "--max-tiles", "1"]
    assert main(["sample", "--input", str(questions), "--out", str(tmp_path / "samples.jsonl"), "--num-samples", "3",
                 "--max-new-tokens", "12", *model]) == 0
    assert {r["max_new_tokens"] for r in read_log(tmp_path / "samples.jsonl")} == {12}
    assert main(["dropout-ntp", "--samples", str(tmp_path / "samples.jsonl"), "--out", str(tmp_path / "ntp.jsonl"), *model]) == 0
    assert "dropout-ntp: --max-new-tokens 12, the limit the samples were drawn with" in capsys.readouterr().err.splitlines()
    continuations = [c for line in read_log(tmp_path / "ntp.jsonl") for c in line.get("continuations", [])]
    assert continuations and all(c["finish_reason"] == "length" for c in continuations)  # a random model runs to the limit
    # The same run as with the limit given: same settings fingerprint, same continuations.
    assert main(["dropout-ntp", "--samples", str(tmp_path / "samples.jsonl"), "--out", str(tmp_path / "ntp12.jsonl"),
                 "--max-new-tokens", "12", *model]) == 0
    assert read_log(tmp_path / "ntp.jsonl") == read_log(tmp_path / "ntp12.jsonl")


def test_build_prints_the_generation_rate(questions, tiny_model_dir, tmp_path, capsys):
    code = main(["build", "--input", str(questions), "--out-dir", str(tmp_path / "mmpr"), "--model", str(tiny_model_dir),
                 "--num-samples", "2", "--max-new-tokens", "4", "--max-tiles", "1", "--seed", "0", "--no-progress"])
    err = capsys.readouterr().err.splitlines()
    rates = [line for line in err if line.startswith("build: ")]
    assert len(rates) == 1 and re.fullmatch(r"build: 6 samples in \d+\.\d s of generation: \d+\.\d\d samples/s \(transformers backend\)",
                                            rates[0]), err
    assert code in (0, 2)  # a random model may write no pair; the rate is printed either way
