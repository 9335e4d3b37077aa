"""``mpo bench --ideal-only``: the FLOP-ideal ratios of mpo's paths over TRL on a GPU, from a
checkpoint's config alone (the model is built on the meta device), for the bench's scenarios with
each image tiled as that model tiles it (InternVL3: 448-px tiles of 256 tokens).

On a GPU, TRL's fused LM head scores the completion tokens only, as mpo's does, so what mpo saves
is the prompt encoded once per pair (not twice per model), the vision tower run once per pair (not
four times), the padding, and, with precomputed log-probs, the reference forward. How much that is
depends on how the model's cost splits between the vision tower, the language model and the LM
head: the ``builtin:bench`` model at InternVL3's vocabulary is mostly LM head, InternVL3-8B mostly
language model.
"""

from __future__ import annotations

import random

import torch
from accelerate import init_empty_weights
from transformers import AutoConfig, AutoModelForImageTextToText

from mpo.tools.bench.scenarios import PATHS, SCENARIOS, Scenario, collators
from mpo.tools.bench.measure import FlopModel, pair_work, path_tiles
from mpo.tools.bench.peer_trl import trl_inputs, trl_work
from mpo.model.loading import resolve_model_path
from mpo.types import EncodedPair


def shaped_pairs(scenario: Scenario, image_tokens: int, count: int, seed: int) -> list[EncodedPair]:
    """Pairs of the scenario's lengths for a model whose tiles feed ``image_tokens`` tokens,
    every token id 0 and every tile one pixel: for counting FLOPs only."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(count):
        tiles = [rng.randint(*scenario.tiles) for _ in range(scenario.images)]
        # header 3, <img> ... </img> and a newline per image, footer 5, as the ChatML prompt
        prompt = 3 + sum(n * image_tokens + 3 for n in tiles) + rng.randint(*scenario.question) + 5
        chosen, rejected = rng.randint(*scenario.response), rng.randint(*scenario.response)
        pixels = torch.zeros(sum(tiles), 3, 1, 1) if tiles else None
        pairs.append(EncodedPair([0] * prompt, [0] * chosen, [0] * rejected, pixels))
    return pairs


def ideal_only(args) -> int:
    """``--ideal-only``: the FLOP-ideal ratios over TRL on a GPU at ``--model``'s dimensions."""
    config = AutoConfig.from_pretrained(resolve_model_path(args.model))
    if args.vocab_size:
        config.text_config.vocab_size = args.vocab_size
    with init_empty_weights():
        flop_model = FlopModel.from_model(AutoModelForImageTextToText.from_config(config))
    names = [name for name in args.paths if name != "trl"]
    collate = collators(0, args.pack_length, "sdpa")
    print(f"FLOP-ideal pairs/s over TRL on a GPU (its LM head scoring completions only), {args.model}, "
          f"{config.image_seq_length} tokens per tile, {args.pairs} pairs/step, mean of {args.steps} steps")
    print(f"{'scenario':<12} {'vision':<10} " + " ".join(f"{name:>13}" for name in names))
    for scenario in args.scenarios:
        batches = [shaped_pairs(SCENARIOS[scenario], config.image_seq_length, args.pairs, args.seed * 1000 + step) for step in range(args.steps)]
        for vision in args.vision:
            frozen = vision == "frozen"
            ratios = {name: 0.0 for name in names}
            for pairs in batches:
                trl = flop_model.step(trl_work(trl_inputs(pairs, 0), every_position=False), *path_tiles("trl", pairs, frozen), not frozen, True)
                for name in names:
                    layout, precomputed = PATHS[name]
                    batch = collate[layout](pairs)
                    work = pair_work(pairs, layout != "plain", batch.input_ids.numel() - batch.num_tokens)
                    mpo = flop_model.step(work, *path_tiles(name, pairs, frozen), not frozen, not precomputed)
                    ratios[name] += trl / mpo / len(batches)
            print(f"{scenario:<12} {vision:<10} " + " ".join(f"{ratios[name]:>12.2f}x" for name in names))
    return 0
