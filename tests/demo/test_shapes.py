"""Tests of the synthetic shapes task (mpo/demo/shapes.py).

Every answer is recomputed here from the ``scene`` stored in its record, by parsing the question
text with this file's own rules, so a bug in a question family cannot hide behind itself.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
from PIL import Image

from mpo.demo._shapes_questions import FAMILIES
from mpo.demo.shapes import generate_shapes_task, main

NUM_TRAIN, NUM_TEST, QUESTIONS, SEED = 16, 8, 6, 0
FILES = ("train.jsonl", "test.jsonl", "train_describe.jsonl", "test_describe.jsonl")


def _generate(out: Path, seed: int = SEED) -> dict:
    return generate_shapes_task(out, num_train_images=NUM_TRAIN, num_test_images=NUM_TEST,
                                questions_per_image=QUESTIONS, seed=seed)


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def task(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shapes")
    _generate(out)
    return out


@pytest.fixture(scope="module")
def records(task: Path) -> dict[str, list[dict]]:
    return {name: _read(task / name) for name in FILES}


def test_counts_per_split(task: Path, records: dict[str, list[dict]]) -> None:
    summary = json.loads((task / "summary.json").read_text())
    for split, num_images in (("train", NUM_TRAIN), ("test", NUM_TEST)):
        assert len(records[f"{split}.jsonl"]) == num_images * QUESTIONS
        assert len(records[f"{split}_describe.jsonl"]) == num_images
        assert len(list((task / "images" / split).glob("*.png"))) == num_images
        assert summary[f"{split}_images"] == num_images
        assert summary[f"{split}_questions"] == num_images * QUESTIONS
        assert summary[f"{split}_describe"] == num_images
        per_image: dict[str, int] = {}
        for record in records[f"{split}.jsonl"]:
            per_image[record["image"]] = per_image.get(record["image"], 0) + 1
            assert (task / record["image"]).is_file()
            assert record["image"].startswith(f"images/{split}/")
        assert set(per_image.values()) == {QUESTIONS}
    all_ids = [r["id"] for name in FILES for r in records[name]]
    assert len(all_ids) == len(set(all_ids))
    # No temporary file of the atomic writes is left behind.
    assert not [p for p in task.rglob("*") if p.name.endswith(".tmp")]


def test_questions_distinct_per_image_and_every_family_used(records: dict) -> None:
    by_image: dict[str, list[str]] = {}
    for record in records["train.jsonl"] + records["test.jsonl"]:
        by_image.setdefault(record["image"], []).append(record["question"])
    assert all(len(set(qs)) == len(qs) for qs in by_image.values())
    assert {r["kind"] for r in records["train.jsonl"]} == set(FAMILIES)


def test_same_seed_same_bytes_other_seed_differs(task: Path, tmp_path: Path) -> None:
    _generate(tmp_path / "again")
    assert _tree(task) == _tree(tmp_path / "again")
    _generate(tmp_path / "other", seed=SEED + 1)
    other = _tree(tmp_path / "other")
    for name in (*FILES, "images/train/000001.png", "images/test/000001.png"):
        assert other[name] != _tree(task)[name], name


def test_train_and_test_share_no_image(task: Path, records: dict) -> None:
    def images(split: str) -> tuple[set[str], set[str], set[str]]:
        lines = records[f"{split}.jsonl"] + records[f"{split}_describe.jsonl"]
        paths = {r["image"] for r in lines}
        digests = {hashlib.sha256((task / p).read_bytes()).hexdigest() for p in paths}
        scenes = {json.dumps(sorted(r["scene"], key=json.dumps)) for r in lines}
        return paths, digests, scenes

    for train_side, test_side in zip(images("train"), images("test"), strict=True):
        assert train_side.isdisjoint(test_side)


# ---------------------------------------------------------------- independent ground truth


def _count(scene: list[dict], colour: str | None = None, shape: str | None = None) -> int:
    return sum(1 for s in scene if colour in (None, s["colour"]) and shape in (None, s["shape"]))


def _solve(question: str, scene: list[dict]) -> int:
    """The answer, from the scene alone; the question text picks the rule."""
    if m := re.fullmatch(r"How many shapes are there\?", question):
        return len(scene)
    if m := re.fullmatch(r"How many (red|green|blue) shapes are there\?", question):
        return _count(scene, colour=m[1])
    if m := re.fullmatch(r"How many shapes are (\w+) or (\w+)\?", question):
        return _count(scene, colour=m[1]) + _count(scene, colour=m[2])
    if m := re.fullmatch(r"How many more (\w+) shapes than (\w+) shapes are there\?", question):
        difference = _count(scene, colour=m[1]) - _count(scene, colour=m[2])
        assert difference > 0, "a 'how many more' question with no more"
        return difference
    if m := re.fullmatch(r"Each (\w+) shape holds (\d) coins\. How many coins do the \1 shapes hold\?", question):
        return _count(scene, colour=m[1]) * int(m[2])
    points = r"(Red) shapes are worth (\d) points?, (\w+) shapes (\d) points? and (\w+) shapes (\d) points?\. How many points are all the shapes worth\?"
    if m := re.fullmatch(points, question):
        return sum(_count(scene, colour=c.lower()) * int(w) for c, w in ((m[1], m[2]), (m[3], m[4]), (m[5], m[6])))
    raise AssertionError(f"no rule for {question!r}")


def test_answers_recomputed_from_scene(records: dict) -> None:
    for record in records["train.jsonl"] + records["test.jsonl"]:
        assert record["answer"] == str(_solve(record["question"], record["scene"])), record


def test_answers_range_widely(records: dict) -> None:
    # The weighted families make a guessed answer rarely right: their answers spread over 0-28.
    answers = {int(r["answer"]) for r in records["train.jsonl"] if r["kind"] in ("colour_points", "times")}
    assert len(answers) >= 10 and max(answers) >= 12


def test_cot_is_a_tally_then_one_operation_per_clause(records: dict) -> None:
    for record in records["train.jsonl"] + records["test.jsonl"]:
        rationale, final = record["cot"].rsplit("\n", 1)
        assert final == f"Final answer: {record['answer']}"
        assert record["cot"].count("Final answer:") == 1
        scene = record["scene"]
        tally = f"red {_count(scene, 'red')}, green {_count(scene, 'green')}, blue {_count(scene, 'blue')}."
        assert rationale.startswith(tally), record
        for left, operator, right, result in re.findall(r"(\d+) ([x+-]) (\d+) = (\d+)\.", rationale):
            assert int(result) == {"x": int(left) * int(right), "+": int(left) + int(right), "-": int(left) - int(right)}[operator]
        operations = re.findall(r"\d+ [x+-] \d+ = (\d+)\.", rationale)
        if operations:
            assert operations[-1] == record["answer"]
        assert rationale == " ".join([tally, *re.findall(r"\d+ [x+-] \d+ = \d+\.", rationale)])


def test_describe_items(records: dict) -> None:
    for record in records["train_describe.jsonl"] + records["test_describe.jsonl"]:
        assert record["kind"] == "describe" and record["answer"] is None
        scene = record["scene"]
        assert record["cot"] == f"red {_count(scene, 'red')}, green {_count(scene, 'green')}, blue {_count(scene, 'blue')}."


def _colour_of(pixel: tuple[int, int, int]) -> str:
    names = {(255, 0, 0): "red", (0, 255, 0): "green", (0, 0, 255): "blue", (128, 128, 128): "background"}
    return names.get(pixel, "unknown")


def test_centre_pixels_have_the_shape_colour(task: Path, records: dict) -> None:
    seen = set()
    for record in records["train_describe.jsonl"] + records["test_describe.jsonl"]:
        image = Image.open(task / record["image"]).convert("RGB")
        assert image.size == (64, 64)
        assert _colour_of(image.getpixel((0, 0))) == "background"
        for s in record["scene"]:
            assert _colour_of(image.getpixel((s["x"], s["y"]))) == s["colour"], (record["id"], s)
            seen.add(s["colour"])
    assert seen == {"red", "green", "blue"}


def test_shapes_do_not_overlap(records: dict) -> None:
    for record in records["train_describe.jsonl"] + records["test_describe.jsonl"]:
        scene = record["scene"]
        assert 3 <= len(scene) <= 7
        for i, a in enumerate(scene):
            for b in scene[i + 1:]:
                reach = (a["size"] + b["size"]) / 2
                assert abs(a["x"] - b["x"]) >= reach or abs(a["y"] - b["y"]) >= reach


def test_main_and_image_size(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path), "--train", "3", "--test", "2", "--seed", "5",
                 "--questions-per-image", "2", "--image-size", "96"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["train_questions"], summary["test_questions"]) == (6, 4)
    assert Image.open(tmp_path / "images" / "test" / "000002.png").size == (96, 96)


def test_rejects_bad_settings(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        generate_shapes_task(tmp_path, num_train_images=1, num_test_images=1,
                             questions_per_image=0, seed=0)
    with pytest.raises(ValueError):
        generate_shapes_task(tmp_path, num_train_images=1, num_test_images=1,
                             questions_per_image=2, seed=0, image_size=16)


def test_grid_puts_each_shape_in_its_own_cell(tmp_path: Path) -> None:
    generate_shapes_task(tmp_path, num_train_images=20, num_test_images=2, questions_per_image=2, seed=3, grid=4)
    for record in _read(tmp_path / "train_describe.jsonl"):
        cells = [(s["x"] // 16, s["y"] // 16) for s in record["scene"]]
        assert len(set(cells)) == len(cells)
        assert all((s["x"] % 16, s["y"] % 16) == (8, 8) and s["size"] <= 14 for s in record["scene"])
    with pytest.raises(ValueError, match="7\\+ cells"):  # 2 x 2 cells cannot hold 7 shapes
        generate_shapes_task(tmp_path, num_train_images=1, num_test_images=1, questions_per_image=2, seed=0, grid=2)
