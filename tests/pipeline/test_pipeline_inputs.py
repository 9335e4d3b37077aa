"""Bad input in ``mpo-data``: the trainer's rules at the pipeline's first stage, one-line errors or
counted skips, a build that writes nothing fails, and the tiles and pixels match the trainer's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from data_pipeline.__main__ import main
from data_pipeline.backends import TransformersBackend
from data_pipeline.build import Summary
from data_pipeline.records import read_log
from mpo.config import DataConfig
from mpo.data.dataset import PreferenceDataset
from mpo.data.records import load_records
from mpo.errors import DataError
from media_files import header_only_png

LATIN1 = '{"image": "a.png", "question": "Caf\xe9?", "answer": "1"}'.encode("latin-1")


def _workspace(tmp_path: Path, lines: list) -> tuple[Path, Path]:
    """``images/`` with a.png, a 20000x20000-pixel header (huge.png), a zero-byte empty.png, a
    directory folder.png and a symlinked folder ``linked -> ../elsewhere`` holding b.png;
    ``q.jsonl`` with ``lines`` (dicts or bytes)."""
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (64, 64), (200, 40, 40)).save(images / "a.png")
    header_only_png(images / "huge.png", 20000, 20000)
    (images / "empty.png").write_bytes(b"")
    (images / "folder.png").mkdir()
    (tmp_path / "elsewhere").mkdir()
    Image.new("RGB", (64, 64), (40, 40, 200)).save(tmp_path / "elsewhere" / "b.png")
    (images / "linked").symlink_to(tmp_path / "elsewhere")
    Image.new("RGB", (8, 8)).save(tmp_path / "secret.png")
    questions = tmp_path / "q.jsonl"
    questions.write_bytes(b"".join((line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n" for line in lines))
    return questions, images


def _sample_args(questions: Path, images: Path, out: Path, model: Path, *extra: str) -> list[str]:
    return ["sample", "--input", str(questions), "--image-root", str(images), "--out", str(out), "--model", str(model),
            "--no-progress", "--batch-size", "1", *extra]


@pytest.mark.parametrize(
    "line, field, reason",
    [
        (LATIN1, "<line>", "not UTF-8 (byte 0xe9 at column 36); re-encode the file as UTF-8"),
        ({"image": "huge.png", "question": "Q?", "answer": "1"}, "image",
         "is 20000x20000 = 400,000,000 pixels, more than data.max_image_pixels (89,478,485); raise that setting to accept it"),
        ({"image": "../secret.png", "question": "Q?", "answer": "1"}, "image",
         "path '../secret.png' is outside the image root {images}: '..' is not allowed"),
        ({"image": "{tmp}/secret.png", "question": "Q?", "answer": "1"}, "image",
         "path '{tmp}/secret.png' is outside the image root {images}"),
        ({"image": "empty.png", "question": "Q?", "answer": "1"}, "image", "cannot identify image file '{images}/empty.png'"),
        ({"image": "folder.png", "question": "Q?", "answer": "1"}, "image", "{images}/folder.png is a directory, not an image file"),
    ],
    ids=["latin-1", "oversized", "dot-dot", "absolute-outside", "zero-byte", "directory"],
)
def test_bad_input_line_stops_in_one_line_or_is_skipped(tmp_path, capsys, line, field, reason):
    """Old: the Latin-1 line and the oversized image ended as "unexpected error" with no file or
    line and --skip-bad did not skip them; the images outside the root were sampled and paired."""
    if isinstance(line, dict):
        line = {**line, "image": line["image"].format(tmp=tmp_path)}
    reason = reason.format(images=tmp_path / "images", tmp=tmp_path)
    questions, images = _workspace(tmp_path, [line, {"image": "a.png", "question": "Q?", "answer": "1"}])
    args = _sample_args(questions, images, tmp_path / "s.jsonl", tmp_path / "no-model")
    assert main(args) == 2
    (err,) = capsys.readouterr().err.strip().splitlines()
    assert err.startswith(f"mpo-data: error: {questions}:1: {field}: ") and err.endswith(reason)
    # Skipped: listed and counted; the good line then needs the model, which does not exist (a
    # failure while running, exit 1, not bad input).
    assert main([*args, "--skip-bad"]) == 1
    err = capsys.readouterr().err
    assert "cannot load model" in err.strip().splitlines()[-1] and "Traceback" not in err
    if field == "<line>":  # found while reading the input: printed as skipped, never reaches the log
        assert f"skipped: {questions}:1: <line>: {reason}" in err
    else:  # found by the sample stage's first pass: a "skipped" line of its log
        (listed,) = [r for r in read_log(tmp_path / "s.jsonl") if "skipped" in r]
        assert listed["line"] == 1 and listed["skipped"].startswith(f"{questions}:1: image: ")
        assert listed["skipped"].endswith(reason)


def test_the_trainer_and_the_pipeline_judge_paths_alike(tmp_path):
    """The same paths under the same root: accepted by both or refused by both, same reason."""
    from data_pipeline.records import Question
    from data_pipeline.sample import image_paths

    _, images = _workspace(tmp_path, [])
    for path in ["a.png", "linked/b.png", str(images / "a.png"), "../secret.png", "linked/../a.png", str(tmp_path / "secret.png")]:
        question = Question("1", "d", (path,), "Q?", "1", 1, "q.jsonl")
        try:
            pipeline = str(image_paths(question, images, 10**8)[0])
        except DataError as error:
            pipeline = error.reason
        (tmp_path / "t.jsonl").write_text(json.dumps({"image": path, "question": "Q?", "chosen": "a", "rejected": "b"}) + "\n")
        skipped: list[DataError] = []
        records = load_records(DataConfig(jsonl_path=str(tmp_path / "t.jsonl"), image_root=str(images)), 0, skipped)
        trainer = records[0].images[0] if records else skipped[0].reason
        assert pipeline == trainer, path


def test_empty_input_fails_and_writes_no_meta(tmp_path, capsys, tiny_model_dir):
    """Old: exit 0 and meta.json holding {}."""
    questions, images = _workspace(tmp_path, [])
    out = tmp_path / "out"
    args = ["build", "--input", str(questions), "--image-root", str(images), "--out-dir", str(out), "--model",
            str(tiny_model_dir), "--no-progress"]
    assert main(args) == 2
    assert capsys.readouterr().err.strip() == f"mpo-data: error: {questions}: nothing to do: the file has no questions"
    assert not (out / "meta.json").exists()
    questions.write_bytes(LATIN1 + b"\n")
    assert main([*args, "--skip-bad"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"mpo-data: error: {questions}: nothing to do: every line is bad (1 skipped, listed above)")


def test_build_that_writes_no_pair_fails_saying_why(tmp_path, capsys, tiny_model_dir):
    """The random tiny model never writes "Final answer:": all 4 responses unparsable, no pair.
    Old: exit 0 with meta.json {}. Bad lines are skipped and listed in bad_inputs.jsonl."""
    lines = [{"id": "q1", "image": "a.png", "question": "How many?", "answer": "3"}, LATIN1,
             {"id": "q3", "image": "linked/b.png", "question": "How many?", "answer": "2"},
             {"id": "q4", "image": "huge.png", "question": "How many?", "answer": "1"}]
    questions, images = _workspace(tmp_path, lines)
    out = tmp_path / "out"
    args = ["build", "--input", str(questions), "--image-root", str(images), "--out-dir", str(out), "--model",
            str(tiny_model_dir), "--no-progress", "--num-samples", "2", "--max-new-tokens", "4", "--skip-bad"]
    assert main(args) == 2
    captured = capsys.readouterr()
    assert "questions: 2   samples: 4   parse failures: 4   bad inputs skipped: 2" in captured.out
    assert captured.err.strip().splitlines()[-1] == (
        f"mpo-data: error: {questions}: wrote 0 pairs: every response is unparsable (4 of 4): the model does not "
        "answer in the format the prompt asks for (see --prompt / --template)")
    assert not (out / "meta.json").exists()
    bad = [json.loads(x) for x in (out / "work" / "q" / "bad_inputs.jsonl").read_text().splitlines()]
    assert [(b["line"], b["message"].split(": ")[1]) for b in bad] == [(2, "<line>"), (4, "image")]


def _summary(**counts) -> Summary:
    datasets = {"d": {"checkable_questions": counts.pop("checkable", 0), "substring_skipped": 0, "empty_responses": 0}}
    return Summary(datasets=datasets, resample_path="r.jsonl", **counts)


@pytest.mark.parametrize(
    "summary, reason",
    [
        (_summary(), "the input has no questions"),
        (_summary(bad_inputs=["x", "y"]), "every input line is bad (2 skipped)"),
        (_summary(questions=3, samples=12, parse_failures=12, checkable=3, all_wrong=3),
         "every response is unparsable (12 of 12)"),
        (_summary(questions=3, samples=12, parse_failures=1, checkable=3, all_correct=3),
         "every response is right: all 3 question(s) are all-correct, which gives no pairs"),
        (_summary(questions=3, samples=12, parse_failures=2, checkable=3, all_wrong=3),
         "no response is right: all 3 question(s) are all-wrong (written for re-sampling to r.jsonl)"),
        (_summary(questions=3, samples=12, checkable=3, all_wrong=1, all_correct=2),
         "2 question(s) all-correct, 1 all-wrong, 0 pair(s) skipped as substrings"),
    ],
    ids=["empty", "all-bad", "all-unparsable", "all-right", "all-wrong", "mixed"],
)
def test_no_pairs_reason(summary, reason):
    assert summary.pairs == 0
    assert summary.no_pairs_reason().startswith(reason)


class RecordingBackend(TransformersBackend):
    """The real local backend, keeping the requests it generated for."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.requests = []

    def generate(self, requests, params):
        self.requests.extend(requests)
        return super().generate(requests, params)


