"""Scenes of the shapes task: the shapes, how they are placed and drawn.

Part of ``mpo.demo.shapes`` (its docstring has the task and the file layout); import from there.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw

# Three primaries on a mid-grey background. Measured on the demo model (plain SFT loop, 400 steps
# of 16, listing the count of each colour): on a light background (235) with four colours it
# stayed at the answers' prior; on mid-grey with these three it listed every held-out count right.
# A light background makes "is there a shape" the one strong direction of the image features, and
# colour a faint one; on mid-grey each colour departs from the background in its own direction.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
BACKGROUND: tuple[int, int, int] = (128, 128, 128)
# 3-7 shapes: counts 0-7, and sums and weighted scores over them range up to 28.
MIN_SHAPES, MAX_SHAPES = 3, 7
# Shape side as a fraction of the image side: 11-15 px at 64 px, wider than one 8-px patch.
SIZE_RANGE: tuple[float, float] = (0.17, 0.23)
GAP = 2  # pixels kept between bounding boxes, so shapes never touch


@dataclass(frozen=True)
class Shape:
    """One shape of a scene: centre (x, y) in pixels, ``size`` the side of its bounding square."""

    colour: str
    shape: str
    x: int
    y: int
    size: int

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


def _overlaps(a: Shape, b: Shape) -> bool:
    reach = (a.size + b.size) / 2 + GAP
    return abs(a.x - b.x) < reach and abs(a.y - b.y) < reach


def sample_scene(rng: random.Random, image_size: int, grid: int = 0) -> list[Shape]:
    """Draw 3-7 shapes with random colour, kind, size and non-overlapping position.

    ``grid`` > 0 centres each shape in a distinct cell of a ``grid`` x ``grid`` layout instead of
    anywhere. With the cells matching the vision encoder's token grid (4 x 4 for a 64-px tile and
    16 image tokens), every image token sees at most one whole shape, which a model trained from
    scratch in minutes can learn to read; free placement splits shapes across tokens.
    """
    num_shapes = rng.randint(MIN_SHAPES, MAX_SHAPES)
    low, high = (max(4, round(f * image_size)) for f in SIZE_RANGE)
    if grid:
        cell = image_size // grid
        high = min(high, cell - 2)  # a 1-px border inside the cell, so neighbours never touch
        low = min(low, high)
        cells = rng.sample(range(grid * grid), num_shapes)
        return [
            Shape(colour=rng.choice(list(COLOURS)), shape=rng.choice(SHAPES),
                  x=(c % grid) * cell + cell // 2, y=(c // grid) * cell + cell // 2, size=rng.randint(low, high))
            for c in cells
        ]
    while True:  # a layout that cannot fit restarts; never happens at the default sizes
        shapes: list[Shape] = []
        for _ in range(200):
            size = rng.randint(low, high)
            half = size // 2 + 1  # keeps a 1-px border, so pixel (0, 0) is always background
            candidate = Shape(
                colour=rng.choice(list(COLOURS)),
                shape=rng.choice(SHAPES),
                x=rng.randint(half, image_size - 1 - half),
                y=rng.randint(half, image_size - 1 - half),
                size=size,
            )
            if not any(_overlaps(candidate, placed) for placed in shapes):
                shapes.append(candidate)
                if len(shapes) == num_shapes:
                    return shapes


def render_scene(shapes: Sequence[Shape], image_size: int) -> Image.Image:
    """Draw the shapes without anti-aliasing, so every shape pixel has exactly its colour."""
    image = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for item in shapes:
        left, top = item.x - item.size // 2, item.y - item.size // 2
        right, bottom = left + item.size - 1, top + item.size - 1
        fill = COLOURS[item.colour]
        if item.shape == "circle":
            draw.ellipse((left, top, right, bottom), fill=fill)
        elif item.shape == "square":
            draw.rectangle((left, top, right, bottom), fill=fill)
        else:  # an upright triangle; its centre (x, y) lies inside it
            draw.polygon([(item.x, top), (left, bottom), (right, bottom)], fill=fill)
    return image
