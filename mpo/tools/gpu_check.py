"""``mpo gpu-check``: what only a GPU can confirm, in one command (a few minutes on one GPU).

    mpo gpu-check [--bench-steps 3] [--json FILE]

1. **FlexAttention against per-pair SDPA** (``flex``): the bench InternVL in fp32, image and text
   pairs in the packed and shared-prefix layouts, forward and backward with each kernel; the
   summed log-probs and the gradients must agree (FlexAttention trains on CUDA only, so CPU tests
   cannot check it).
2. **bf16 against fp32 on the loss terms** (``bf16``): the bench model at InternVL3's vocabulary,
   a policy moved away from its reference, weights rounded to bf16 first so only the arithmetic
   differs; the DPO, BCO and SFT terms of ``layout: auto`` under a bf16 recipe (bf16 weights,
   bf16 autocast, fp32 LM head) against fp32.
3. **mpo bench on the GPU** (``bench``): :mod:`mpo.tools.bench.race` with its defaults there (bf16,
   FlexAttention, MFU against the GPU's bf16 peak), ``--against trl`` when TRL is installed.
4. **The block mask's memory** (``mask``): ``mpo memory --mask-table`` on the GPU
   (:mod:`mpo.tools.memory.mask_table`): a training step's peak with FlexAttention at
   2k/4k/8k/16k-token rows beside ``create_block_mask``'s and the pair-block builder's; passes
   when the builder stays under the planner's bound and under 1/20 of ``create_block_mask`` at
   16k tokens.

One summary follows, a line per check; exit 0 when every check passes, 1 otherwise. Without a CUDA
device it prints why it skipped and exits 0 having checked nothing.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import torch

from mpo.tools.bench.data import BenchData, make_records
from mpo.tools.bench.scenarios import INTERNVL3_VOCAB, SCENARIOS, load_bench_model
from mpo.tools.bench.race import main as bench_main
from mpo.tools.bench.peer_trl import trl_available
from mpo.model.forward import PreferenceForward
from mpo.losses import MPOLoss
from mpo.data.layouts import collate_packed, collate_shared_prefix

# Summed log-probs of ~60-token responses in fp32: the kernels' accumulation orders differ.
FLEX_LOGP_ATOL = 1e-3
FLEX_GRAD_RTOL = 1e-3  # largest gradient difference over the largest gradient entry
# bf16 arithmetic on a moved policy (bf16 weights, fp32 head): the terms' expected drift.
BF16_TERM_ATOL = {"dpo": 1e-2, "bco": 1e-2}
BF16_SFT_RTOL = 2e-2


@dataclasses.dataclass
class Check:
    name: str
    passed: bool
    summary: str
    figures: dict
    seconds: float = 0.0


def check_pairs(processor, tile_size: int, seed: int = 0) -> list:
    """Two image-heavy and two short text pairs (bench shapes, their images decoded and tiled from
    JPEG files): every block shape of a real batch."""
    with tempfile.TemporaryDirectory(prefix="mpo-gpu-check-") as directory:
        records = (make_records(SCENARIOS["image_heavy"], processor.tokenizer, tile_size, 2, seed, Path(directory))
                   + make_records(SCENARIOS["text_short"], processor.tokenizer, tile_size, 2, seed + 1, Path(directory)))
        return BenchData([records], processor).pairs[0]


def _logps_and_grads(forward: PreferenceForward, batch) -> tuple[torch.Tensor, torch.Tensor]:
    forward.zero_grad(set_to_none=True)
    logps = forward(batch).logps
    summed = torch.cat([logps.chosen_logps, logps.rejected_logps])
    summed.sum().backward()
    grads = torch.cat([p.grad.reshape(-1) for p in forward.parameters() if p.grad is not None])
    return summed.detach(), grads


def check_flex(device: torch.device, model_name: str = "builtin:bench") -> Check:
    """FlexAttention's log-probs and gradients against per-pair SDPA's, both prefix layouts."""
    model, processor = load_bench_model(argparse.Namespace(model=model_name, dtype="float32", vocab_size=0, seed=0), device)
    forward = PreferenceForward(model.requires_grad_(True)).train()
    pairs = check_pairs(processor, model.config.vision_config.image_size[0])
    pad_id = processor.tokenizer.pad_token_id
    figures, passed = {}, True
    for layout, batch in (("packed", collate_packed(pairs, pad_id, 4096, "sdpa")), ("shared_prefix", collate_shared_prefix(pairs, pad_id, "sdpa"))):
        sdpa_logps, sdpa_grads = _logps_and_grads(forward, batch.to(device))
        flex_logps, flex_grads = _logps_and_grads(forward, dataclasses.replace(batch, attention="flex").to(device))
        logp = float((flex_logps - sdpa_logps).abs().max())
        grad = float((flex_grads - sdpa_grads).abs().max() / sdpa_grads.abs().max())
        figures[layout] = {"max_logp_diff": logp, "grad_rel_diff": grad}
        passed &= logp <= FLEX_LOGP_ATOL and grad <= FLEX_GRAD_RTOL
    summary = ", ".join(f"{layout} |dlogp| {f['max_logp_diff']:.1e}, grad {f['grad_rel_diff']:.1e}" for layout, f in figures.items())
    return Check("flex", passed, f"{summary} (limits {FLEX_LOGP_ATOL:.0e}, {FLEX_GRAD_RTOL:.0e})", figures)


@torch.no_grad()
def _terms(policy: PreferenceForward, reference: PreferenceForward, batch, bf16: bool) -> dict[str, float]:
    with torch.autocast(batch.input_ids.device.type, dtype=torch.bfloat16, enabled=bf16):
        output = MPOLoss()(policy(batch).logps, reference(batch).logps, 0.0)
    return {name: float(value) for name, value in output.terms.items()}


def check_bf16(device: torch.device, model_name: str = "builtin:bench", vocab_size: int = INTERNVL3_VOCAB) -> Check:
    """The loss terms of a bf16 recipe against fp32, same (bf16-representable) weights."""
    args = argparse.Namespace(model=model_name, dtype="float32", vocab_size=vocab_size, seed=0)
    reference, processor = load_bench_model(args, device)
    policy = copy.deepcopy(reference)
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in policy.parameters():  # a policy some way from its reference
            parameter.add_(0.05 * parameter.std().nan_to_num() * torch.randn_like(parameter))
        for parameter in (*policy.parameters(), *reference.parameters()):
            parameter.copy_(parameter.bfloat16())  # bf16-representable: only the arithmetic differs
    pad_id = processor.tokenizer.pad_token_id
    batch = collate_shared_prefix(check_pairs(processor, reference.config.vision_config.image_size[0]), pad_id, "auto").to(device)
    fp32 = _terms(PreferenceForward(copy.deepcopy(policy)), PreferenceForward(copy.deepcopy(reference)), batch, bf16=False)
    bf16 = _terms(PreferenceForward(policy.bfloat16()), PreferenceForward(reference.bfloat16()), batch, bf16=True)
    diffs = {name: abs(bf16[name] - fp32[name]) for name in fp32}
    passed = all(diffs[name] <= limit for name, limit in BF16_TERM_ATOL.items()) and diffs["sft"] <= BF16_SFT_RTOL * abs(fp32["sft"])
    summary = ", ".join(f"{name} {fp32[name]:.4f} -> {bf16[name]:.4f}" for name in fp32)
    return Check("bf16", passed, f"{summary} (limits dpo/bco +-{BF16_TERM_ATOL['dpo']:.0e}, sft {BF16_SFT_RTOL:.0%})",
                 {"fp32": fp32, "bf16": bf16, "diff": diffs})


def check_bench(steps: int, extra: list[str] | None = None) -> Check:
    """``mpo bench`` with its defaults on this device; passes when every path's loss matches."""
    with tempfile.TemporaryDirectory() as directory:
        out = Path(directory) / "bench.json"
        against = ["--against", "trl"] if trl_available() else []
        bench_main(["--steps", str(steps), "--json", str(out), *against, *(extra or [])])
        rows = json.loads(out.read_text())["results"]
    worst = max(row["max_loss_diff"] for row in rows)
    auto = [row for row in rows if row["path"] in ("auto", "precomputed")]
    summary = "; ".join(
        f"{row['scenario']} {row['vision']} {row['path']} {row['ratio']:.2f}x {row['baseline']}"
        + (f" MFU {100 * row['mfu']:.1f}%" if row["mfu"] is not None else "") for row in auto
    )
    # bf16 rounding differs between layouts (different reductions); 1e-2 is far below a wrong mask
    return Check("bench", worst < 1e-2, f"{summary}; largest loss difference between paths {worst:.1e}", {"rows": rows})


