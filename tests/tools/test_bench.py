"""``mpo bench``: the FLOP counts behind its "ideal" column and TRL's batch, by hand; one run of
the CLI on the tiny model (every path scores the same log-probs and losses), one against TRL."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoModelForImageTextToText

from mpo.tools.bench.scenarios import SCENARIOS
from mpo.tools.bench.race import main
from mpo.tools.bench.ideal import shaped_pairs
from mpo.tools.bench.measure import FlopModel, Work, pair_work, path_tiles
from mpo.tools.bench.data import BenchData, make_records
from mpo.tools.bench.peer_trl import trl_inputs, trl_work
from mpo.types import EncodedPair

PAIRS = [EncodedPair([1, 2, 3], [4], [5, 6], None), EncodedPair([7], [8, 9, 10], [11], None)]


def test_flop_model_of_the_tiny_model_by_hand(tiny_model_dir):
    """The tiny InternVL (mpo.model.tiny SIZES["tiny"]): text hidden 64, 2 layers, 4 heads of 16,
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


def test_work_counts_the_prompt_once_with_prefix_sharing():
    """Pair 1: prompt 3, chosen 1, rejected 2; pair 2: prompt 1, chosen 3, rejected 1.
    Plain: rows of 4, 5, 4, 2 tokens = 15, causal pairs 10 + 15 + 10 + 3 = 38. Shared prefix:
    6 + 5 = 11 tokens, pairs 6 + 3*3 + 1 + 3 = 19 and 1 + 4*1 + 6 + 1 = 12. 7 scored tokens."""
    assert pair_work(PAIRS, shared_prefix=False) == Work(15, 38, 7)
    assert pair_work(PAIRS, shared_prefix=True) == Work(11, 31, 7)
    assert pair_work(PAIRS, shared_prefix=True, padding=3) == Work(14, 31, 7)  # pad slots cost tokens
    # a step: the policy's language model 3 forwards, its head 4, the reference 1 of each; the
    # policy's tiles once (frozen tower) or three times (trained), the reference's once
    flops = FlopModel(token=1000.0, pair_of_tokens=10.0, scored=1.0, tile=100.0)
    body = 11 * 1000 + 31 * 10
    assert flops.step(pair_work(PAIRS, True), 2, 2, vision_trainable=True, reference_forward=True) == 4 * body + 5 * 7 + 800
    assert flops.step(pair_work(PAIRS, True), 2, 0, vision_trainable=False, reference_forward=False) == 3 * body + 4 * 7 + 200


