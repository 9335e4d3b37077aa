"""The bench's workloads: synthetic pairs of a given shape, the paths raced, and the bench model."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from mpo.config import ModelConfig
from mpo.data.layouts import collate_auto, collate_packed, collate_plain, collate_shared_prefix
from mpo.model.loading import load_model, load_processor
from mpo.types import EncodedPair

INTERNVL3_VOCAB = 151_674


@dataclass(frozen=True)
class Scenario:
    """The shape of a scenario's synthetic pairs (lengths drawn uniformly in the ranges).

    Attributes:
        images: images per prompt (0: text-only).
        tiles: tiles per image, thumbnail included.
        question: text tokens of the question.
        response: tokens of each response, its end-of-turn token included.
    """

    name: str
    images: int
    tiles: tuple[int, int]
    question: tuple[int, int]
    response: tuple[int, int]


SCENARIOS = {
    # InternVL's usual case: 6 tiles plus a thumbnail, short responses (prompt ~540, responses ~64)
    "image_heavy": Scenario("image_heavy", 1, (7, 7), (60, 100), (48, 80)),
    # one tile, responses longer than the prompt
    "balanced": Scenario("balanced", 1, (1, 1), (60, 100), (100, 160)),
    # short text-only pairs (prompt ~66, responses ~30)
    "text_short": Scenario("text_short", 0, (0, 0), (40, 80), (20, 40)),
}
PATHS = {  # name -> (layout, precomputed reference)
    "plain": ("plain", False),
    "shared_prefix": ("shared_prefix", False),
    "packed": ("packed", False),
    "auto": ("auto", False),
    "precomputed": ("auto", True),
}


def make_pairs(scenario: Scenario, processor, tile_size: int, count: int, seed: int) -> list[EncodedPair]:
    """Synthetic pairs in the trainer's format: a ChatML prompt whose images are expanded to
    ``<img><IMG_CONTEXT>*N</img>``, random text tokens, random pixels."""
    rng = random.Random(seed)
    tokenizer = processor.tokenizer
    special = set(tokenizer.all_special_ids)
    words = [i for i in range(min(len(tokenizer), 30000)) if i not in special]

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    image_start, image_end, image_token = (ids(t) for t in (processor.start_image_token, processor.end_image_token, processor.image_token))
    header, footer, end = ids("<|im_start|>user\n"), ids("<|im_end|>\n<|im_start|>assistant\n"), ids("<|im_end|>")
    generator = torch.Generator().manual_seed(seed)
    pairs = []
    for index in range(count):
        prompt, tiles = list(header), []
        for _ in range(scenario.images):
            n = rng.randint(*scenario.tiles)
            prompt += image_start + image_token * (n * processor.image_seq_length) + image_end + ids("\n")
            tiles.append(torch.randn(n, 3, tile_size, tile_size, generator=generator))
        prompt += [rng.choice(words) for _ in range(rng.randint(*scenario.question))] + footer
        responses = [[rng.choice(words) for _ in range(rng.randint(*scenario.response) - 1)] + end for _ in range(2)]
        source = f"{scenario.name}-{seed}:{index}"
        pairs.append(EncodedPair(prompt, responses[0], responses[1], torch.cat(tiles) if tiles else None, source))
    return pairs


def collators(pad_id: int, pack_length: int, attention: str) -> dict:
    """Each layout's collate function."""
    return {
        "plain": lambda pairs: collate_plain(pairs, pad_id),
        "shared_prefix": lambda pairs: collate_shared_prefix(pairs, pad_id, attention),
        "packed": lambda pairs: collate_packed(pairs, pad_id, pack_length, attention),
        "auto": lambda pairs: collate_auto(pairs, pad_id, pack_length, attention),
    }


def load_bench_model(args, device: torch.device):
    """The model in ``args.dtype`` on ``device``, its vocabulary resized to ``--vocab-size``."""
    config = ModelConfig(name_or_path=args.model, dtype=args.dtype, attn_implementation="sdpa")
    processor = load_processor(config)
    torch.manual_seed(args.seed)
    model = load_model(config)
    if args.vocab_size and args.vocab_size != model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(args.vocab_size, mean_resizing=False)
    return model.to(device).eval().requires_grad_(False), processor
