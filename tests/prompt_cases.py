"""Record kinds rendered by hand, shared by ``test_prompting.py`` and ``test_vllm.py``.

Each kind is an MMPR question with its images and tile budget, and the prompt text the
checkpoint's chat template must give for it (system turn ``auto``, image tokens expanded as the
processor expands them: 16 per 64-px tile of the tiny models).
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from mpo.config import DataConfig
from mpo.data.dataset import PreferenceDataset
from mpo.data.mmpr import read_annotation
from mpo.data.prompting import INTERNVL_SYSTEM_MESSAGE, resolve_system_prompt

SYSTEM = INTERNVL_SYSTEM_MESSAGE
C = "<IMG_CONTEXT>" * 16  # one 64-px tile of the tiny model: 16 image tokens
HEAD = f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n"
TAIL = "<|im_end|>\n<|im_start|>assistant\n"


def image_run(tiles: int) -> str:
    return "<img>" + C * tiles + "</img>"


# kind: (MMPR question, images, max_tiles, the prompt text the template must give, image tokens expanded)
KINDS = {
    "text": ("What is 2+2?", [], 6, HEAD + "What is 2+2?" + TAIL),
    # 512x384 at 6 tiles: a 3x2 grid plus the thumbnail.
    "one_image": ("<image>\nHow many shapes?", ["wide.png"], 6, HEAD + image_run(7) + "\nHow many shapes?" + TAIL),
    # 12 tiles shared by two images: 6 each, so 3x2 + thumbnail for the wide one, 1 for the square one.
    "two_images": ("Image-1: <image>\nImage-2: <image>\nCompare them.", ["wide.png", "square.png"], 12,
                   HEAD + f"Image-1: {image_run(7)}\nImage-2: {image_run(1)}\nCompare them." + TAIL),
    # Mid-text: the template's newline after the image part stays (see mpo.data.prompting).
    "mid_text": ("How <image> many?", ["square.png"], 6, HEAD + f"How {image_run(1)}\n many?" + TAIL),
}
PREFIX = "The image shows"


def write_images(root: Path) -> Path:
    """The images the kinds name: a 512x384 one (6 tiles + a thumbnail at 6) and a 64x64 one."""
    Image.new("RGB", (512, 384), (200, 40, 40)).save(root / "wide.png")
    Image.new("RGB", (64, 64), (20, 140, 40)).save(root / "square.png")
    return root


def expected_ids(processor, text: str) -> list[int]:
    return processor.tokenizer(text, add_special_tokens=False)["input_ids"]


def trainer_ids(processor, root: Path, question: str, image_files: list[str], max_tiles: int) -> list[int]:
    """The prompt ids the trainer encodes for an MMPR line of this question (system turn ``auto``)."""
    annotation = root / "one.jsonl"
    line = {"question": question, "chosen": "a", "rejected": "b", **({"image": image_files} if image_files else {})}
    annotation.write_text(json.dumps(line) + "\n")
    records = read_annotation(annotation, root, max_tiles, None, resolve_system_prompt("auto"))
    return PreferenceDataset(records, processor, DataConfig(jsonl_path=str(annotation))).encode(records[0]).prompt_ids
