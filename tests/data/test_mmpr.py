"""MMPR reading: one-line errors for bad input, repeat_time, system prompts, the data-root and path rules."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from mpo.config import DataConfig
from mpo.data.dataset import PreferenceDataset
from mpo.data.mmpr import read_meta
from mpo.data.records import load_records
from mpo.errors import DataError
from mpo.train.skip_log import SkipLog

GOOD = {"image": "ok.png", "question": "<image>\nHow many circles?", "chosen": "Two.\nFinal answer: 2",
        "rejected": "Three.\nFinal answer: 3"}
def _write(tmp_path: Path, lines: list, **meta_extra) -> tuple[DataConfig, Path]:
    """One subset ``bad`` (root ``images/``) whose JSONL holds ``lines`` (dicts or raw strings).

    ``images/ok.png`` and ``images/broken.png`` (not an image) exist; ``secret.png`` sits next
    to the root, outside it.
    """
    root = tmp_path / "images"
    root.mkdir()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(root / "ok.png")
    (root / "broken.png").write_bytes(b"this is not a png")
    Image.new("RGB", (64, 64)).save(tmp_path / "secret.png")
    annotation = tmp_path / "bad.jsonl"
    annotation.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"bad": {"root": "images", "annotation": "bad.jsonl", "repeat_time": 1, **meta_extra}}))
    return DataConfig(meta_path=str(meta)), annotation


def _error(tmp_path: Path, bad_line) -> DataError:
    """The error for ``bad_line`` placed as line 3, after a good line and a blank line."""
    config, _ = _write(tmp_path, [GOOD, "", bad_line])
    with pytest.raises(DataError) as caught:
        load_records(config, seed=0)
    return caught.value


# ---------------------------------------------------------------- bad input, one line each


@pytest.mark.parametrize(
    "bad_line, field, reason",
    [
        ('{"image": "ok.png", "question": "q", "chosen": "a"', "<line>", "malformed JSON (Expecting ',' delimiter at column 51)"),
        ('["not", "an", "object"]', "<line>", "expected a JSON object, got list"),
        ({k: v for k, v in GOOD.items() if k != "chosen"}, "chosen", "missing or empty"),
        ({k: v for k, v in GOOD.items() if k != "rejected"}, "rejected", "missing or empty"),
        ({**GOOD, "chosen": "   "}, "chosen", "missing or empty"),
        ({**GOOD, "image": ["ok.png", "ok.png"]}, "question", "has 1 <image> placeholder(s) but 2 image(s)"),
        ({**GOOD, "question": "<image> vs <image>"}, "question", "has 2 <image> placeholder(s) but 1 image(s)"),
        ({k: v for k, v in GOOD.items() if k != "image"}, "question", "has 1 <image> placeholder(s) but 0 image(s)"),
        ({**GOOD, "image": "../secret.png"}, "image", "path '../secret.png' is outside the image root"),
        ({**GOOD, "image": "/etc/hostname"}, "image", "path '/etc/hostname' is outside the image root"),
        ({**GOOD, "image": "missing.png"}, "image", "file not found"),
        ({**GOOD, "image": {"path": "ok.png"}}, "image", "expected a path or a list of paths"),
        ({**GOOD, "video": "clips/none", "question": "<video>\nq", "image": []}, "video", "file not found"),
    ],
)
def test_bad_record_gives_one_line_error_with_file_line_field(tmp_path, bad_line, field, reason):
    """Line 3 (a blank line 2 still counts), in the resolved annotation path."""
    error = _error(tmp_path, bad_line)
    annotation = str((tmp_path / "bad.jsonl").resolve())
    assert (error.file, error.line, error.field) == (annotation, 3, field)
    assert str(error).startswith(f"{annotation}:3: {field}: {reason}")
    assert "\n" not in str(error)


def test_skip_mode_collects_errors_and_keeps_good_records(tmp_path):
    lines = [GOOD, "{oops", {**GOOD, "image": "../secret.png"}, {**GOOD, "rejected": ""}, {**GOOD, "image": "ok.png"}]
    config, annotation = _write(tmp_path, lines)
    skipped: list[DataError] = []
    records = load_records(config, seed=0, skipped=skipped)
    assert [r.source.rsplit(":", 1)[1] for r in records] == ["1", "5"]
    assert [(e.line, e.field) for e in skipped] == [(2, "<line>"), (3, "image"), (4, "rejected")]
    assert SkipLog(tmp_path / "run", start_over=True).add(skipped) == skipped
    written = [json.loads(line) for line in (tmp_path / "run" / "skipped.jsonl").read_text().splitlines()]
    assert [(w["file"], w["line"], w["field"]) for w in written] == [
        (str(annotation.resolve()), 2, "<line>"), (str(annotation.resolve()), 3, "image"),
        (str(annotation.resolve()), 4, "rejected")]
    assert written[1]["error"].startswith("path '../secret.png' is outside the image root")


def test_meta_json_errors(tmp_path):
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"a": {"root": ".", "annotation": "a.jsonl", "repeat_time": 0}}))
    with pytest.raises(DataError, match=r"meta\.json: a\.repeat_time: must be a positive number, got 0"):
        read_meta(meta)
    meta.write_text(json.dumps({"a": {"annotation": "a.jsonl"}}))
    with pytest.raises(DataError, match=r"meta\.json: a\.root: missing or not a string"):
        read_meta(meta)
    meta.write_text('{"a": {"root": ".",\n "annotation": }}')
    with pytest.raises(DataError, match=r"meta\.json:2: invalid JSON"):
        read_meta(meta)
    with pytest.raises(DataError, match="annotation file not found"):
        load_records(DataConfig(meta_path=str(_meta(tmp_path / "m2", {"x": {"root": ".", "annotation": "none.jsonl"}}))), 0)


def _meta(directory: Path, spec: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "meta.json").write_text(json.dumps(spec))
    return directory / "meta.json"


# ---------------------------------------------------------------- meta.json semantics


def test_tiny_mmpr_paths_resolve_relative_to_meta_json(tiny_mmpr_dir):
    """24 pairs; per-subset max_dynamic_patch (4 for shapes) overrides data.max_dynamic_patch."""
    records = load_records(DataConfig(meta_path=str(tiny_mmpr_dir / "meta.json"), max_dynamic_patch=6), seed=0)
    assert len(records) == 24
    assert records[0].images == [str((tiny_mmpr_dir / "images" / "shapes_00.png").resolve())]
    assert len(records[10].images) == 2 and records[16].images == [] and records[16].video is None
    assert records[21].video == str((tiny_mmpr_dir / "videos" / "clip0").resolve())
    assert [r.max_dynamic_patch for r in records[9:11]] == [4, 6]


def _subset_meta(tmp_path: Path, tiny_mmpr_dir: Path, repeat_time: float) -> DataConfig:
    """The 10-pair shapes subset of the tiny MMPR, with another repeat_time (absolute paths)."""
    spec = {"shapes": {"root": str(tiny_mmpr_dir / "images"), "repeat_time": repeat_time,
                       "annotation": str(tiny_mmpr_dir / "annotations" / "shapes_pairs_vqa_correctness_rules.jsonl")}}
    return DataConfig(meta_path=str(_meta(tmp_path / f"r{repeat_time}", spec)))


def _lines(records) -> list[int]:
    return [int(r.source.rsplit(":", 1)[1]) for r in records]


def test_fractional_repeat_time_samples_a_seeded_subset(tmp_path, tiny_mmpr_dir):
    """0.5 of 10 lines -> exactly int(5.0) = 5, 0.25 -> int(2.5) = 2; distinct lines in file
    order; the same seed gives the same lines, and the sample follows the seed."""
    config = _subset_meta(tmp_path, tiny_mmpr_dir, 0.5)
    first = _lines(load_records(config, seed=0))
    assert len(first) == 5 and first == sorted(set(first))
    assert set(first) <= set(range(1, 11))
    assert _lines(load_records(config, seed=0)) == first
    samples = {tuple(_lines(load_records(config, seed=s))) for s in range(6)}
    assert len(samples) > 1
    assert len(load_records(_subset_meta(tmp_path, tiny_mmpr_dir, 0.25), seed=0)) == 2


def test_repeat_time_two_doubles(tmp_path, tiny_mmpr_dir):
    """2 -> every line twice (20 records); 2.7 -> int(2.7) = 2 times as well."""
    for repeat in (2, 2.7):
        lines = _lines(load_records(_subset_meta(tmp_path, tiny_mmpr_dir, repeat), seed=0))
        assert len(lines) == 20
        assert sorted(lines) == sorted(list(range(1, 11)) * 2)


def test_jsonl_mode_and_missing_placeholders(tmp_path):
    """A plain JSONL with ``image_root``; a one-image question without ``<image>`` gets
    ``<image>\\n`` prepended, a two-image one gets ``Image-1: <image>\\nImage-2: <image>\\n``."""
    _write(tmp_path, [])
    jsonl = tmp_path / "plain.jsonl"
    jsonl.write_text(json.dumps({**GOOD, "question": "Count."}) + "\n"
                     + json.dumps({**GOOD, "image": ["ok.png", "ok.png"], "question": "Compare."}) + "\n")
    records = load_records(DataConfig(jsonl_path=str(jsonl), image_root=str(tmp_path / "images")), seed=0)
    assert records[0].question == "<image>\nCount."
    assert records[1].question == "Image-1: <image>\nImage-2: <image>\nCompare."
    assert records[0].source == f"{jsonl}:1"


# ---------------------------------------------------------------- encoding: tiles, video, length


# ---------------------------------------------------------------- the released MMPR-v1.2 layout


def _mmpr_v12(parent: Path) -> Path:
    """``parent/MMPR-v1.2/`` laid out as the download is: meta.json's root and annotation are
    relative to ``parent`` (the official scripts' working directory), not to meta.json's folder."""
    dataset = parent / "MMPR-v1.2"
    name = "ai2d_train_12k_en_20240410_extracted_pairs_vqa_correctness_rules"
    images = dataset / "images" / "AI2D" / "abc_images"
    images.mkdir(parents=True)
    Image.new("RGB", (64, 48), (20, 200, 20)).save(images / "1001.png")
    (dataset / "annotations").mkdir()
    line = {"image": "1001.png", "question": "<image>\nWhich label is the sun?\nA. A\nB. B", "chosen": "It is A.\nFinal answer: A",
            "rejected": "It is B.\nFinal answer: B"}
    (dataset / "annotations" / f"{name}.jsonl").write_text(json.dumps(line) + "\n")
    meta = {name: {"root": "MMPR-v1.2/images/AI2D/abc_images", "annotation": f"MMPR-v1.2/annotations/{name}.jsonl",
                   "data_augment": False, "repeat_time": 1, "length": 1}}
    (dataset / "meta.json").write_text(json.dumps(meta, indent=2))
    return dataset / "meta.json"


def test_released_mmpr_v12_layout_loads(tmp_path, monkeypatch):
    """Old: `.../MMPR-v1.2/MMPR-v1.2/annotations/...: annotation file not found`. The paths are
    found from meta.json's parent; with the shipped 1B recipe's own relative meta_path too."""
    meta = _mmpr_v12(tmp_path)
    (record,) = load_records(DataConfig(meta_path=str(meta)), seed=0)
    assert record.images == [str(tmp_path / "MMPR-v1.2" / "images" / "AI2D" / "abc_images" / "1001.png")]
    assert record.source.startswith(str(tmp_path / "MMPR-v1.2" / "annotations" / "ai2d_train"))
    from mpo.config import load_recipe

    monkeypatch.chdir(tmp_path)
    recipe = load_recipe(Path(__file__).resolve().parents[2] / "recipes" / "internvl3_1b_mpo.yaml")
    assert recipe.data.meta_path == "MMPR-v1.2/meta.json"
    assert len(load_records(recipe.data, recipe.seed)) == 1


def test_data_root_names_where_relative_paths_start(tmp_path):
    """data.data_root is the only place tried when set; every place tried is named when the
    annotation is in none of them."""
    meta = _mmpr_v12(tmp_path / "datasets")
    assert len(load_records(DataConfig(meta_path=str(meta), data_root=str(tmp_path / "datasets")), seed=0)) == 1
    with pytest.raises(DataError) as wrong_root:
        load_records(DataConfig(meta_path=str(meta), data_root=str(tmp_path)), seed=0)
    name = "ai2d_train_12k_en_20240410_extracted_pairs_vqa_correctness_rules"
    assert str(wrong_root.value) == (f"{meta}: {name}.annotation: annotation file not found; tried "
                                     f"{tmp_path}/MMPR-v1.2/annotations/{name}.jsonl")
    (meta.parent / "annotations" / f"{name}.jsonl").unlink()
    with pytest.raises(DataError) as nowhere:
        load_records(DataConfig(meta_path=str(meta)), seed=0)
    assert str(nowhere.value).endswith(f"annotation file not found; tried {meta.parent}/MMPR-v1.2/annotations/{name}.jsonl, "
                                       f"{tmp_path}/datasets/MMPR-v1.2/annotations/{name}.jsonl")


# ---------------------------------------------------------------- the path rule: as written


def _linked_dataset(tmp_path: Path) -> tuple[Path, Path]:
    """``(data, elsewhere)``: ``data/images/photos -> elsewhere/photos`` (a folder outside the
    data, as on clusters: ``images -> /mnt/datasets/...``), ``data/images/one.png ->
    elsewhere/one.png``, and ``data/linked -> elsewhere/photos`` to use as a subset's root."""
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "photos").mkdir(parents=True)
    Image.new("RGB", (64, 64), (9, 90, 200)).save(elsewhere / "photos" / "p.png")
    Image.new("RGB", (64, 64), (9, 90, 200)).save(elsewhere / "one.png")
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "images" / "photos").symlink_to(elsewhere / "photos")
    (data / "images" / "one.png").symlink_to(elsewhere / "one.png")
    (data / "linked").symlink_to(elsewhere / "photos")
    return data, elsewhere


