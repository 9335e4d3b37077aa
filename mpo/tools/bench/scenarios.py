"""The bench's workloads: the scenarios (pairs of a given shape, :mod:`mpo.tools.bench.data`), the paths raced, and the bench model."""

from __future__ import annotations

import torch

from mpo.config import ModelConfig
from mpo.data.layouts import collate_auto, collate_packed, collate_plain, collate_shared_prefix
from mpo.model.loading import load_model, load_processor
from mpo.tools.bench.data import Scenario

INTERNVL3_VOCAB = 151_674


SCENARIOS = {
    # InternVL's usual case: 6 tiles plus a thumbnail, short responses (prompt ~540, responses ~64)
    "image_heavy": Scenario("image_heavy", 1, (7, 7), (60, 100), (48, 80)),
    # one tile, responses longer than the prompt
    "balanced": Scenario("balanced", 1, (1, 1), (60, 100), (100, 160)),
    # short text-only pairs (prompt ~60, responses ~30)
    "text_short": Scenario("text_short", 0, (0, 0), (40, 80), (20, 40)),
}
PATHS = {  # name -> (layout, precomputed reference)
    "plain": ("plain", False),
    "shared_prefix": ("shared_prefix", False),
    "packed": ("packed", False),
    "auto": ("auto", False),
    "precomputed": ("auto", True),
}


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
