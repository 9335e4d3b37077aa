"""``mpo memory --mask-table``: the FlexAttention block mask's memory beside a training step's, at
2k/4k/8k/16k-token rows.

    mpo memory --mask-table [--model builtin:small] [--lengths 2048,4096,8192,16384] [--json FILE]

Per row length T, one shared-prefix row (a pair of prompt 85 %, chosen and rejected 7.5 % each;
the prompt holds one image tile) and one packed row (five pairs of 40, 25, 15, 10 and 6 % of the
row, 4 % padding):

* **step**: the measured peak of one training micro-batch of that shared-prefix row (policy
  forward, reference forward, MPO loss, backward; :func:`mpo.tools.memory.measure.measure`) above
  the two models, with the attention kernel the device runs: per-pair SDPA on a CPU,
  FlexAttention (with the block mask of :mod:`mpo.model.block_mask` inside) on a GPU;
* **block mask**: what building the row's ``BlockMask`` costs, each builder alone:
  ``create_block_mask`` over the ``[T, T]`` grid (what the FlexAttention path built before)
  and :func:`mpo.model.block_mask.pair_block_mask` from the pair blocks (what it builds now), as
  the peak of live torch allocations (torch's profiler on CPU, the allocator's peak on GPU), and
  the memory planner's bound (:func:`mpo.model.block_mask.block_mask_bytes`, what ``mpo memory``
  counts). The policy's forward and the reference's each build one.

``mpo gpu-check`` runs the same table on a GPU.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from torch.nn.attention.flex_attention import create_block_mask

from mpo.data.layouts import CHOSEN, PAD_PAIR, PROMPT, REJECTED
from mpo.model.block_mask import block_mask_bytes, pair_block_mask
from mpo.model.pair_attention import pair_blocks, pair_mask_mod
from mpo.tools.memory.measure import peak_tensor_bytes

LENGTHS = (2048, 4096, 8192, 16384)
DEFAULT_MODEL = "builtin:small"
"""The step column's model: a few million parameters, so a 16k-token row trains in minutes on a CPU."""
LAYOUTS = ("shared_prefix", "packed")