def _records(data: Path, root: str, lines: list[dict], skipped=None):
    (data / "a.jsonl").write_text("".join(json.dumps({**GOOD, **line}) + "\n" for line in lines))
    (data / "meta.json").write_text(json.dumps({"s": {"root": root, "annotation": "a.jsonl"}}))
    return load_records(DataConfig(meta_path=str(data / "meta.json")), seed=0, skipped=skipped)


def test_symlinks_inside_the_root_are_the_users(tmp_path):
    """Old: `path 'photos/p.png' is outside the image root` (the link was resolved first). The
    paths stay as written (links not resolved), so the pipeline's output and the trainer agree."""
    data, _ = _linked_dataset(tmp_path)
    records = _records(data, "images", [{"image": "photos/p.png"}, {"image": "one.png"},
                                        {"image": str(data / "images" / "photos" / "p.png")}])
    assert [r.images for r in records] == [[str(data / "images" / "photos" / "p.png")], [str(data / "images" / "one.png")],
                                           [str(data / "images" / "photos" / "p.png")]]
    (record,) = _records(data, "linked", [{"image": "p.png"}])
    assert record.images == [str(data / "linked" / "p.png")]


@pytest.mark.parametrize(
    "image, reason",
    [
        ("../secret.png", "path '../secret.png' is outside the image root {root}: '..' is not allowed"),
        ("photos/../../secret.png", "path 'photos/../../secret.png' is outside the image root {root}: '..' is not allowed"),
        ("photos/../one.png", "path 'photos/../one.png' is outside the image root {root}: '..' is not allowed"),
        ("{elsewhere}/photos/p.png", "path '{elsewhere}/photos/p.png' is outside the image root {root}"),
        ("/etc/hostname", "path '/etc/hostname' is outside the image root {root}"),
    ],
)
def test_paths_escaping_the_root_as_written_are_refused(tmp_path, image, reason):
    """No `..` component (through a link it would climb out of the link's target), no absolute
    path outside the root as written, even one that the root's links lead to."""
    data, elsewhere = _linked_dataset(tmp_path)
    image = image.format(elsewhere=elsewhere)
    skipped: list[DataError] = []
    assert _records(data, "images", [{"image": image}, {"image": "one.png"}], skipped)[0].source.endswith(":2")
    (error,) = skipped
    assert (error.line, error.field) == (1, "image")
    assert error.reason == reason.format(root=data / "images", elsewhere=elsewhere)


def test_corrupt_image_is_reported_lazily(tmp_path, tiny_processor):
    """A file that exists but does not decode passes the up-front checks; decoding it in
    ``__getitem__`` returns (not raises) a DataError naming the file, line and field."""
    config, annotation = _write(tmp_path, [GOOD, {**GOOD, "image": "broken.png"}])
    dataset = PreferenceDataset(load_records(config, seed=0), tiny_processor, config)
    assert len(dataset) == 2
    error = dataset[1]
    assert isinstance(error, DataError)
    assert (error.file, error.line, error.field) == (str(annotation.resolve()), 2, "image")
    assert str(error).startswith(f"{annotation.resolve()}:2: image: cannot decode image")
    assert not isinstance(dataset[0], DataError)
