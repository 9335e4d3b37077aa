"""Bad input in the trainer: every class ends in one line naming file, line and field, or, in skip
mode, in exactly one entry of ``skipped.jsonl``; benign oddities train. ``mpo validate`` finds
what only decoding finds before a run starts. (The pipeline's side: ``test_pipeline_inputs.py``.)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from media_files import exif_rotated, header_only_png, truncated_png, write_clip
from PIL import Image

from mpo.config import DataConfig, recipe_from_dict
from mpo.data.dataset import PreferenceDataset
from mpo.data.records import load_records
from mpo.errors import DataError

GOOD = {"image": "ok.png", "question": "<image>\nHow many circles?", "chosen": "Two.\nFinal answer: 2",
        "rejected": "Three.\nFinal answer: 3"}


def _dataset(tmp_path: Path, lines: list, **meta_extra) -> tuple[DataConfig, Path]:
    """Subset ``s`` (root ``images/``) whose JSONL holds ``lines`` (dicts, str, or raw bytes)."""
    root = tmp_path / "images"
    root.mkdir(exist_ok=True)
    Image.new("RGB", (64, 64), (200, 30, 30)).save(root / "ok.png")
    annotation = tmp_path / "s.jsonl"
    annotation.write_bytes(b"".join((line if isinstance(line, bytes) else
                                     (line if isinstance(line, str) else json.dumps(line)).encode()) + b"\n" for line in lines))
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"s": {"root": "images", "annotation": "s.jsonl", "repeat_time": 1, **meta_extra}}))
    return DataConfig(meta_path=str(meta)), annotation


def _load_error(config: DataConfig) -> DataError:
    with pytest.raises(DataError) as caught:
        load_records(config, seed=0)
    assert "\n" not in str(caught.value)
    return caught.value


LATIN1 = '{"image": "ok.png", "question": "<image>\\nCaf\xe9?", "chosen": "a", "rejected": "b"}'.encode("latin-1")


@pytest.mark.parametrize(
    "line, field, message",
    [
        (LATIN1, "<line>", "not UTF-8 (byte 0xe9 at column 46); re-encode the file as UTF-8"),
        ({**GOOD, "rejected": GOOD["chosen"] + "  "}, "rejected", "same text as chosen: the pair has nothing to prefer"),
        ({**GOOD, "image": "empty.png"}, "image", "is an empty file (0 bytes)"),
        ({**GOOD, "image": "folder.png"}, "image", "is a directory, not an image file"),
    ],
    ids=["latin-1", "chosen-equals-rejected", "zero-byte", "directory-named-like-an-image"],
)
def test_bad_line_is_one_line_error_or_one_skip(tmp_path, line, field, message):
    """Old: a UnicodeDecodeError traceback; an identical pair, a zero-byte file and a directory
    accepted (the last two found only when their batch came up). Skip mode keeps lines 1 and 3."""
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "empty.png").write_bytes(b"")
    (tmp_path / "images" / "folder.png").mkdir()
    config, annotation = _dataset(tmp_path, [GOOD, line, GOOD])
    error = _load_error(config)
    assert (error.file, error.line, error.field) == (str(annotation), 2, field)
    assert error.reason.endswith(message)
    skipped: list[DataError] = []
    assert [r.source for r in load_records(config, 0, skipped)] == [f"{annotation}:1", f"{annotation}:3"]
    assert [(e.line, e.field) for e in skipped] == [(2, field)]


def test_annotation_that_is_a_directory(tmp_path):
    """Old: IsADirectoryError traceback, in skip mode too."""
    config, annotation = _dataset(tmp_path, [GOOD])
    annotation.unlink()
    annotation.mkdir()
    error = _load_error(config)
    assert str(error) == f"{annotation}: annotation file is a directory, not a JSONL file"
    with pytest.raises(DataError, match="is a directory"):
        load_records(config, 0, skipped=[])


@pytest.mark.parametrize(
    "value, message",
    [("6", "must be a positive integer, got '6'"), (0, "must be a positive integer, got 0"),
     (True, "must be a positive integer, got True"), (2.5, "must be a positive integer, got 2.5")],
)
def test_meta_max_dynamic_patch_must_be_a_positive_integer(tmp_path, value, message):
    """Old: "6" reached the processor as a string (a traceback at the first batch); 0 was quietly
    taken as the recipe's default."""
    config, _ = _dataset(tmp_path, [GOOD], max_dynamic_patch=value)
    error = _load_error(config)
    assert str(error) == f"{tmp_path / 'meta.json'}: s.max_dynamic_patch: {message}"


