"""``mpo bench``: training speed and memory of mpo's layouts, and of TRL on the same pairs.

    mpo bench [--against trl] [--trl-head gpu|cpu] [--model builtin:bench] [--vocab-size 151674]
              [--scenarios image_heavy,text_short] [--vision frozen,trainable]
              [--steps 3] [--warmup 1] [--threads 1] [--data-workers 0] [--json FILE]
    mpo bench --ideal-only --model examples/model_configs/InternVL3-8B-hf

For each scenario (pairs of a given shape, their images JPEG files: :mod:`mpo.tools.bench.data`)
and each vision-tower setting, the same model takes true training steps, end to end: the
micro-batch's images decoded and tiled and its text tokenized (in the step, or by
``--data-workers`` background workers for every contender alike), the layout's collate, policy
forward and backward, reference forward, MPO loss, gradient clipping, the trainer's fused AdamW,
along each path:

* ``plain``: a chosen and a rejected row per pair, the vision tower once per pair;
* ``shared_prefix``: one row ``[prompt | chosen | rejected]`` per pair (:mod:`mpo.model.pair_attention`);
* ``packed``: several such pairs per row, up to ``--pack-length`` tokens;
* ``auto``: the recipes' default, ``shared_prefix`` or ``packed`` per micro-batch;
* ``precomputed``: ``auto`` with the reference log-probs looked up (``mpo precompute-ref``), so
  the step runs no reference forward;
* ``trl`` (``--against trl``): TRL's ``DPOTrainer`` in its MPO setting, its reference run live,
  its LM head scoring completion positions only as on a GPU (``--trl-head``;
  :mod:`mpo.tools.bench.peer_trl` says how);
* ``trl_precomputed`` (``--against trl``, text pairs): TRL with ``precompute_ref_log_probs``,
  the baseline of mpo's ``precomputed`` path there (TRL refuses it for image data, where
  ``precomputed`` is compared with ``trl``).

Every contender's settings are printed above its scenario's table. The objective is TRL's MPO
loss list here (reward shift 0, the SFT term a token mean), so the losses of every path can be
compared with TRL's. Every path starts each timed step from the same weights and optimizer state
(a snapshot taken after the warm-up steps), so the paths score the same model, and the log-probs
and losses at a step must agree. The paths' steps are interleaved (the order rotates each step)
so that load from other processes hits them alike.

Reported per path: pairs/s (median step time), peak memory above the resting process during a
step: the peak of live tensors (``torch.cuda.max_memory_allocated`` on GPU; on a CPU, one more
untimed step under torch's profiler, which records every allocation: what a GPU's allocator would
hold) and the resident set (RSS sampled every millisecond on CPU, which also holds what the C heap
keeps after freeing), each as a ratio over the baseline; the ratio over its baseline (:func:`baseline_of`) in wall time and in CPU time
(:func:`mpo.tools.bench.measure.cpu_clock`, medians), the step's median wait for its data, the
FLOP-ideal ratio (matmul FLOPs counted from the model's dimensions:
:class:`mpo.tools.bench.measure.FlopModel`), the share of it achieved, the FLOP rate (MFU on a
GPU), and the largest log-prob and loss differences from ``plain``.

``--ideal-only`` (:mod:`mpo.tools.bench.ideal`) runs nothing: it reads a checkpoint's config (no weights) and prints the FLOP-ideal
ratios of every path over TRL on a GPU for the same scenarios, each image tiled as that model
tiles it, so the bench model's figures can be set against a real InternVL3's.

The default model, ``builtin:bench``, is the random ``bench`` InternVL of :mod:`mpo.model.tiny`
(23 M parameters besides the embeddings, 128-px tiles of 64 tokens), its vocabulary widened to
InternVL3's 151,674 tokens (``--vocab-size``, tied embeddings) so the LM head weighs what it
weighs against a real vocabulary.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mpo.tools.bench.contenders import MPORace, trl_contender
from mpo.tools.bench.data import BenchData, Scenario, make_records
from mpo.tools.bench.measure import FlopModel, PeakMemory, cpu_clock, gpu_peak_tflops
from mpo.tools.bench.peer_trl import TRL_HEADS
from mpo.tools.memory.measure import peak_tensor_bytes
from mpo.tools.bench.scenarios import INTERNVL3_VOCAB, PATHS, SCENARIOS, load_bench_model
from mpo.types import EncodedPair


@dataclass
class PathResult:
    name: str
    seconds: list[float] = field(default_factory=list)
    cpu_seconds: list[float] = field(default_factory=list)
    data_seconds: list[float] = field(default_factory=list)
    peak_bytes: int = 0  # RSS (CPU) or allocator (GPU) peak over the timed steps
    tensor_bytes: int = 0  # peak of live tensors (the GPU's allocator peak; on a CPU, one more step under the profiler)
    flops: list[float] = field(default_factory=list)
    gpu_flops: list[float] = field(default_factory=list)  # what it would be on CUDA (differs for TRL's CPU head)
    losses: list[float] = field(default_factory=list)
    logps: list[torch.Tensor] = field(default_factory=list)
    pairs: int = 0


def timed(device: torch.device, run) -> tuple[float, float, int, object]:
    """(wall seconds, CPU seconds, peak bytes, result) of ``run()``."""
    with PeakMemory(device) as memory:
        started, cpu_started = time.perf_counter(), cpu_clock()
        result = run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds, cpu_seconds = time.perf_counter() - started, cpu_clock() - cpu_started
    return seconds, cpu_seconds, memory.bytes, result


def baseline_of(name: str, names: list[str]) -> str:
    """Whose pairs/s path ``name`` is compared with: TRL with a precomputed reference for mpo's
    precomputed path where TRL can precompute (text), else TRL, else ``plain``."""
    if name == "precomputed" and "trl_precomputed" in names:
        return "trl_precomputed"
    if name == "trl_precomputed":
        return name
    return "trl" if "trl" in names else "plain"


def bench_setting(args, scenario: Scenario, frozen: bool, base, processor, flop_model: FlopModel,
                  device) -> tuple[list[dict], list[list[EncodedPair]], list[str]]:
    """Every contender's steps on one scenario and vision mode; (table rows, the timed steps'
    pairs, the contenders' settings lines)."""
    tile_size = base.config.vision_config.image_size[0]
    timed_steps = args.warmup + args.steps
    steps = timed_steps + (device.type == "cpu")  # on a CPU, one more step for the tensor peak
    with tempfile.TemporaryDirectory(prefix="mpo-bench-") as directory:
        records = [make_records(scenario, processor.tokenizer, tile_size, args.pairs, args.seed * 1000 + step, Path(directory))
                   for step in range(steps)]
        data = BenchData(records, processor)
        # Copies: mpo's forward swaps the LM head of the models it wraps, TRL patches their forward.
        race = MPORace(args, copy.deepcopy(base), copy.deepcopy(base), frozen, processor.tokenizer.pad_token_id, device)
        race.precompute(data.pairs)
        contenders = []
        for name in args.paths:
            if name.startswith("trl"):
                if name == "trl_precomputed" and data.has_images:
                    continue  # TRL refuses precompute_ref_log_probs for vision data
                contenders.append(trl_contender(name, args, base, processor, data, frozen, device, steps, race.policy))
            else:
                contenders.append(race.contender(name, data, steps))
        results = {c.name: PathResult(c.name) for c in contenders}
        for step in range(timed_steps):
            if step == args.warmup:  # from here on every path starts each step where the warm-up left it
                snapshots = {c.name: c.snapshot() for c in contenders}
            for contender in contenders[step % len(contenders):] + contenders[: step % len(contenders)]:  # rotate
                if step >= args.warmup:
                    snapshots["plain"].restore()  # mpo's policy, which TRL's copies its weights from
                    if snapshots[contender.name] is not snapshots["plain"]:
                        snapshots[contender.name].restore()
                    contender.sync()
                contender.reset_tiles()
                seconds, cpu_seconds, peak, outcome = timed(device, contender.run)
                contender.check()
                if step < args.warmup:
                    continue
                result = results[contender.name]
                result.seconds.append(seconds)
                result.cpu_seconds.append(cpu_seconds)
                result.data_seconds.append(outcome.data_seconds)
                result.peak_bytes = max(result.peak_bytes, peak)
                result.pairs = len(data.records[step])
                result.losses.append(outcome.loss)
                if outcome.logps is not None:
                    result.logps.append(outcome.logps)
                tiles = contender.tiles()
                for target, counted in ((result.flops, outcome.work), (result.gpu_flops, outcome.gpu_work)):
                    target.append(flop_model.step(counted, *tiles, vision_trainable=not frozen, reference_forward=outcome.reference_forward))
        for contender in contenders:
            result = results[contender.name]
            if device.type == "cuda":
                result.tensor_bytes = result.peak_bytes  # PeakMemory read the allocator already
                continue
            # Untimed (the profiler slows a step down): the live tensors' peak, what a GPU's
            # allocator would have to hold, without the CPU heap's fragmentation that RSS shows.
            snapshots["plain"].restore()
            if snapshots[contender.name] is not snapshots["plain"]:
                snapshots[contender.name].restore()
            contender.sync()
            result.tensor_bytes = peak_tensor_bytes(contender.run)
            contender.check()
    settings = [f"  {c.name:<16} {c.settings}" for c in contenders]
    return summarize(args, list(results.values()), scenario, frozen, device), data.pairs[args.warmup : timed_steps], settings