def test_trl_batch_and_work_by_hand():
    """TRL's rows: chosen then rejected, prompts left-padded to 3, completions right-padded to 3.
    24 slots; causal pairs 10 + 10 + 15 + 3 = 38; 7 completion tokens, scored alone where Triton
    runs, every shifted position (4 rows x 5) elsewhere."""
    inputs = trl_inputs(PAIRS, pad_id=0)
    assert inputs["input_ids"].tolist() == [[1, 2, 3, 4, 0, 0], [0, 0, 7, 8, 9, 10], [1, 2, 3, 5, 6, 0], [0, 0, 7, 11, 0, 0]]
    assert inputs["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 0, 0]]
    assert inputs["completion_mask"].tolist() == [[0, 0, 0, 1, 0, 0], [0, 0, 0, 1, 1, 1], [0, 0, 0, 1, 1, 0], [0, 0, 0, 1, 0, 0]]
    assert "pixel_values" not in inputs
    assert trl_work(inputs, every_position=True) == Work(24, 38, 20)
    assert trl_work(inputs, every_position=False) == Work(24, 38, 7)


def test_tiles_each_path_encodes():
    """Pairs of 3 and 2 tiles: TRL encodes each pair's tiles for both rows in both models; mpo
    once per pair for the policy, again for the reference only when the tower trains."""
    pairs = [EncodedPair([1], [2], [3], torch.zeros(3, 3, 1, 1)), EncodedPair([1], [2], [3], torch.zeros(2, 3, 1, 1))]
    assert path_tiles("trl", pairs, frozen=True) == path_tiles("trl", pairs, frozen=False) == (10, 10)
    assert path_tiles("auto", pairs, frozen=True) == (5, 0)
    assert path_tiles("plain", pairs, frozen=False) == (5, 5)
    assert path_tiles("precomputed", pairs, frozen=False) == (5, 0)


def test_shaped_pairs_have_the_prompt_layout_of_a_tiled_image():
    """7 tiles of 256 tokens: header 3 + <img> 7*256 </img> newline + question 60..100 + footer 5."""
    pairs = shaped_pairs(SCENARIOS["image_heavy"], 256, 4, seed=0)
    for pair in pairs:
        assert 3 + 7 * 256 + 3 + 60 + 5 <= len(pair.prompt_ids) <= 3 + 7 * 256 + 3 + 100 + 5
        assert pair.num_tiles == 7 and 48 <= len(pair.chosen_ids) <= 80


def test_ideal_only_reads_the_config_and_runs_nothing(tiny_model_dir, capsys):
    """A text-only plain step costs TRL what it costs mpo but for the padding (ratio about 1);
    prefix sharing and skipping the reference forward only add to it."""
    assert main(["--ideal-only", "--model", str(tiny_model_dir), "--vocab-size", "0", "--scenarios", "text_short",
                 "--vision", "frozen", "--steps", "2"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[1].split() == ["scenario", "vision", "plain", "shared_prefix", "packed", "auto", "precomputed"]
    ratios = [float(value.rstrip("x")) for value in printed[2].split()[2:]]
    assert 0.95 < ratios[0] < 1.1 and ratios[0] < ratios[1] <= ratios[2] == ratios[3] < ratios[4]


def _bench(tiny_model_dir, tmp_path, *extra) -> dict[str, dict]:
    out = tmp_path / "bench.json"
    assert main(["--model", str(tiny_model_dir), "--vocab-size", "2000", "--scenarios", "image_heavy", "--vision", "frozen",
                 "--steps", "1", "--threads", "1", "--json", str(out), *extra]) == 0
    report = json.loads(out.read_text())
    assert report["vocab_size"] == 2000
    return {row["path"]: row for row in report["results"]}


def test_bench_cli_every_path_scores_what_plain_scores(tiny_model_dir, tmp_path, capsys):
    """One timed step of every mpo path: a table, the figures in the JSON, the same log-probs and
    loss on every path, and the work each path saves in its ideal speed-up."""
    rows = _bench(tiny_model_dir, tmp_path)
    assert "image_heavy | frozen vision tower" in capsys.readouterr().out
    assert list(rows) == ["plain", "shared_prefix", "packed", "auto", "precomputed"]
    assert rows["plain"]["ideal_ratio"] == rows["plain"]["ratio"] == 1.0
    assert 1.0 < rows["shared_prefix"]["ideal_ratio"] <= rows["packed"]["ideal_ratio"] == rows["auto"]["ideal_ratio"]
    assert rows["precomputed"]["ideal_ratio"] > rows["auto"]["ideal_ratio"]  # no reference forward
    for row in rows.values():
        assert row["max_logp_diff"] < 1e-4 and row["max_loss_diff"] < 1e-5, row["path"]
        assert row["pairs_per_s"] > 0 and row["peak_mb"] >= 0


def test_bench_against_trl_scores_the_same_loss(tiny_model_dir, tmp_path, capsys):
    """TRL's DPOTrainer in its MPO setting on the same pairs (its own collator on the decoded
    images) and weights: the same loss, its settings printed, its GPU head (completion positions
    only) counted in its FLOPs; no precomputed TRL on image pairs, where TRL refuses it."""
    pytest.importorskip("trl")
    rows = _bench(tiny_model_dir, tmp_path, "--against", "trl", "--paths", "auto,precomputed")
    printed = capsys.readouterr().out
    assert "trl              TRL DPOTrainer" in printed and "LM head: completion positions only, as on CUDA/XPU" in printed
    assert list(rows) == ["trl", "plain", "auto", "precomputed"]
    assert rows["trl"]["ratio"] == rows["trl"]["ideal_ratio"] == 1.0
    assert rows["auto"]["baseline"] == rows["precomputed"]["baseline"] == "trl"
    for row in rows.values():
        assert row["max_loss_diff"] < 1e-5, row["path"]
    assert rows["auto"]["ideal_ratio"] == rows["auto"]["ideal_ratio_gpu"] > 1.0


def test_bench_against_trl_precomputing_on_text(tiny_model_dir, tmp_path):
    """On text pairs TRL also runs with precompute_ref_log_probs, the baseline of mpo's
    precomputed path; with --trl-head cpu TRL's head scores every position (more FLOPs here than
    on a GPU)."""
    pytest.importorskip("trl")
    out = tmp_path / "bench.json"
    assert main(["--model", str(tiny_model_dir), "--vocab-size", "2000", "--scenarios", "text_short", "--vision", "frozen",
                 "--steps", "1", "--threads", "1", "--json", str(out), "--against", "trl", "--trl-head", "cpu",
                 "--paths", "auto,precomputed"]) == 0
    rows = {row["path"]: row for row in json.loads(out.read_text())["results"]}
    assert list(rows) == ["trl", "trl_precomputed", "plain", "auto", "precomputed"]
    assert rows["precomputed"]["baseline"] == "trl_precomputed" and rows["auto"]["baseline"] == "trl"
    for row in rows.values():
        assert row["max_loss_diff"] < 1e-5, row["path"]
    assert rows["auto"]["ideal_ratio"] > rows["auto"]["ideal_ratio_gpu"] > 1.0  # TRL's CPU head scores every position


def test_records_reach_both_contenders_as_the_same_ids_and_tiles(tiny_model_dir, tiny_processor, tmp_path):
    """An image-heavy step written as JPEG files: mpo's dataset cuts each image into its 7 tiles
    (a thumbnail and a row of 6), TRL's collator sees the same token ids and tiles (once per row),
    and a changed token id is caught."""
    pytest.importorskip("trl")
    records = make_records(SCENARIOS["image_heavy"], tiny_processor.tokenizer, 64, 2, seed=0, directory=tmp_path)
    assert [len(r.images) for r in records] == [1, 1] and all(r.max_dynamic_patch == 6 for r in records)
    data = BenchData([records], tiny_processor)
    assert [pair.num_tiles for pair in data.pairs[0]] == [7, 7]
    inputs = data.trl_maker(data.trl_dataset(), data.trl_collator())(0)
    assert inputs["pixel_values"].shape[0] == 28
    data.check_trl_batch(0, inputs)
    inputs["input_ids"][0, inputs["attention_mask"][0].argmax()] += 1
    with pytest.raises(AssertionError, match="step 0, row 0"):
        data.check_trl_batch(0, inputs)


def test_gpu_shaped_trl_head_scores_completions_as_trl_does(tiny_model_dir):
    """TRL's fused head (trl's public add_fused_lm_head) scores every position on a CPU; the
    compact branch the bench gives it scores the completion positions only and returns the same
    log-probs and entropies there (zeros elsewhere) and the same gradients."""
    pytest.importorskip("trl")
    from trl.trainer.utils import add_fused_lm_head

    from mpo.tools.bench.peer_trl import score_completions_only

    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=torch.float32).train()
    outputs = ("log_probs", "entropy")
    models = []
    for compact in (False, True):
        copy_ = copy.deepcopy(model)
        add_fused_lm_head(copy_, outputs=outputs)
        if compact:
            score_completions_only(copy_, outputs)
        models.append(copy_)
    inputs = trl_inputs(PAIRS, pad_id=0)
    labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
    results = []
    for copy_ in models:
        out = copy_(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], labels=labels, fused_lm_head=True)
        out.log_probs.sum().backward()
        results.append((out, copy_.lm_head.weight.grad))
    (every, every_grad), (compact, compact_grad) = results
    mask = labels[:, 1:] != -100
    torch.testing.assert_close(compact.log_probs, every.log_probs * mask, atol=1e-6, rtol=0)
    torch.testing.assert_close(compact.entropy, every.entropy * mask, atol=1e-5, rtol=0)
    assert int((compact.log_probs != 0).sum()) == int(mask.sum()) == 7
    torch.testing.assert_close(compact_grad, every_grad, atol=1e-6, rtol=0)


def test_bench_with_data_workers_scores_the_same(tiny_model_dir, tmp_path):
    """--data-workers 1: each path's micro-batches decoded, tiled and tokenized by a DataLoader
    worker ahead of its step; the same log-probs and losses as in-step data."""
    rows = _bench(tiny_model_dir, tmp_path, "--data-workers", "1", "--paths", "auto")
    assert list(rows) == ["plain", "auto"]
    assert rows["auto"]["max_logp_diff"] < 1e-4 and rows["auto"]["max_loss_diff"] < 1e-5
    assert all(seconds >= 0 for seconds in rows["auto"]["data_seconds"])