def test_recipe_tile_budget_and_limits_must_be_positive(tmp_path):
    base = {"model": {"name_or_path": "x"}, "data": {"meta_path": "m.json"}}
    for key in ("max_dynamic_patch", "max_image_pixels", "video_frames", "max_length"):
        recipe = {**base, "data": {**base["data"], key: 0}}
        with pytest.raises(DataError, match=f"data.{key}: must be at least 1, got 0"):
            recipe_from_dict(recipe, source="r.yaml")


def test_repeat_time_that_keeps_no_record(tmp_path):
    """0.2 of 3 lines: int(0.6) = 0 records. Old: the subset silently contributed nothing."""
    config, _ = _dataset(tmp_path, [GOOD, GOOD, GOOD], repeat_time=0.2)
    error = _load_error(config)
    assert str(error) == (f"{tmp_path / 'meta.json'}: s.repeat_time: repeat_time 0.2 of 3 record(s) keeps none "
                          "(int(0.6) = 0); raise it or leave the subset out")


def test_empty_annotation_is_an_error(tmp_path):
    config, annotation = _dataset(tmp_path, [])
    assert str(_load_error(config)) == f"{annotation}: annotation file has no records"


def test_very_large_image_is_a_bad_record_not_a_crash(tmp_path, tiny_processor):
    """A header claiming 20000 x 20000 pixels, found when its pair is encoded: the item is a
    DataError naming file, line and field (old: DecompressionBombError with no file or line, which
    killed the run in skip mode too). Raised above it, data.max_image_pixels lets it through to
    the decoder."""
    config, annotation = _dataset(tmp_path, [GOOD, {**GOOD, "image": "huge.png"}])
    header_only_png(tmp_path / "images" / "huge.png", 20000, 20000)
    item = PreferenceDataset(load_records(config, 0), tiny_processor, config)[1]
    assert isinstance(item, DataError)
    assert (item.file, item.line, item.field) == (str(annotation), 2, "image")
    assert "is 20000x20000 = 400,000,000 pixels, more than data.max_image_pixels (89,478,485)" in item.reason
    raised = DataConfig(meta_path=config.meta_path, max_image_pixels=10**9)
    assert "cannot decode image" in PreferenceDataset(load_records(raised, 0), tiny_processor, raised)[1].reason


def test_benign_oddities_train(tmp_path, tiny_processor):
    """CRLF line ends, a byte-order mark, a 1x1 image, an EXIF-rotated photo, an image at exactly
    the pixel limit: every pair encodes. The rotated 4x2 photo is tiled upright (2x4: one tile)."""
    config, annotation = _dataset(tmp_path, [])
    Image.new("RGB", (1, 1), (9, 9, 9)).save(tmp_path / "images" / "dot.png")
    exif_rotated(tmp_path / "images" / "phone.jpg")
    Image.new("RGB", (300, 200)).save(tmp_path / "images" / "big.png")
    lines = [GOOD, {**GOOD, "image": "dot.png"}, {**GOOD, "image": "phone.jpg"}, {**GOOD, "image": "big.png"}]
    annotation.write_bytes(b"\xef\xbb\xbf" + b"".join(json.dumps(line).encode() + b"\r\n" for line in lines))
    config = DataConfig(meta_path=config.meta_path, max_image_pixels=300 * 200)
    dataset = PreferenceDataset(load_records(config, 0), tiny_processor, config)
    pairs = [dataset[i] for i in range(4)]
    assert not any(isinstance(p, DataError) for p in pairs)
    assert [p.source.rsplit(":", 1)[1] for p in pairs] == ["1", "2", "3", "4"]