def summarize(args, results: list[PathResult], scenario: Scenario, frozen: bool, device: torch.device) -> list[dict]:
    by_name = {result.name: result for result in results}
    plain = by_name["plain"]
    peak = args.peak_tflops * 1e12 if args.peak_tflops else None
    rows = []
    for result in results:
        baseline = by_name[baseline_of(result.name, list(by_name))]
        seconds, cpu_seconds = statistics.median(result.seconds), statistics.median(result.cpu_seconds)
        flops = statistics.mean(result.flops)
        ratio = statistics.median(baseline.seconds) / seconds
        ideal = statistics.mean(baseline.flops) / flops
        rows.append({
            "scenario": scenario.name,
            "vision": "frozen" if frozen else "trainable",
            "path": result.name,
            "baseline": baseline.name,
            "pairs_per_s": result.pairs / seconds,
            "step_seconds": result.seconds,
            "cpu_seconds": result.cpu_seconds,
            "data_seconds": result.data_seconds,
            "peak_mb": result.tensor_bytes / 2**20,
            "memory_ratio": result.tensor_bytes / max(1, baseline.tensor_bytes),
            "rss_mb": result.peak_bytes / 2**20,
            "rss_ratio": result.peak_bytes / max(1, baseline.peak_bytes),
            "ratio": ratio,
            "cpu_ratio": statistics.median(baseline.cpu_seconds) / cpu_seconds,
            "ideal_ratio": ideal,
            "ideal_ratio_gpu": statistics.mean(baseline.gpu_flops) / statistics.mean(result.gpu_flops),
            "of_ideal": ratio / ideal,
            "gflop_per_step": flops / 1e9,
            "achieved_gflops": flops / seconds / 1e9,
            "mfu": flops / seconds / peak if peak else None,
            "max_logp_diff": max((float((a - b).abs().max()) for a, b in zip(result.logps, plain.logps)), default=None),
            "max_loss_diff": max(abs(a - b) for a, b in zip(result.losses, plain.losses)),
        })
    return rows


