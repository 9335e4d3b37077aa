"""``data.dataset_path``: a TRL-format HF dataset on disk trains like the MMPR lines it holds.

The example MMPR pairs are rewritten in TRL's columns (conversational single-image prompts, plain
string multi-image prompts, PIL images) and saved the ways users save datasets; the records, the
encoded pairs and a training step must equal the MMPR ones. Bad rows name file, row and column.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import datasets
import pytest
import torch
from PIL import Image

from mpo.config import DataConfig, ModelConfig, recipe_from_dict
from mpo.data.dataset import PreferenceDataset
from mpo.data.records import load_records
from mpo.errors import DataError
from mpo.data.dataset_files import data_files
from mpo.data.preference_files import parse_row, read_dataset
from mpo.model.loading import load_processor

SUBSETS = ("shapes_pairs_vqa_correctness_rules", "multi_pairs_vqa_correctness_rules")


def _mmpr_lines(mmpr: Path) -> list[dict]:
    return [json.loads(line) for name in SUBSETS for line in (mmpr / "annotations" / f"{name}.jsonl").read_text().splitlines()]


def _trl_rows(mmpr: Path) -> tuple[list[dict], list[dict]]:
    """The example pairs in TRL's columns: one-image questions as conversations (image and text
    parts; a chosen of parts, a rejected of plain content), two-image ones as plain strings."""
    conversational, plain = [], []
    for line in _mmpr_lines(mmpr):
        names = line["image"] if isinstance(line["image"], list) else [line["image"]]
        images = [Image.open(mmpr / "images" / name) for name in names]
        if len(names) == 1:
            text = line["question"].removeprefix("<image>\n")
            conversational.append({
                "prompt": [{"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": text}]}],
                "chosen": [{"role": "assistant", "content": [{"type": "text", "text": line["chosen"]}]}],
                "rejected": [{"role": "assistant", "content": line["rejected"]}],
                "images": images,
            })
        else:
            plain.append({"prompt": line["question"], "chosen": line["chosen"], "rejected": line["rejected"], "images": images})
    return conversational, plain


@pytest.fixture(scope="module")
def trl_dirs(tiny_mmpr_dir, tmp_path_factory):
    """The conversational rows saved with save_to_disk (images embedded), the string rows as
    hub-style parquet files of a train and a test split."""
    out = tmp_path_factory.mktemp("trl")
    conversational, plain = _trl_rows(tiny_mmpr_dir)
    datasets.Dataset.from_list(conversational).save_to_disk(str(out / "conversational"))
    plain_rows = datasets.Dataset.from_list(plain)
    plain_rows.to_parquet(str(out / "string" / "train-00000-of-00001.parquet"))
    plain_rows.select([0]).to_parquet(str(out / "string" / "test-00000-of-00001.parquet"))
    return out


def _config(path: Path, **extra) -> DataConfig:
    return DataConfig(dataset_path=str(path), max_dynamic_patch=4, **extra)


def test_records_and_encoded_pairs_equal_the_mmpr_ones(trl_dirs, tiny_mmpr_dir, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("MPO_CACHE", str(tmp_path / "cache"))
    # to_parquet keeps the images' (absolute) paths, so the string rows need their image root.
    string = _config(trl_dirs / "string", image_root=str(tiny_mmpr_dir / "images"))
    records = read_dataset(_config(trl_dirs / "conversational"), None) + read_dataset(string, None)
    mmpr = load_records(DataConfig(meta_path=str(tiny_mmpr_dir / "meta.json"), max_dynamic_patch=4), seed=0)
    expected = [r for r in mmpr if Path(r.source.rpartition(":")[0]).stem in SUBSETS]
    assert len(records) == len(expected) == 16
    for got, want in zip(records, expected):
        assert (got.question, got.chosen, got.rejected) == (want.question, want.chosen, want.rejected)
        assert [Path(p).read_bytes() for p in got.images] == [Path(p).read_bytes() for p in want.images]
    # The string-prompt rows are the parquet file's (the test split's file is not read), rows from 0.
    parquet = trl_dirs / "string" / "train-00000-of-00001.parquet"
    assert [r.source for r in records[10:]] == [f"{parquet}:{i}" for i in range(6)]
    # save_to_disk embedded the images: they went to the content-addressed cache.
    assert all(Path(p).parent.parent == tmp_path / "cache" / "images" for r in records[:10] for p in r.images)
    assert records[10].images == expected[10].images
    processor = load_processor(ModelConfig(name_or_path=str(tiny_model_dir)))
    config = DataConfig(max_dynamic_patch=4, max_length=2048)
    ours, theirs = PreferenceDataset(records, processor, config), PreferenceDataset(expected, processor, config)
    for index in range(len(records)):
        a, b = ours[index], theirs[index]
        assert (a.prompt_ids, a.chosen_ids, a.rejected_ids) == (b.prompt_ids, b.chosen_ids, b.rejected_ids)
        assert torch.equal(a.pixel_values, b.pixel_values)


def test_split_files_of_a_directory(tmp_path):
    for name in ("data/train-00001-of-00002.parquet", "data/train-00000-of-00002.parquet", "data/test-00000-of-00001.parquet"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).touch()
    assert [p.name for p in data_files(tmp_path, "train")] == ["train-00000-of-00002.parquet", "train-00001-of-00002.parquet"]
    assert [p.name for p in data_files(tmp_path, "test")] == ["test-00000-of-00001.parquet"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: data\.dataset_path: no \.jsonl, \.json, \.parquet, \.arrow files"):
        data_files(tmp_path / "empty", "train")


def test_a_datasetdict_needs_an_existing_split(trl_dirs, tmp_path):
    rows = datasets.load_from_disk(str(trl_dirs / "conversational"))
    datasets.DatasetDict({"train": rows, "test": rows.select([0])}).save_to_disk(str(tmp_path / "dict"))
    assert len(data_files(tmp_path / "dict", "test")) == 1
    with pytest.raises(DataError, match=r"data\.dataset_split: no split 'validation'; it has \['test', 'train'\]"):
        data_files(tmp_path / "dict", "validation")


GOOD = {"prompt": "<image>\nQ?", "chosen": "yes", "rejected": "no", "images": [{"bytes": None, "path": "a.png"}]}


@pytest.mark.parametrize("change, message", [
    ({"rejected": None}, "rejected: missing (TRL's preference columns: prompt, chosen, rejected, images)"),
    ({"rejected": 3}, "rejected: expected a string or one assistant message, got 3"),
    ({"prompt": [{"role": "assistant", "content": "Q?"}]}, "prompt: expected the roles user after an optional system message, got assistant"),
    ({"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Q"}]}]},
     "prompt: has 2 image part(s) but 1 image(s) in images"),
    ({"prompt": "<image><image>\nQ?"}, "prompt: has 2 <image> placeholder(s) but 1 image(s)"),
    ({"images": [{"bytes": None, "path": "../outside.png"}]}, "images: path '../outside.png' is outside the image root"),
    ({"images": ["missing.png"]}, "images: file not found"),
    ({"images": [3]}, "images: expected an image (bytes or a path), got 3"),
    ({"chosen": "  "}, "chosen: empty response"),
    ({"chosen": [{"role": "assistant", "content": [{"type": "image"}]}]}, "chosen: an image part in a response"),
    ({"prompt": [{"role": "user", "content": [{"type": "video"}]}]}, "prompt: content: expected {'type': 'text', 'text': ...}"),
])
def test_bad_rows_name_file_row_and_column(tmp_path, change, message):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "outside.png").touch()
    root = tmp_path / "root"
    root.mkdir()
    (tmp_path / "a.png").rename(root / "a.png")
    with pytest.raises(DataError) as caught:
        parse_row("TRL", {**GOOD, **change}, str(tmp_path / "d.parquet"), 7, root, 6)
    assert str(caught.value).startswith(f"{tmp_path / 'd.parquet'}:7: {message}")


def test_missing_column_and_skipping(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    rows = [GOOD, {**GOOD, "chosen": ""}, GOOD]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    with pytest.raises(DataError, match=rf"^{tmp_path / 'd.parquet'}:1: chosen: empty response$"):
        read_dataset(_config(tmp_path / "d.parquet"), None)
    skipped: list[DataError] = []
    assert len(read_dataset(_config(tmp_path / "d.parquet"), skipped)) == 2
    assert [(e.line, e.field) for e in skipped] == [(1, "chosen")]
    datasets.Dataset.from_list([{"prompt": "Q", "chosen": "a"}]).to_parquet(str(tmp_path / "e.parquet"))
    with pytest.raises(DataError, match=r"e\.parquet: data\.dataset_path: columns \['chosen', 'prompt'\] are no preference format"):
        read_dataset(_config(tmp_path / "e.parquet"), None)


def test_a_trl_dataset_trains_like_its_mmpr_lines(trl_dirs, tiny_mmpr_dir, tiny_model_dir, tmp_path, monkeypatch, train_in_process):
    """One step on the conversational dataset logs the numbers of one step on the same 10 pairs
    read from their MMPR JSONL (same pair order: it depends on the seed and the count only)."""
    monkeypatch.setenv("MPO_CACHE", str(tmp_path / "cache"))
    def step(data: dict, out: Path) -> dict:
        recipe = recipe_from_dict({
            "model": {"name_or_path": str(tiny_model_dir), "dtype": "float32"},
            "data": {**data, "max_dynamic_patch": 4}, "output_dir": str(out), "seed": 3,
            "train": {"lr": 1e-3, "micro_batch_size": 2, "gradient_accumulation_steps": 2, "max_steps": 1, "mixed_precision": "no"},
        })
        train_in_process(recipe)
        return json.loads((out / "metrics.jsonl").read_text().splitlines()[0])

    ours = step({"dataset_path": str(trl_dirs / "conversational")}, tmp_path / "trl")
    theirs = step({"jsonl_path": str(tiny_mmpr_dir / "annotations" / f"{SUBSETS[0]}.jsonl"),
                   "image_root": str(tiny_mmpr_dir / "images")}, tmp_path / "mmpr")
    assert ours["loss/dpo"] == pytest.approx(math.log(2), abs=1e-6)  # step 1: policy == reference
    for key in ("loss", "loss/sft", "logps/chosen", "logps/rejected", "grad_norm"):
        assert ours[key] == pytest.approx(theirs[key], rel=1e-6), key
