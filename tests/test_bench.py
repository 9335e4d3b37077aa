"""``mpo bench``: the FLOP count behind its "ideal" column, by hand, and one smoke run of the CLI."""

from __future__ import annotations

import json

import pytest
from transformers import AutoModelForImageTextToText

from mpo.bench import FlopModel, main
from mpo.types import EncodedPair


def test_flop_model_of_the_tiny_model_by_hand(tiny_model_dir):
    """The tiny InternVL (mpo.tiny_model SIZES["tiny"]): text hidden 64, 2 layers, 4 heads of 16,
    2 KV heads, MLP 128; vision hidden 32, 2 layers, MLP 128, 64-px tiles of 8-px patches.

    * per token: 2 FLOPs x 2 layers x (q 64*64 + k, v 2*64*32 + o 64*64 + MLP 3*64*128) = 147456
    * per attended (query, key): 2 x 2 (scores, values) x 2 layers x 64 query width = 512
    * per scored token: 2 x 64 x vocabulary
    * per tile: 2 x (64 patches x conv 32*3*8*8 = 393216, + 65 tokens x 2 layers x (4*32*32 +
      2*32*128) = 1597440, + 2 x 65^2 x 64 = 540800, + 16 merged tokens x (128*64 + 64*64) =
      196608) = 5456128
    """
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    flops = FlopModel.from_model(model)
    assert flops.token == 147456
    assert flops.pair_of_tokens == 512
    assert flops.scored == 2 * 64 * model.config.text_config.vocab_size
    assert flops.tile == 5456128


def test_language_flops_count_the_prompt_once_with_prefix_sharing():
    """Prompt 3, chosen 1, rejected 2 tokens. Plain: rows of 4 and 5 tokens, 9 tokens, causal
    pairs 4*5/2 + 5*6/2 = 25. Shared prefix: 6 tokens, pairs 3*4/2 (prompt) + 3*3 (both
    responses see the prompt) + 1 + 2*3/2 (each response sees itself) = 19. 3 scored tokens."""
    flops = FlopModel(token=1000.0, pair_of_tokens=10.0, scored=1.0, tile=0.0)
    pair = EncodedPair([1, 2, 3], [4], [5, 6], None)
    assert flops.language_forward([pair], shared_prefix=False) == 9 * 1000 + 25 * 10 + 3
    assert flops.language_forward([pair], shared_prefix=True) == 6 * 1000 + 19 * 10 + 3
    # pad slots cost what tokens cost in the linear layers (they attend to nothing useful)
    assert flops.language_forward([pair], shared_prefix=True, padding=2) == 8 * 1000 + 19 * 10 + 3
    # a step: policy forward + backward (3x) and reference forward (1x) of the language model, the
    # policy's tiles once (frozen tower) or three times (trained), the reference's once
    assert FlopModel(1.0, 0.0, 0.0, 100.0).step([pair], False, 0, policy_tiles=2, reference_tiles=2, vision_trainable=True) == 4 * 9 + 800


def test_bench_cli_smoke(tiny_model_dir, tmp_path, capsys):
    """One timed step of every path on the tiny model: a table per setting, figures in the JSON,
    the same log-probs on every path, and the vision work each path saves in its ideal speed-up."""
    out = tmp_path / "bench.json"
    code = main(["--model", str(tiny_model_dir), "--scenarios", "image_heavy", "--vision", "frozen",
                 "--steps", "1", "--warmup", "0", "--json", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "image_heavy | frozen vision tower" in printed and "shared_prefix" in printed
    rows = {row["path"]: row for row in json.loads(out.read_text())["results"]}
    assert list(rows) == ["plain", "dedupe_vision", "shared_prefix", "packed"]
    assert rows["plain"]["speedup"] == rows["plain"]["ideal_speedup"] == 1.0
    assert 1.0 < rows["dedupe_vision"]["ideal_speedup"] < rows["shared_prefix"]["ideal_speedup"]
    assert rows["packed"]["ideal_speedup"] >= rows["shared_prefix"]["ideal_speedup"]  # less padding
    for row in rows.values():
        assert row["max_logp_diff"] < 1e-3 and row["pairs_per_s"] > 0 and row["peak_mb"] >= 0
