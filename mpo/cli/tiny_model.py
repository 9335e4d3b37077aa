"""``mpo tiny-model OUT_DIR``: a random tiny InternVL checkpoint (:mod:`mpo.model.tiny`) for tests and laptops."""

from __future__ import annotations

import argparse
from pathlib import Path

from mpo.model.tiny import SIZES, build_tiny_model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mpo tiny-model", description="Writes a random tiny InternVL checkpoint (model, processor, tokenizer).",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("out_dir", metavar="OUT_DIR", help="where the checkpoint is written (replaced if it exists)")
    parser.add_argument("--size", default="tiny", choices=sorted(SIZES),
                        help="tiny: ~0.2 M parameters (unit tests); small: a few million (the demo, vLLM on CPU); "
                             "bench: tens of millions, 64 image tokens per tile")
    parser.add_argument("--seed", type=int, default=0, help="seeds the random weights")
    parser.add_argument("--max-patches", type=int, default=12, help="the processor's default max tiles per image")
    args = parser.parse_args(argv)
    path = build_tiny_model(args.out_dir, size=args.size, seed=args.seed, max_patches=args.max_patches)
    n = sum(p.numel() for p in _load(path).parameters())
    print(f"wrote {args.size} InternVL ({n:,} parameters) to {path}")
    return 0


def _load(path: Path):
    from transformers import AutoModelForImageTextToText
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # its "Loading weights" bar tells nothing here

    return AutoModelForImageTextToText.from_pretrained(path)