def check_mask(device: torch.device, model_name: str = "", lengths: tuple[int, ...] = ()) -> Check:
    """``mpo memory --mask-table`` on ``device``: the step's peak (FlexAttention on a GPU) and both
    builders' peaks at 2k/4k/8k/16k-token rows (or ``lengths``)."""
    from mpo.tools.memory.mask_table import DEFAULT_MODEL, LENGTHS, table

    lengths = lengths or LENGTHS
    text, figures = table(model_name or DEFAULT_MODEL, lengths, device)
    print(text, flush=True)
    longest = max(lengths)
    passed = True
    for layout in ("shared_prefix", "packed"):
        old, new = (next(c for c in figures["builders"] if (c["layout"], c["length"], c["builder"]) == (layout, longest, b))
                    for b in ("create_block_mask", "pair_block_mask"))
        passed &= new["tensor_bytes"] <= new["bound_bytes"] and 20 * new["tensor_bytes"] <= old["tensor_bytes"]
    steps = ", ".join(f"{s['length']} tokens {s['step_bytes'] / 2**20:.0f} MiB" for s in figures["steps"])
    builders = [c for c in figures["builders"] if c["length"] == longest and c["layout"] == "shared_prefix"]
    summary = (f"step peaks ({figures['steps'][0]['kernel']}): {steps}; block mask at {longest} tokens: "
               + " vs ".join(f"{c['builder']} {c['tensor_bytes'] / 2**20:.2f} MiB" for c in builders))
    return Check("mask", passed, summary, figures)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mpo gpu-check", description=__doc__.splitlines()[0])
    parser.add_argument("--bench-steps", type=int, default=3, help="timed steps per path in the bench part")
    parser.add_argument("--json", default="", help="also write every figure to this file")
    return parser.parse_args(argv)


