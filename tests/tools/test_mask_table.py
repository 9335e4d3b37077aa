"""``mpo memory --mask-table`` and the block mask's memory: the builder stays at block resolution
(under the planner's bound, under 1/20 of ``create_block_mask``'s at 16k tokens), the example rows
are the collators' layouts, and ``mpo memory`` counts the mask on the FlexAttention path."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig

from mpo.config import recipe_from_dict
from mpo.data.layouts import collate_packed
from mpo.model.block_mask import block_mask_bytes, pair_block_mask
from mpo.model.pair_attention import pair_blocks, pair_mask_mod
from mpo.tools.memory.activations import MicroBatchShape, estimate_activations
from mpo.tools.memory.mask_table import builder_case, example_row, layout_ids, main
from mpo.tools.memory.measure import peak_tensor_bytes
from mpo.types import EncodedPair


def test_example_rows_are_what_the_collator_lays_out():
    """Five pairs of 40/25/15/10/6 % of 1000 tokens (prompt 85 %, responses 7.5 % each) fill one
    packed row of 960 tokens; layout_ids gives the collator's ids for them."""
    row = example_row("packed", 1000)
    assert row == [(340, 30, 30), (212, 19, 19), (128, 11, 11), (84, 8, 8), (52, 4, 4)]  # round half to even
    assert example_row("shared_prefix", 2048) == [(1740, 154, 154)]
    pairs = [EncodedPair([1] * p, [2] * c, [3] * r, None) for p, c, r in row]
    batch = collate_packed(pairs, pad_id=0, pack_length=1000)
    pair_ids, part_ids = layout_ids([row], batch.input_ids.shape[1])
    assert torch.equal(pair_ids, batch.pair_ids) and torch.equal(part_ids, batch.part_ids)


@pytest.mark.parametrize("layout", ["shared_prefix", "packed"])
@pytest.mark.parametrize("length", [2048, 16384])
def test_memory_stays_at_block_resolution(layout, length):
    """The builder's peak stays under :func:`block_mask_bytes` and, at 16k tokens, under 1/20 of
    the ``[T, T]`` bool grid that ``create_block_mask`` allocates before anything else."""
    row = example_row(layout, length)
    pair_ids, part_ids = layout_ids([row], length)
    blocks = pair_blocks(pair_ids, part_ids)
    peak = peak_tensor_bytes(lambda: pair_block_mask(blocks, 1, length, pair_mask_mod(pair_ids, part_ids)))
    assert 0 < peak <= block_mask_bytes(1, length, pairs_per_row=len(row))
    assert peak * 20 <= length * length


def test_create_block_mask_costs_more_than_twenty_times_as_much_at_2k():
    ours = builder_case("pair_block_mask", "shared_prefix", 2048, torch.device("cpu"))
    theirs = builder_case("create_block_mask", "shared_prefix", 2048, torch.device("cpu"))
    assert ours["pairs"] == theirs["pairs"] == 1
    assert theirs["tensor_bytes"] >= 20 * ours["tensor_bytes"] and theirs["tensor_bytes"] >= 2048 * 2048


def test_memory_planner_counts_the_block_mask_on_the_flex_path():
    """InternVL3-1B, one pair of 7 tiles (prompt 7 * 256 + 64 = 1856 tokens) and responses of 96:
    one 2048-token row, 16 tiles a side; on CUDA (FlexAttention) the mask is
    block_mask_bytes(1, 2048) = 40 * 16**2 + 120 * (16 + 4 + 2)**2 + 4096 bytes; on a CPU (per-pair
    SDPA) there is none."""
    config = AutoConfig.from_pretrained("examples/model_configs/InternVL3-1B-hf")
    recipe = recipe_from_dict({"model": {"name_or_path": "x"}, "data": {"jsonl_path": "x.jsonl"}})
    shape = MicroBatchShape(1, 7, 7 * 256 + 64, 96, 96)
    cuda, cpu = (estimate_activations(recipe, config, shape, device) for device in ("cuda", "cpu"))
    assert cuda.mask == block_mask_bytes(1, 2048) == 40 * 256 + 120 * 22**2 + 4096
    assert cpu.mask == 0
    assert cuda.kept - cuda.mask == pytest.approx(cuda.vision + cuda.projector + cuda.language + cuda.head)


def test_mask_table_cli_prints_a_row_per_length_and_layout(capsys, tmp_path):
    """Two short lengths on the tiny model's size: the step's peak on the CPU kernel and both
    builders' peaks, create_block_mask's above the T x T grid."""
    out = tmp_path / "table.json"
    assert main(["--mask-table", "--model", "builtin:tiny", "--lengths", "256,512", "--json", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "per-pair SDPA" in lines[0]
    rows = [line.split() for line in lines[2:]]
    assert [(r[0], r[2]) for r in rows] == [("256", "shared_prefix"), ("256", "packed"), ("512", "shared_prefix"), ("512", "packed")]
    import json

    figures = json.loads(out.read_text())
    for case in figures["builders"]:
        if case["builder"] == "create_block_mask":
            assert case["tensor_bytes"] >= case["length"] ** 2
        else:
            assert case["tensor_bytes"] <= case["bound_bytes"]
    assert [step["length"] for step in figures["steps"]] == [256, 512] and all(step["step_bytes"] > 0 for step in figures["steps"])
