"""Data in the wrong key is recognised and answered with the key it goes in, in one line.

Before: a TRL JSONL as ``data.dataset_path`` ended ``mpo train`` in a 57-line pyarrow
``ArrowInvalid`` traceback; as ``data.jsonl_path`` in ``question: missing or empty``; a
``save_to_disk`` folder as ``data.meta_path`` in ``[Errno 21] Is a directory``.
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest

from mpo.cli.main import main
from mpo.config import DataConfig
from mpo.data.records import load_records
from mpo.errors import DataError

TRL_ROW = {"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many circles?"}]}],
           "chosen": [{"role": "assistant", "content": "Two.\nFinal answer: 2"}],
           "rejected": [{"role": "assistant", "content": "Five.\nFinal answer: 5"}], "images": ["shapes_00.png"]}
SWIFT_ROW = {"messages": [{"role": "user", "content": "<image>How many circles?"}, {"role": "assistant", "content": "2"}],
             "rejected_response": "5", "images": ["shapes_00.png"]}
TRL_COLUMNS = "TRL preference rows (prompt, chosen, rejected, images)"
DATASET_READS = "data.dataset_path reads TRL, ms-swift or LLaMA-Factory preference rows"


@pytest.fixture
def files(tiny_mmpr_dir: Path, tmp_path: Path) -> dict[str, Path]:
    """A TRL JSONL, an ms-swift JSONL, a save_to_disk folder and a parquet file of TRL rows, and the
    example MMPR folder, its meta.json and one annotation file."""
    (tmp_path / "shapes_00.png").write_bytes((tiny_mmpr_dir / "images" / "shapes_00.png").read_bytes())
    (tmp_path / "trl.jsonl").write_text(json.dumps(TRL_ROW) + "\n")
    (tmp_path / "swift.jsonl").write_text(json.dumps(SWIFT_ROW) + "\n")
    datasets.Dataset.from_list([TRL_ROW]).save_to_disk(str(tmp_path / "saved"))
    datasets.Dataset.from_list([TRL_ROW]).to_parquet(str(tmp_path / "trl.parquet"))
    return {"trl": tmp_path / "trl.jsonl", "swift": tmp_path / "swift.jsonl", "saved": tmp_path / "saved",
            "parquet": tmp_path / "trl.parquet", "mmpr": tiny_mmpr_dir, "meta": tiny_mmpr_dir / "meta.json",
            "annotation": tiny_mmpr_dir / "annotations" / "shapes_pairs_vqa_correctness_rules.jsonl"}


CASES = [
    ("jsonl_path", "trl", "jsonl_path: found " + TRL_COLUMNS + ": set data.dataset_path={path} instead "
                          "(data.jsonl_path reads one MMPR annotation JSONL)"),
    ("jsonl_path", "swift", "jsonl_path: found ms-swift preference rows (messages, rejected_response (or rejected_messages), "
                            "images): set data.dataset_path={path} instead (data.jsonl_path reads one MMPR annotation JSONL)"),
    ("meta_path", "saved", "meta_path: found a dataset folder written by save_to_disk: set data.dataset_path={path} instead "
                           "(data.meta_path reads an MMPR meta.json)"),
    ("meta_path", "trl", "meta_path: found " + TRL_COLUMNS + ": set data.dataset_path={path} instead (data.meta_path reads an MMPR meta.json)"),
    ("meta_path", "parquet", "meta_path: found " + TRL_COLUMNS + ": set data.dataset_path={path} instead (data.meta_path reads an MMPR meta.json)"),
    ("meta_path", "mmpr", "meta_path: found an MMPR folder: set data.meta_path={path}/meta.json instead (data.meta_path reads an MMPR meta.json)"),
    ("meta_path", "annotation", "meta_path: found MMPR annotation lines (question, chosen, rejected, image): set data.jsonl_path={path} "
                                "instead (data.meta_path reads an MMPR meta.json)"),
    ("dataset_path", "meta", "dataset_path: found an MMPR meta.json: set data.meta_path={path} instead (" + DATASET_READS + ")"),
    ("dataset_path", "mmpr", "dataset_path: found an MMPR folder: set data.meta_path={path}/meta.json instead (" + DATASET_READS + ")"),
    ("dataset_path", "annotation", "dataset_path: found MMPR annotation lines (question, chosen, rejected, image): set data.jsonl_path={path} "
                                   "instead (" + DATASET_READS + ")"),
]


@pytest.mark.parametrize("key, name, message", CASES, ids=[f"{k}-{n}" for k, n, _ in CASES])
def test_data_in_the_wrong_key_names_the_right_one(files, key, name, message):
    path = files[name]
    with pytest.raises(DataError) as caught:
        load_records(DataConfig(**{key: str(path)}), seed=0)
    assert str(caught.value) == f"{path}: data." + message.format(path=path)


def test_held_out_keys_are_named_as_such(files):
    with pytest.raises(DataError) as caught:
        load_records(DataConfig(meta_path=str(files["trl"])), seed=0, prefix="eval_")
    assert str(caught.value) == (
        f"{files['trl']}: data.eval_meta_path: found {TRL_COLUMNS}: held-out pairs are read from MMPR data "
        f"(data.eval_meta_path, data.eval_jsonl_path); hold out data.eval_fraction of data.dataset_path={files['trl']} instead "
        "(data.eval_meta_path reads an MMPR meta.json)")


def test_data_in_its_own_key_reads(files):
    assert len(load_records(DataConfig(dataset_path=str(files["trl"])), seed=0)) == 1
    assert len(load_records(DataConfig(dataset_path=str(files["saved"]), image_root=str(files["trl"].parent)), seed=0)) == 1
    assert len(load_records(DataConfig(meta_path=str(files["meta"])), seed=0)) == 24


def _recipe(tiny_model_dir: Path, tmp_path: Path) -> Path:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: {{name_or_path: {tiny_model_dir}, dtype: float32}}\n"
                      f"train: {{max_steps: 1, mixed_precision: 'no'}}\noutput_dir: {tmp_path / 'out'}\n")
    return recipe


@pytest.mark.parametrize("key, name, found, reads", [
    ("data.jsonl_path", "trl", TRL_COLUMNS, "data.jsonl_path reads one MMPR annotation JSONL"),
    ("data.meta_path", "saved", "a dataset folder written by save_to_disk", "data.meta_path reads an MMPR meta.json"),
])
def test_mpo_train_ends_in_the_line_naming_the_key(files, tiny_model_dir, tmp_path, capsys, key, name, found, reads):
    """The issue's cases through ``mpo train``: exit 2, the last line names the key, before any model loads."""
    path = files[name]
    assert main(["train", str(_recipe(tiny_model_dir, tmp_path)), f"{key}={path}"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == f"error: {path}: {key}: found {found}: set data.dataset_path={path} instead ({reads})"


def test_mpo_train_trains_a_trl_jsonl_as_dataset_path(files, tiny_model_dir, tmp_path):
    """The third case: a TRL JSONL as data.dataset_path trains (before: a 57-line ArrowInvalid traceback)."""
    assert main(["train", str(_recipe(tiny_model_dir, tmp_path)), f"data.dataset_path={files['trl']}"]) == 0
    assert len((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()) == 1
