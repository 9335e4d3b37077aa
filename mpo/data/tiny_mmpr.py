"""A tiny, deterministic MMPR directory: the data of the CPU recipe and of the tests.

``write_tiny_mmpr(out_dir)`` draws small PNGs with PIL and writes every record type the trainer
reads, in the MMPR layout (see ``shared/REFERENCE.md``)::

    out_dir/meta.json                     4 subsets, root/annotation relative to this file
    out_dir/annotations/<subset>.jsonl    one pair per line
    out_dir/images/shapes_NN.png          96x64: non-square, so dynamic tiling makes several tiles
    out_dir/images/multi_NN_{a,b}.png     64x64 pairs of images for the two-image questions
    out_dir/videos/clipN/frame_NN.png     8 frames per clip: a square moving left to right

The subsets (24 pairs in all):

* ``shapes_pairs_vqa_correctness_rules`` (10): one image, "how many circles", correct vs wrong
  count.
* ``multi_pairs_vqa_correctness_rules`` (6): two images (``"image": [a, b]``, ``<image>`` twice),
  "which image has more shapes".
* ``text_prefix_pair_sr0.5_wo_image`` (5): text-only Dropout-NTP pairs (no ``image`` key); the
  rejected response shares the chosen one's first half.
* ``video_pairs_vqa_correctness_rules`` (3): ``"video": "videos/clipN"`` (a directory of frames),
  ``<video>`` in the question, "which way does the square move".

The same seed gives byte-identical files. ``examples/tiny_mmpr/`` in the repository is this
function's output for seed 0 (regenerate with ``python -m mpo.data.tiny_mmpr examples/tiny_mmpr``).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

COT_INSTRUCTION = (
    "Answer the question step by step, and when you are ready to answer, "
    'please use the format "Final answer: .."'
)
COLOURS = {"red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 220), "yellow": (240, 200, 20)}
BACKGROUND = (235, 235, 235)
SHAPE_SIZE = 12
NUM_SHAPES_PAIRS, NUM_MULTI_PAIRS, NUM_TEXT_PAIRS, NUM_VIDEO_CLIPS, FRAMES_PER_CLIP = 10, 6, 5, 3, 8


def _draw(shapes: list[tuple[str, str, int, int]], width: int, height: int) -> Image.Image:
    """Draws ``(kind, colour, x, y)`` shapes (top-left corners) on a plain background."""
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for kind, colour, x, y in shapes:
        box = (x, y, x + SHAPE_SIZE, y + SHAPE_SIZE)
        if kind == "circle":
            draw.ellipse(box, fill=COLOURS[colour])
        else:
            draw.rectangle(box, fill=COLOURS[colour])
    return image


def _scene(rng: random.Random, width: int, height: int, count: int) -> list[tuple[str, str, int, int]]:
    """``count`` non-overlapping shapes on a grid of 16-px cells."""
    cells = [(cx, cy) for cx in range(width // 16) for cy in range(height // 16)]
    picked = rng.sample(cells, count)
    return [(rng.choice(["circle", "square"]), rng.choice(sorted(COLOURS)), cx * 16 + 2, cy * 16 + 2) for cx, cy in picked]


def _save(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG", optimize=True)


def _count_text(shapes: list[tuple[str, str, int, int]], kind: str) -> str:
    names = [f"a {colour} {k}" for k, colour, _, _ in shapes if k == kind]
    return ", ".join(names) if names else f"no {kind}"


def _shapes(count: int) -> str:
    return f"{count} shape" + ("" if count == 1 else "s")


def _shapes_pairs(rng: random.Random, out: Path) -> list[dict]:
    records = []
    for i in range(NUM_SHAPES_PAIRS):
        shapes = _scene(rng, 96, 64, rng.randint(2, 5))
        name = f"shapes_{i:02d}.png"
        _save(_draw(shapes, 96, 64), out / "images" / name)
        circles = sum(kind == "circle" for kind, _, _, _ in shapes)
        wrong = rng.choice([n for n in range(6) if n != circles])
        records.append({
            "image": name,
            "question": f"<image>\nHow many circles are there in the image?\n{COT_INSTRUCTION}",
            "chosen": f"The image shows {_count_text(shapes, 'circle')}. Counting them gives {circles}.\n"
            f"Final answer: {circles}",
            "rejected": f"The image shows some shapes. Counting the circles gives {wrong}.\nFinal answer: {wrong}",
            "answer_gt": str(circles),
        })
    return records


def _multi_pairs(rng: random.Random, out: Path) -> list[dict]:
    records = []
    for i in range(NUM_MULTI_PAIRS):
        first, second = rng.sample(range(1, 6), 2)
        names = []
        for suffix, count in (("a", first), ("b", second)):
            names.append(f"multi_{i:02d}_{suffix}.png")
            _save(_draw(_scene(rng, 64, 64, count), 64, 64), out / "images" / names[-1])
        answer, wrong = ("A", "B") if first > second else ("B", "A")
        records.append({
            "image": names,
            "question": "Image-1: <image>\nImage-2: <image>\nWhich image has more shapes?\n"
            f"A. Image-1\nB. Image-2\n{COT_INSTRUCTION}",
            "chosen": f"Image-1 has {_shapes(first)} and Image-2 has {_shapes(second)}.\nFinal answer: {answer}",
            "rejected": f"Image-1 has {_shapes(second)} and Image-2 has {_shapes(first)}.\nFinal answer: {wrong}",
            "answer_gt": answer,
        })
    return records


def _text_pairs(rng: random.Random) -> list[dict]:
    topics = ["a red circle", "two blue squares", "a green triangle", "three yellow circles", "a square above a circle"]
    records = []
    for topic in topics[:NUM_TEXT_PAIRS]:
        prefix = f"The picture shows {topic} on a plain background."
        ending = rng.choice(["Nothing else is in the picture.", "The shapes do not touch."])
        records.append({
            "question": f"Describe a simple picture of {topic}.",
            "chosen": f"{prefix} {ending}",
            "rejected": f"{prefix} There is also a chart and a table of numbers.",
        })
    return records


def _video_pairs(rng: random.Random, out: Path) -> list[dict]:
    records = []
    for clip in range(NUM_VIDEO_CLIPS):
        colour = rng.choice(sorted(COLOURS))
        rightwards = clip % 2 == 0
        for frame in range(FRAMES_PER_CLIP):
            x = 4 + 6 * (frame if rightwards else FRAMES_PER_CLIP - 1 - frame)
            _save(_draw([("square", colour, x, 26)], 64, 64), out / "videos" / f"clip{clip}" / f"frame_{frame:02d}.png")
        answer, wrong = ("right", "left") if rightwards else ("left", "right")
        records.append({
            "video": f"videos/clip{clip}",
            "question": f"<video>\nWhich way does the {colour} square move, left or right?\n{COT_INSTRUCTION}",
            "chosen": f"In the first frame the square is on the {wrong}, in the last frame on the {answer}.\n"
            f"Final answer: {answer}",
            "rejected": f"In the first frame the square is on the {answer}, in the last frame on the {wrong}.\n"
            f"Final answer: {wrong}",
            "answer_gt": answer,
        })
    return records


def write_tiny_mmpr(out_dir: str | Path, seed: int = 0) -> Path:
    """Writes the tiny MMPR directory described in the module docstring.

    Args:
        out_dir: target directory (created; existing files of the same names are overwritten).
        seed: seeds the scenes and the wrong answers.

    Returns:
        The path of ``meta.json``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    subsets = {
        "shapes_pairs_vqa_correctness_rules": ("images", _shapes_pairs(rng, out), {"max_dynamic_patch": 4}),
        "multi_pairs_vqa_correctness_rules": ("images", _multi_pairs(rng, out), {}),
        "text_prefix_pair_sr0.5_wo_image": (".", _text_pairs(rng), {}),
        "video_pairs_vqa_correctness_rules": (".", _video_pairs(rng, out), {}),
    }
    meta = {}
    for name, (root, records, extra) in subsets.items():
        annotation = out / "annotations" / f"{name}.jsonl"
        annotation.parent.mkdir(parents=True, exist_ok=True)
        annotation.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        meta[name] = {"root": root, "annotation": f"annotations/{name}.jsonl", "repeat_time": 1, "length": len(records), **extra}
    meta_path = out / "meta.json"
    meta_path.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return meta_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mpo.data.tiny_mmpr", description="Writes the tiny MMPR example directory.")
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(f"wrote {write_tiny_mmpr(args.out_dir, args.seed)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
