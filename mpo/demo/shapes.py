"""A synthetic visual reasoning task: coloured shapes on a plain background, offline and seeded.

Launch::

    python -m mpo.demo.shapes OUT --train 400 --test 100 --questions-per-image 4 --seed 0

Each image (``image_size`` pixels square, 64 by default: one tile of the demo model) holds 3-7
non-overlapping shapes (circle, square, triangle) in three primary colours (red, green, blue) on
mid-grey, so every count is 0-7. Each image gets ``questions_per_image`` distinct checkable
questions, one family (``kind``) after another in a seeded order; every answer is a whole number:

    count_colour   How many red shapes are there?                                        -> 3
    count_total    How many shapes are there?                                            -> 6
    sum_colours    How many shapes are red or blue?                                      -> 4
    difference     How many more red shapes than blue shapes are there?                  -> 2
    times          Each red shape holds 4 coins. How many coins do the red shapes hold?  -> 12
    colour_points  Red shapes are worth 3 points, green shapes 1 point and blue shapes
                   2 points. How many points are all the shapes worth?                   -> 13

plus one "describe" question per image, whose reference is the colour tally ("red 2, green 1,
blue 3."): the perception every chain of thought starts from. Questions ask about colours only
(``_shapes_questions.py`` says why); the kinds vary all the same.

Layout written under OUT (images first, each JSONL last and atomically, so a killed run never
leaves a half-written JSONL; stale files of an earlier, larger run in OUT are left alone)::

    OUT/images/train/000001.png ...   RGB PNGs; test images under images/test/
    OUT/train.jsonl, OUT/test.jsonl   checkable questions, one JSON object a line
    OUT/train_describe.jsonl, OUT/test_describe.jsonl
    OUT/summary.json                  what generate_shapes_task returns

A line of ``<split>.jsonl`` (``image`` is relative to OUT)::

    {"id": "train-000001-q0", "image": "images/train/000001.png", "image_id": "train-000001",
     "question": "Each red shape holds 4 coins. How many coins do the red shapes hold?",
     "answer": "12", "kind": "times",
     "cot": "red 3, green 1, blue 2. 3 x 4 = 12.\\nFinal answer: 12",
     "scene": [{"colour": "red", "shape": "circle", "x": 8, "y": 40, "size": 12}, ...]}

``scene`` lists every shape: ``x``, ``y`` are its centre in pixels, ``size`` the side of its
bounding square. ``cot`` is the reference chain of thought: a one-line rationale (a tally, then
one arithmetic operation per clause), a newline, then ``Final answer: <answer>`` (the pipeline's
v1 answer format).

A line of ``<split>_describe.jsonl`` has the same keys with ``kind: "describe"``,
``answer: null`` (nothing checkable: the pipeline routes it to Dropout-NTP) and the colour tally
as ``cot``, so an SFT stage reads ``cot`` from both files alike.

``question`` is raw: no ``<image>`` placeholder and no chain-of-thought instruction. The caller
wraps it with the pipeline's v1 instruction (data_pipeline/prompts.py holds the official wording,
ending in ``please use the format "Final answer: .."``), so the wording lives in one place and this
module depends on nothing but Pillow.

Code: scenes (placing, drawing, describing) in ``_shapes_scene.py``, the question families and
their chains of thought in ``_shapes_questions.py``, generation and writing here; everything
public is re-exported here.

Train and test never share an image: per-image seeds are derived from (seed, split, index), and a
test scene identical to a train scene is redrawn; both are asserted before anything is written.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mpo.demo._shapes_questions import (
    FAMILIES,
    WEIGHTS,
    Question,
    colour_counts,
    describe,
    sample_questions,
    tally,
)
from mpo.demo._shapes_scene import BACKGROUND, COLOURS, MAX_SHAPES, MIN_SHAPES, SHAPES, Shape, render_scene, sample_scene

__all__ = [
    "BACKGROUND", "COLOURS", "DESCRIBE_QUESTIONS", "FAMILIES", "MAX_QUESTIONS_PER_IMAGE", "MAX_SHAPES", "MIN_SHAPES",
    "SHAPES", "SPLITS", "WEIGHTS", "Question", "Shape", "colour_counts", "describe", "generate_shapes_task", "main",
    "render_scene", "sample_questions", "sample_scene", "tally",
]

# Every scene offers at least this many distinct questions (3 + 1 + 3 + 3 + 1, no difference).
MAX_QUESTIONS_PER_IMAGE = 11
SPLITS: tuple[str, ...] = ("train", "test")
DESCRIBE_QUESTIONS: tuple[str, ...] = (
    "Describe the image.",
    "Count the shapes in this image by colour.",
    "What do you see in this picture?",
)

# ---------------------------------------------------------------- writing


@dataclass
class _Item:
    """One generated image with its questions, before serialisation."""

    image_id: str
    relative_path: str
    scene: list[Shape]
    questions: list[Question]
    describe_question: str
    png: bytes


def _image_rng(seed: int, split: str, index: int, attempt: int) -> random.Random:
    # A hash of (seed, split, index) rather than seed + index: train and test draw from unrelated
    # streams, and image i does not depend on how many images come before it.
    digest = hashlib.sha256(f"shapes/{seed}/{split}/{index}/{attempt}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _scene_key(scene: Sequence[Shape]) -> tuple[Shape, ...]:
    return tuple(sorted(scene, key=lambda s: (s.x, s.y, s.colour, s.shape, s.size)))


def _make_items(
    split: str, count: int, seed: int, image_size: int, questions_per_image: int,
    avoid: set[tuple[Shape, ...]], grid: int = 0, families: Sequence[str] = (),
) -> list[_Item]:
    items = []
    for index in range(1, count + 1):
        attempt = 0
        while True:
            rng = _image_rng(seed, split, index, attempt)
            scene = sample_scene(rng, image_size, grid)
            if _scene_key(scene) not in avoid:
                break
            attempt += 1  # an exact repeat of a train scene: redraw, so test stays unseen
        questions = sample_questions(scene, rng, questions_per_image, families)
        buffer = io.BytesIO()
        render_scene(scene, image_size).save(buffer, format="PNG")  # no timestamp: reproducible
        items.append(_Item(f"{split}-{index:06d}", f"images/{split}/{index:06d}.png", scene,
                           questions, rng.choice(DESCRIBE_QUESTIONS), buffer.getvalue()))
    return items


def _records(items: Sequence[_Item]) -> tuple[list[dict], list[dict]]:
    checkable, describe_items = [], []
    for item in items:
        common = {"image": item.relative_path, "image_id": item.image_id}
        scene = [asdict(s) for s in item.scene]
        for j, q in enumerate(item.questions):
            checkable.append({
                "id": f"{item.image_id}-q{j}", **common, "question": q.text, "answer": q.answer,
                "kind": q.kind, "cot": q.cot, "scene": scene,
            })
        describe_items.append({
            "id": f"{item.image_id}-describe", **common, "question": item.describe_question,
            "answer": None, "kind": "describe", "cot": describe(item.scene), "scene": scene,
        })
    return checkable, describe_items


def _write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary sibling, then rename: readers see the old file or the whole new one."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)


def _jsonl(records: Sequence[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def generate_shapes_task(
    out_dir: str | os.PathLike[str],
    *,
    num_train_images: int,
    num_test_images: int,
    questions_per_image: int,
    seed: int,
    image_size: int = 64,
    grid: int = 0,
    families: Sequence[str] = (),
) -> dict[str, Any]:
    """Generate the shapes task under ``out_dir`` (layout in the module docstring).

    Args:
        out_dir: output directory, created if missing.
        num_train_images: images in the train split (each gives ``questions_per_image`` lines
            of ``train.jsonl`` and one of ``train_describe.jsonl``).
        num_test_images: images in the test split, never sharing a scene with train.
        questions_per_image: distinct checkable questions per image, 1 to 11.
        seed: the same seed gives byte-identical files.
        image_size: side of the square images in pixels (at least 32).
        grid: 0 places shapes anywhere; N > 0 centres each in its own cell of an N x N grid
            (see ``sample_scene``).
        families: the question families to ask (empty: all of them).

    Returns:
        The summary also written to ``summary.json``: the settings, the number of images,
        questions and describe items per split, and the question count per kind and split.
    """
    if num_train_images < 0 or num_test_images < 0:
        raise ValueError("image counts must be >= 0")
    if not 1 <= questions_per_image <= MAX_QUESTIONS_PER_IMAGE:
        raise ValueError(f"questions_per_image must be in 1..{MAX_QUESTIONS_PER_IMAGE}")
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32 to fit {MAX_SHAPES} distinguishable shapes")
    if grid < 0 or (grid and (image_size // grid < 8 or grid * grid < MAX_SHAPES)):
        raise ValueError(f"grid must be 0 (free placement) or have {MAX_SHAPES}+ cells of at least 8 px")
    train = _make_items("train", num_train_images, seed, image_size, questions_per_image, set(), grid, families)
    train_scenes = {_scene_key(item.scene) for item in train}
    test = _make_items("test", num_test_images, seed, image_size, questions_per_image,
                       train_scenes, grid, families)
    # The guarantee the held-out evaluation rests on: no test image was ever seen in training.
    # A raise, not an assert, so that it holds under ``python -O`` too.
    if not (train_scenes.isdisjoint(_scene_key(item.scene) for item in test)
            and {item.png for item in train}.isdisjoint(item.png for item in test)):
        raise RuntimeError("a test image repeats a train image")

    out = Path(out_dir)
    summary: dict[str, Any] = {"seed": seed, "image_size": image_size, "grid": grid, "families": list(families),
                               "questions_per_image": questions_per_image}
    kinds: dict[str, dict[str, int]] = {}
    for split, items in zip(SPLITS, (train, test), strict=True):
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        for item in items:
            _write_atomic(out / item.relative_path, item.png)
        checkable, describe_items = _records(items)
        _write_atomic(out / f"{split}.jsonl", _jsonl(checkable))
        _write_atomic(out / f"{split}_describe.jsonl", _jsonl(describe_items))
        summary[f"{split}_images"] = len(items)
        summary[f"{split}_questions"] = len(checkable)
        summary[f"{split}_describe"] = len(describe_items)
        kinds[split] = dict(sorted(Counter(r["kind"] for r in checkable).items()))
    summary["kinds"] = kinds
    _write_atomic(out / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mpo.demo.shapes OUT --train N --test M --seed S``; prints the summary."""
    parser = argparse.ArgumentParser(prog="mpo shapes-task", description=__doc__.split(
        "\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("out_dir", help="output directory")
    parser.add_argument("--train", type=int, default=400, help="train images")
    parser.add_argument("--test", type=int, default=100, help="test images")
    parser.add_argument("--questions-per-image", type=int, default=4,
                        help="checkable questions per image")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same bytes")
    parser.add_argument("--image-size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--grid", type=int, default=0,
                        help="0: shapes anywhere; N: each shape centred in its own cell of an N x N grid")
    parser.add_argument("--families", default="", help="comma-separated question families (default: all)")
    args = parser.parse_args(argv)
    summary = generate_shapes_task(
        args.out_dir, num_train_images=args.train, num_test_images=args.test,
        questions_per_image=args.questions_per_image, seed=args.seed, image_size=args.image_size, grid=args.grid,
        families=[f for f in args.families.split(',') if f])
    json.dump(summary, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