def layout_ids(rows: list[list[tuple[int, int, int]]], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``pair_ids`` / ``part_ids`` (``[R, T]``) of rows of ``(prompt, chosen, rejected)`` blocks,
    laid out as :func:`mpo.data.layouts.collate_rows` does, padded to ``length``."""
    pair_ids = torch.full((len(rows), length), PAD_PAIR, dtype=torch.long)
    part_ids = torch.full((len(rows), length), PROMPT, dtype=torch.long)
    pair = 0
    for r, row in enumerate(rows):
        start = 0
        for prompt, chosen, rejected in row:
            end = start + prompt + chosen + rejected
            pair_ids[r, start:end] = pair
            part_ids[r, start + prompt : start + prompt + chosen] = CHOSEN
            part_ids[r, start + prompt + chosen : end] = REJECTED
            start, pair = end, pair + 1
    return pair_ids, part_ids


def pair_of(tokens: int) -> tuple[int, int, int]:
    """``(prompt, chosen, rejected)`` of a pair of ``tokens``: prompt ~85 %, responses ~7.5 % each."""
    chosen = max(1, round(tokens * 0.075))
    return tokens - 2 * chosen, chosen, chosen


def example_row(layout: str, length: int) -> list[tuple[int, int, int]]:
    """One row of ``length`` tokens: one pair (``shared_prefix``), or five pairs of 40, 25, 15,
    10 and 6 % of the row with 4 % padding (``packed``)."""
    if layout == "shared_prefix":
        return [pair_of(length)]
    return [pair_of(int(length * share)) for share in (0.40, 0.25, 0.15, 0.10, 0.06)]


def builder_case(builder: str, layout: str, length: int, device: torch.device) -> dict:
    """Peak bytes of one row's mask built once by ``builder`` (``create_block_mask`` or
    ``pair_block_mask``) on ``device``, in this process."""
    pair_ids, part_ids = (t.to(device) for t in layout_ids([example_row(layout, length)], length))
    blocks = pair_blocks(pair_ids, part_ids)
    mask_mod = pair_mask_mod(pair_ids, part_ids)
    if builder == "create_block_mask":
        def build():
            return create_block_mask(mask_mod, B=1, H=None, Q_LEN=length, KV_LEN=length, device=device)
    else:
        def build():
            return pair_block_mask(blocks, 1, length, mask_mod, device)
    build()  # the first call sets up what later calls reuse (kernels, the profiler's own state)
    return {"tensor_bytes": peak_tensor_bytes(build, device), "pairs": len(blocks)}


def measure_builders(lengths=LENGTHS, layouts=LAYOUTS, device: torch.device = torch.device("cpu")) -> list[dict]:
    """Both builders for one row per (layout, length): the peak of the tensors each build holds
    above what was live before it (counted per build, so one case's memory cannot hide another's)."""
    results = []
    for layout in layouts:
        for length in lengths:
            for builder in ("create_block_mask", "pair_block_mask"):
                figures = builder_case(builder, layout, length, device)
                bound = block_mask_bytes(1, length, pairs_per_row=figures["pairs"])
                results.append({"layout": layout, "length": length, "builder": builder, **figures, "bound_bytes": bound})
    return results


def measure_step(model: str, length: int, device: torch.device) -> dict:
    """The measured peak of one training micro-batch of one shared-prefix row of ``length`` tokens."""
    from transformers import AutoConfig

    from mpo.config import recipe_from_dict
    from mpo.model.loading import resolve_model_path
    from mpo.tools.memory.activations import MicroBatchShape
    from mpo.tools.memory.measure import measure

    dtype = "bfloat16" if device.type == "cuda" else "float32"
    recipe = recipe_from_dict({"model": {"name_or_path": model, "dtype": dtype},
                               "forward": {"layout": "shared_prefix", "attention": "auto"},
                               "train": {"micro_batch_size": 1, "mixed_precision": "bf16" if device.type == "cuda" else "no"},
                               "data": {"jsonl_path": "unread.jsonl", "max_length": length}})  # no data is read
    config = AutoConfig.from_pretrained(resolve_model_path(model))
    prompt, chosen, rejected = pair_of(length)
    result = measure(recipe, config, MicroBatchShape(1, 1, prompt, chosen, rejected), device)
    kernel = "FlexAttention" if device.type == "cuda" else "per-pair SDPA"
    return {"length": length, "kernel": kernel, "step_bytes": result.step, "seconds": result.seconds}


def table(model: str, lengths=LENGTHS, device: torch.device = torch.device("cpu")) -> tuple[str, dict]:
    """The printed table and its figures."""
    builders = measure_builders(lengths, device=device)
    steps = [measure_step(model, length, device) for length in lengths]
    mib = 2**20
    lines = [
        f"block mask vs training step, one row per length, on {device.type} ({model}; step: {steps[0]['kernel']}, "
        "a shared-prefix row, above the models; block mask: peak of live tensors while it is built, one build)",
        f"{'tokens':>7} {'step MiB':>9} {'layout':<14} {'create_block_mask MiB':>22} {'pair_block_mask MiB':>20} "
        f"{'planner bound MiB':>18} {'reduction':>10}",
    ]
    for step in steps:
        for layout in LAYOUTS:
            old, new = (next(r for r in builders if (r["layout"], r["length"], r["builder"]) == (layout, step["length"], b))
                        for b in ("create_block_mask", "pair_block_mask"))
            step_mib = f"{step['step_bytes'] / mib:9.0f}" if layout == "shared_prefix" else f"{'-':>9}"
            lines.append(
                f"{step['length']:>7} {step_mib} {layout:<14} {old['tensor_bytes'] / mib:>22.2f} {new['tensor_bytes'] / mib:>20.2f} "
                f"{new['bound_bytes'] / mib:>18.2f} {old['tensor_bytes'] / max(1, new['tensor_bytes']):>9.0f}x"
            )
    return "\n".join(lines), {"device": str(device), "model": model, "steps": steps, "builders": builders}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mpo memory --mask-table", description=__doc__.splitlines()[0])
    parser.add_argument("--mask-table", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="the model of the step column (an InternVL -hf directory or builtin:<size>)")
    parser.add_argument("--lengths", default=",".join(map(str, LENGTHS)), help="row lengths in tokens, comma-separated")
    parser.add_argument("--json", default="", help="also write every figure to this file")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    text, figures = table(args.model, [int(n) for n in args.lengths.split(",")], device)
    print(text)
    if args.json:
        from mpo.jsonl import write_text_atomic

        write_text_atomic(args.json, json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