# ---------------------------------------------------------------- mpo validate


def _broken_dataset(tmp_path: Path) -> tuple[Path, Path, dict]:
    """A copy of the example data with 9 bad records, and what each should be reported as.

    Lines found when reading (6): not JSON, not UTF-8, chosen == rejected, missing rejected, an
    image outside the root, a zero-byte image. Found only by decoding (3): an undecodable image, a
    too-large image (header), a corrupt video (the first of its subset, so an epoch of 16 pairs
    meets it).
    """
    data = tmp_path / "data"
    shutil.copytree(Path(__file__).resolve().parents[2] / "examples" / "tiny_mmpr", data)
    shapes = data / "annotations" / "shapes_pairs_vqa_correctness_rules.jsonl"
    lines = shapes.read_bytes().splitlines()
    record = json.loads(lines[0])
    lines[1] = b"{not json"
    lines[2] = json.dumps(record).replace("How many", "H\\u00f6w many").encode().replace(b"\\u00f6", "\xf6".encode("latin-1"))
    lines[3] = json.dumps({**record, "rejected": record["chosen"]}).encode()
    lines[4] = json.dumps({k: v for k, v in record.items() if k != "rejected"}).encode()
    lines[5] = json.dumps({**record, "image": "../meta.json"}).encode()
    lines[6] = json.dumps({**record, "image": "zero.png"}).encode()
    lines[7] = json.dumps({**record, "image": "corrupt.png"}).encode()
    lines[8] = json.dumps({**record, "image": "huge.png"}).encode()
    shapes.write_bytes(b"\n".join(lines) + b"\n")
    (data / "images" / "zero.png").write_bytes(b"")
    (data / "images" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    header_only_png(data / "images" / "huge.png", 20000, 20000)
    video = data / "annotations" / "video_pairs_vqa_correctness_rules.jsonl"
    clips = video.read_text().splitlines()
    clips[0] = json.dumps({**json.loads(clips[0]), "video": "videos/broken.mp4"})
    video.write_text("\n".join(clips) + "\n")
    good = write_clip(tmp_path / "good.mp4", 20)
    (data / "videos" / "broken.mp4").write_bytes(good.read_bytes()[:300])
    expected = {
        (shapes, 2): "<line>", (shapes, 3): "<line>", (shapes, 4): "rejected", (shapes, 5): "rejected",
        (shapes, 6): "image", (shapes, 7): "image", (shapes, 8): "image", (shapes, 9): "image", (video, 1): "video",
    }
    return data, shapes, expected


def _recipe(tiny_model_dir: Path, data: Path, out: Path, **data_extra) -> dict:
    return {
        "model": {"name_or_path": str(tiny_model_dir), "dtype": "float32"},
        "data": {"meta_path": str(data / "meta.json"), "max_dynamic_patch": 4, "video_frames": 4, "shuffle": False, **data_extra},
        "train": {"lr": 1e-3, "micro_batch_size": 4, "gradient_accumulation_steps": 2, "max_steps": 2,
                  "mixed_precision": "no", "warmup_ratio": 0.0},
        "output_dir": str(out),
    }


def test_validate_reports_every_bad_record(tiny_model_dir, tmp_path, capsys):
    """``mpo validate``: the 9 bad records, one line each, in file order, the report file, exit 1;
    the 3 found by decoding are the ones that used to surface only when their batch came up."""
    from mpo.cli.main import main

    data, _, expected = _broken_dataset(tmp_path)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps(_recipe(tiny_model_dir, data, tmp_path / "run")))
    assert main(["validate", str(recipe), "--workers", "3", "--report", str(tmp_path / "report.jsonl")]) == 2
    out, err = capsys.readouterr()
    printed = out.strip().splitlines()
    assert len(printed) == 9
    assert [(e["file"], e["line"], e["field"]) for e in map(json.loads, (tmp_path / "report.jsonl").read_text().splitlines())] \
        == [(str(f), n, field) for (f, n), field in sorted(expected.items(), key=lambda kv: (str(kv[0][0]), kv[0][1]))]
    assert any("is 20000x20000 = 400,000,000 pixels" in line for line in printed)
    assert any(":1: video: cannot decode video" in line for line in printed)
    assert "validate: 24 record(s), 16 image(s) and 3 video(s) checked (headers)" in err
    assert err.strip().splitlines()[-1] == f"error: {data / 'meta.json'}: 9 bad record(s), listed above"
    assert main(["validate", str(recipe), "--workers", "2", "--full", "--no-progress"]) == 2
    assert len(capsys.readouterr().out.strip().splitlines()) == 9


