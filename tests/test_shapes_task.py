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

from mpo.demo.shapes import FAMILIES, generate_shapes_task, main

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


def _options(question: str) -> dict[str, str]:
    """'...?\\nA. Yes\\nB. No' -> {'Yes': 'A', 'No': 'B'}."""
    options = {}
    for line in question.split("\n")[1:]:
        letter, text = re.fullmatch(r"([A-D])\. (.+)", line).groups()
        options[text] = letter
    return options


def _solve(question: str, scene: list[dict]) -> str:
    """The answer, from the scene alone; the question text picks the rule."""
    stem = question.split("\n")[0]
    if m := re.fullmatch(r"How many shapes are there\?", stem):
        return str(len(scene))
    if m := re.fullmatch(r"How many (red|green|blue|yellow) shapes are there\?", stem):
        return str(_count(scene, colour=m[1]))
    if m := re.fullmatch(r"How many (circle|square|triangle)s are there\?", stem):
        return str(_count(scene, shape=m[1]))
    if m := re.fullmatch(r"How many (\w+) (circle|square|triangle)s are there\?", stem):
        return str(_count(scene, m[1], m[2]))
    if m := re.fullmatch(r"How many shapes are not (\w+)\?", stem):
        return str(len(scene) - _count(scene, colour=m[1]))
    if m := re.fullmatch(r"How many (\w+) and (\w+) shapes are there in total\?", stem):
        return str(_count(scene, colour=m[1]) + _count(scene, colour=m[2]))
    if m := re.fullmatch(r"How many more (\w+) shapes than (\w+) shapes are there\?", stem):
        return str(_count(scene, colour=m[1]) - _count(scene, colour=m[2]))
    options = _options(question)
    if m := re.fullmatch(r"Are there more (\w+) shapes than (\w+) shapes\?", stem):
        more = _count(scene, colour=m[1]) > _count(scene, colour=m[2])
        return options["Yes" if more else "No"]
    if m := re.fullmatch(r"Which colour has more shapes, (\w+) or (\w+)\?", stem):
        a, b = _count(scene, colour=m[1]), _count(scene, colour=m[2])
        return options[m[1] if a > b else m[2] if b > a else "they have the same number"]
    relation = r"(to the left of|to the right of|above|below)"
    if m := re.fullmatch(rf"Is the (\w+) (\w+) {relation} the (\w+) (\w+)\?", stem):
        [first] = [s for s in scene if (s["colour"], s["shape"]) == (m[1], m[2])]
        [second] = [s for s in scene if (s["colour"], s["shape"]) == (m[4], m[5])]
        dx, dy = first["x"] - second["x"], first["y"] - second["y"]
        holds = {"to the left of": dx < 0, "to the right of": dx > 0,
                 "above": dy < 0, "below": dy > 0}[m[3]]
        assert (dx if "of" in m[3] else dy) != 0, "an ambiguous position question"
        return options["Yes" if holds else "No"]
    if m := re.fullmatch(r"Which shape is (furthest to the (left|right)|closest to the "
                         r"(top|bottom))\?", stem):
        direction = m[2] or m[3]
        key = {"left": lambda s: s["x"], "right": lambda s: -s["x"],
               "top": lambda s: s["y"], "bottom": lambda s: -s["y"]}[direction]
        first, second = sorted(scene, key=key)[:2]
        assert key(first) < key(second), "an ambiguous extreme question"
        assert _count(scene, first["colour"], first["shape"]) == 1
        return options[f"the {first['colour']} {first['shape']}"]
    raise AssertionError(f"no rule for {question!r}")


def test_answers_recomputed_from_scene(records: dict) -> None:
    for record in records["train.jsonl"] + records["test.jsonl"]:
        assert record["answer"] == _solve(record["question"], record["scene"]), record
        if record["answer_type"] == "number":
            assert 0 <= int(record["answer"]) <= 5 and record["choices"] is None
        else:
            assert record["answer_type"] == "choice"
            assert list(_options(record["question"])) == record["choices"]


def test_cot_ends_in_final_answer(records: dict) -> None:
    for record in records["train.jsonl"] + records["test.jsonl"]:
        rationale, final = record["cot"].rsplit("\n", 1)
        assert final == f"Final answer: {record['answer']}"
        assert rationale.strip() and "\n" not in rationale
        assert record["cot"].count("Final answer:") == 1
        # The rationale ends on the answer it leads to: the option, or the last number.
        if record["answer_type"] == "choice":
            assert rationale.endswith(f"which is option {record['answer']}.")
        else:
            assert re.findall(r"\d+", rationale)[-1] == record["answer"]


def test_describe_items(records: dict) -> None:
    for record in records["train_describe.jsonl"] + records["test_describe.jsonl"]:
        assert record["kind"] == "describe" and record["answer"] is None
        scene, text = record["scene"], record["cot"]
        assert text.startswith(f"There are {len(scene)} shapes: ") and "Final answer" not in text
        for s in scene:  # every shape is named as often as it occurs
            name = f"{s['colour']} {s['shape']}"
            assert text.count(f"a {name} ") == _count(scene, s["colour"], s["shape"])


def _colour_of(pixel: tuple[int, int, int]) -> str:
    r, g, b = pixel
    if r > 150 and g > 150 and b < 100:
        return "yellow"
    if r > 150 and g < 100 and b < 100:
        return "red"
    if g > 120 and r < 100 and b < 100:
        return "green"
    if b > 150 and r < 100 and g < 120:
        return "blue"
    return "background" if min(pixel) > 200 else "unknown"


def test_centre_pixels_have_the_shape_colour(task: Path, records: dict) -> None:
    seen = set()
    for record in records["train_describe.jsonl"] + records["test_describe.jsonl"]:
        image = Image.open(task / record["image"]).convert("RGB")
        assert image.size == (64, 64)
        assert _colour_of(image.getpixel((0, 0))) == "background"
        for s in record["scene"]:
            assert _colour_of(image.getpixel((s["x"], s["y"]))) == s["colour"], (record["id"], s)
            seen.add(s["colour"])
    assert seen == {"red", "green", "blue", "yellow"}


def test_shapes_do_not_overlap(records: dict) -> None:
    for record in records["train_describe.jsonl"] + records["test_describe.jsonl"]:
        scene = record["scene"]
        assert 2 <= len(scene) <= 5
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