def test_training_tiles_what_sampling_tiled(tmp_path, capsys, tiny_model_dir):
    """Sampled with --max-tiles 12 from an EXIF-rotated photo (stored 256x512, shown 512x256):
    meta.json carries max_dynamic_patch 12 through match and pair, and the trainer (recipe default
    6) encodes exactly the tiles and pixels the model was sampled on. Old: no max_dynamic_patch in
    meta.json, so training tiled at 6."""
    from data_pipeline.backends import SamplingParams
    from data_pipeline.prompts import get_template
    from data_pipeline.sample import SampleSettings, sample_questions
    from data_pipeline.records import read_questions

    images = tmp_path / "images"
    images.mkdir()
    stored = Image.new("RGB", (256, 512), (30, 30, 30))
    stored.paste((250, 250, 0), (0, 0, 128, 64))
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(images / "photo.jpg", exif=exif.tobytes(), quality=95)
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"id": "q1", "image": "photo.jpg", "question": "How many?", "answer": "3"}) + "\n")
    backend = RecordingBackend(tiny_model_dir)
    settings = SampleSettings(get_template("v1"), num_samples=2, params=SamplingParams(max_new_tokens=4, max_tiles=12), batch_size=1)
    log = tmp_path / "samples.jsonl"
    sample_questions(read_questions(questions, "q", False)[0], images, backend, settings, log, progress=False)
    (line,) = read_log(log)
    assert line["max_tiles"] == 12
    line["responses"] = ["Three.\nFinal answer: 3", "Four.\nFinal answer: 4"]  # judgeable stand-ins
    log.write_text(json.dumps(line) + "\n")
    assert main(["match", "--samples", str(log), "--out", str(tmp_path / "m.jsonl"), "--no-progress"]) == 0
    assert main(["pair", "--matched", str(tmp_path / "m.jsonl"), "--image-root", str(images), "--out-dir", str(tmp_path / "out")]) == 0
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert [entry["max_dynamic_patch"] for entry in meta.values()] == [12]

    config = DataConfig(meta_path=str(tmp_path / "out" / "meta.json"), max_dynamic_patch=6)
    (record,) = load_records(config, seed=0)
    assert record.max_dynamic_patch == 12
    trained = PreferenceDataset([record], backend.processor, config)[0].pixel_values
    (request,) = backend.requests
    sampled = backend.encode(request, 12)["pixel_values"]
    at_six = backend.encode(request, 6)["pixel_values"]
    assert trained.shape[0] == sampled.shape[0] > at_six.shape[0]
    assert torch.equal(trained, sampled)
    assert request.images[0].size == (512, 256)  # upright, in both


def test_pair_needs_the_budget_of_old_logs(tmp_path, capsys):
    """A matched file from an mpo-data that did not record max_tiles: pair asks for --max-tiles."""
    record = {"id": "q", "dataset": "d", "line": 1, "image": ["a.png"], "question": "Q", "prompt": "<image>\nQ",
              "answer": "3", "answer_format": "final_answer", "responses": ["Final answer: 3"], "finish_reasons": ["stop"]}
    (tmp_path / "s.jsonl").write_text(json.dumps(record) + "\n")
    assert main(["match", "--samples", str(tmp_path / "s.jsonl"), "--out", str(tmp_path / "m.jsonl"), "--no-progress"]) == 0
    pair = ["pair", "--matched", str(tmp_path / "m.jsonl"), "--image-root", str(tmp_path), "--out-dir", str(tmp_path / "out")]
    assert main(pair) == 2
    assert "max_tiles: the records do not say which --max-tiles they were sampled with" in capsys.readouterr().err