def format_table(rows: list[dict], scenario: Scenario, batches: list[list[EncodedPair]], settings: list[str],
                 load: tuple[float, float]) -> str:
    pairs = [pair for batch in batches for pair in batch]
    prompt = sum(len(p.prompt_ids) for p in pairs) / len(pairs)
    response = sum(len(p.chosen_ids) + len(p.rejected_ids) for p in pairs) / (2 * len(pairs))
    tiles = sum(p.num_tiles for p in pairs) / len(pairs)
    lines = [
        f"{scenario.name} | {rows[0]['vision']} vision tower | {len(batches[0])} pairs/step | prompt {prompt:.0f} tokens "
        f"({tiles:.1f} tiles), responses {response:.0f} tokens | load average {load[0]:.1f} -> {load[1]:.1f}",
        *settings,
        f"{'path':<16} {'pairs/s':>8} {'peak MB':>8} {'RSS MB':>7} {'vs':<16} {'wall':>6} {'(CPU)':>7} {'mem':>5} {'RSS':>5} {'data ms':>7} "
        f"{'ideal':>6} {'of ideal':>8} {'ideal GPU':>9} {'GFLOP/s':>8} {'MFU':>6} {'max|dlogp|':>10} {'|dloss|':>8}",
    ]
    for row in rows:
        mfu = f"{100 * row['mfu']:5.1f}%" if row["mfu"] is not None else "     -"
        logp = f"{row['max_logp_diff']:.1e}" if row["max_logp_diff"] is not None else "-"
        data_ms = 1000 * statistics.median(row["data_seconds"])
        lines.append(
            f"{row['path']:<16} {row['pairs_per_s']:>8.3f} {row['peak_mb']:>8.0f} {row['rss_mb']:>7.0f} {row['baseline']:<16} {row['ratio']:>5.2f}x "
            f"{row['cpu_ratio']:>6.2f}x {row['memory_ratio']:>5.2f} {row['rss_ratio']:>5.2f} {data_ms:>7.1f} {row['ideal_ratio']:>5.2f}x "
            f"{100 * row['of_ideal']:>7.0f}% {row['ideal_ratio_gpu']:>8.2f}x {row['achieved_gflops']:>8.1f} "
            f"{mfu:>6} {logp:>10} {row['max_loss_diff']:>8.1e}"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mpo bench", description=__doc__.splitlines()[0])
    parser.add_argument("--against", default="", choices=["", "trl"], help="also race TRL's DPOTrainer (pip install -e .[trl])")
    parser.add_argument("--trl-head", default="gpu", choices=TRL_HEADS,
                        help="gpu: TRL's LM head scores completion positions only, as on CUDA (default); cpu: as TRL runs on a CPU")
    parser.add_argument("--data-workers", type=int, default=0,
                        help="DataLoader workers that decode, tile and collate ahead, for every contender (0: in the timed step)")
    parser.add_argument("--model", default="builtin:bench", help="an InternVL -hf directory, or builtin:<size>")
    parser.add_argument("--vocab-size", type=int, default=INTERNVL3_VOCAB,
                        help="widen (or narrow) the vocabulary to this many tokens, tied embeddings (0: the checkpoint's own)")
    parser.add_argument("--scenarios", default="image_heavy,text_short", help=f"comma-separated, from {', '.join(SCENARIOS)}")
    parser.add_argument("--vision", default="frozen,trainable", help="frozen and/or trainable vision tower + projector")
    parser.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated, from {', '.join(PATHS)}")
    parser.add_argument("--pairs", type=int, default=2, help="pairs per micro-batch (one step)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per path (medians are reported)")
    parser.add_argument("--warmup", type=int, default=-1, help="untimed steps first (default 1 on CPU, 3 on GPU)")
    parser.add_argument("--pack-length", type=int, default=4096, help="row length of the packed and auto paths")
    parser.add_argument("--attention", default="auto", choices=["auto", "sdpa", "flex"], help="forward.attention")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="auto: float32 on CPU, bfloat16 on GPU")
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="the device's peak for MFU (default: known GPUs' bf16 peak)")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--json", default="", help="also write every figure to this file")
    parser.add_argument("--ideal-only", action="store_true", help="print the FLOP-ideal ratios over TRL on a GPU at --model's dimensions, run nothing")
    args = parser.parse_args(argv)
    args.scenarios, args.vision, args.paths = args.scenarios.split(","), args.vision.split(","), args.paths.split(",")
    for value, allowed, flag in ((args.scenarios, SCENARIOS, "--scenarios"), (args.vision, ("frozen", "trainable"), "--vision"), (args.paths, PATHS, "--paths")):
        unknown = [v for v in value if v not in allowed]
        if unknown:
            parser.error(f"{flag}: unknown {unknown}; choose from {', '.join(allowed)}")
    if "plain" not in args.paths:
        args.paths = ["plain"] + args.paths  # every log-prob and loss is compared with it
    if args.against == "trl" and not args.ideal_only:
        from mpo.tools.bench.peer_trl import trl_available

        if not trl_available():
            parser.error("--against trl: TRL is not installed; pip install -e .[trl]")
        # TRL with its reference precomputed races mpo's precomputed path on text pairs
        args.paths = ["trl"] + (["trl_precomputed"] if "precomputed" in args.paths else []) + args.paths
    if args.warmup == 0:
        parser.error("--warmup: at least 1 (the snapshot every path starts from is taken after it)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.ideal_only:
        from mpo.tools.bench.ideal import ideal_only

        return ideal_only(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device))
    args.dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    if args.warmup < 0:
        args.warmup = 3 if device.type == "cuda" else 1
    if device.type == "cuda" and not args.peak_tflops:
        args.peak_tflops = gpu_peak_tflops(torch.cuda.get_device_name(device)) or 0.0
    base, processor = load_bench_model(args, device)
    flop_model = FlopModel.from_model(base)
    params = sum(p.numel() for p in base.parameters())
    vocab = base.get_input_embeddings().weight.shape[0]
    where = f"{torch.get_num_threads()} threads" if device.type == "cpu" else torch.cuda.get_device_name(device)
    print(
        f"mpo bench: {args.model} ({params / 1e6:.1f} M parameters, vocabulary {vocab:,}, {args.dtype}) on {device} ({where}); "
        f"{args.pairs} pairs/step, {args.warmup} warm-up + {args.steps} timed steps per path (medians); "
        f"packed rows of {args.pack_length} tokens\n"
    )
    started = time.perf_counter()
    results = []
    for name in args.scenarios:
        for vision in args.vision:
            load_before = os.getloadavg()[0]
            rows, batches, settings = bench_setting(args, SCENARIOS[name], vision == "frozen", base, processor, flop_model, device)
            load = (load_before, os.getloadavg()[0])
            print(format_table(rows, SCENARIOS[name], batches, settings, load) + "\n", flush=True)
            results.extend({**row, "load_average": load} for row in rows)
    print(f"done in {time.perf_counter() - started:.0f} s, load average {os.getloadavg()[0]:.1f}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"model": args.model, "vocab_size": vocab, "device": str(device), "dtype": args.dtype,
                       "threads": torch.get_num_threads(), "trl_head": args.trl_head, "data_workers": args.data_workers,
                       "results": results}, handle, indent=1)
    return 0