def test_validation_at_start_up_stops_before_training(tiny_model_dir, tmp_path, train_in_process):
    """``data.validate: true`` in error mode: the run stops before its first step, listing all."""
    data, shapes, _ = _broken_dataset(tmp_path)
    lines = shapes.read_bytes().splitlines()
    shapes.write_bytes(b"\n".join(lines[:1] + lines[7:]) + b"\n")  # only the 3 decode-time problems left
    with pytest.raises(DataError, match="3 record\\(s\\) use a bad image or video"):
        train_in_process(_recipe(tiny_model_dir, data, tmp_path / "run", validate=True))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def _skipped(out: Path) -> list[tuple[str, int]]:
    return [(Path(e["file"]).name, e["line"]) for e in map(json.loads, (out / "skipped.jsonl").read_text().splitlines())]


@pytest.mark.slow
def test_two_processes_skip_each_bad_record_once(launch_env, tiny_model_dir, tmp_path, launch, launch_probe):
    """Under DDP (2 processes, 2 epochs of 4-pair steps): ``data.validate`` splits the header
    checks between the processes and both drop the same 3 records at start-up; a truncated PNG
    (its header is fine) is met lazily by one process or the other, in both epochs. skipped.jsonl
    lists the 10 bad records once each."""

    data, shapes, expected = _broken_dataset(tmp_path)
    (data / "images" / "shapes_09.png").write_bytes(truncated_png())  # line 10's image
    out = tmp_path / "run"
    recipe = tmp_path / "r.yaml"
    spec = _recipe(tiny_model_dir, data, out, on_bad_sample="skip", validate=True)
    spec["train"].update(micro_batch_size=1, gradient_accumulation_steps=2, max_steps=6)
    recipe.write_text(json.dumps(spec))
    launch(launch_env, "ddp.yaml", [str(launch_probe), str(recipe)], [])
    assert sorted(_skipped(out)) == sorted([(f.name, n) for f, n in expected] + [(shapes.name, 10)])


def test_skip_report_lists_each_bad_record_once_across_resumes(tiny_model_dir, tmp_path, train_in_process):
    """9 bad records, skip mode, 2 steps of 8 pairs (the 3 found lazily come up in both epochs),
    a checkpoint, then a resume to step 4 (epoch 2 meets them again). skipped.jsonl holds 9
    entries and every count reads 9. Old: 18 entries after the resume and a count of 12. (With
    data.validate: the two-process test below.)"""
    data, _, expected = _broken_dataset(tmp_path)
    recipe = _recipe(tiny_model_dir, data, tmp_path / "run", on_bad_sample="skip")
    recipe["train"].update(save_every=1, keep_last=5)
    first = train_in_process(recipe)
    assert sorted(_skipped(tmp_path / "run")) == sorted((f.name, n) for f, n in expected)
    assert first.skip_log.count == 9
    recipe["train"]["max_steps"] = 4
    resumed = train_in_process({**recipe, "resume_from": "latest"})
    assert resumed.step == 4
    assert sorted(_skipped(tmp_path / "run")) == sorted((f.name, n) for f, n in expected)
    state = json.loads((tmp_path / "run" / "checkpoints" / "step-00000004" / "trainer_state.json").read_text())
    assert state["skipped"] == resumed.skip_log.count == 9