def run_checks(device: torch.device, bench_steps: int) -> list[Check]:
    checks = []
    runs = (("flex", lambda: check_flex(device)), ("bf16", lambda: check_bf16(device)), ("bench", lambda: check_bench(bench_steps)),
            ("mask", lambda: check_mask(device)))
    for name, run in runs:
        started = time.perf_counter()
        try:
            check = run()
        except Exception as error:  # noqa: BLE001 (one failed check must not hide the others' results)
            check = Check(name, False, f"crashed: {type(error).__name__}: {error}", {})
        check.seconds = time.perf_counter() - started
        checks.append(check)
        print(f"[{name}] {'PASS' if check.passed else 'FAIL'} in {check.seconds:.0f} s: {check.summary}", flush=True)
    return checks


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print(f"mpo gpu-check: skipped, nothing checked: no CUDA device here (torch {torch.__version__}, "
              f"built with CUDA {torch.version.cuda or 'no'}). Run `mpo gpu-check` on a machine with a GPU.")
        return 0
    device = torch.device("cuda")
    print(f"mpo gpu-check on {torch.cuda.get_device_name(device)} (torch {torch.__version__}, CUDA {torch.version.cuda})", flush=True)
    checks = run_checks(device, args.bench_steps)
    print("\nsummary")
    for check in checks:
        print(f"  {check.name:<6} {'PASS' if check.passed else 'FAIL'}  {check.seconds:4.0f} s  {check.summary}")
    if args.json:
        Path(args.json).write_text(json.dumps([dataclasses.asdict(c) for c in checks], indent=1))
    return 0 if all(check.passed for check in checks) else 1
