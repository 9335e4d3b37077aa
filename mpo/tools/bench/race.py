"""``mpo bench``: training speed and memory of mpo's layouts, and of TRL on the same pairs.

    mpo bench [--against trl] [--model builtin:bench] [--vocab-size 151674]
              [--scenarios image_heavy,text_short] [--vision frozen,trainable]
              [--steps 3] [--warmup 1] [--threads 1] [--json FILE]
    mpo bench --ideal-only --model examples/model_configs/InternVL3-8B-hf

For each scenario (synthetic pairs of a given shape) and each vision-tower setting, the same model
takes true training steps (collate, policy forward and backward, reference forward, MPO loss,
gradient clipping, the trainer's fused AdamW) on the same micro-batches along each path:

* ``plain``: a chosen and a rejected row per pair, the vision tower once per pair;
* ``shared_prefix``: one row ``[prompt | chosen | rejected]`` per pair (:mod:`mpo.model.pair_attention`);
* ``packed``: several such pairs per row, up to ``--pack-length`` tokens;
* ``auto``: the recipes' default, ``shared_prefix`` or ``packed`` per micro-batch;
* ``precomputed``: ``auto`` with the reference log-probs looked up (``mpo precompute-ref``), so
  the step runs no reference forward;
* ``trl`` (``--against trl``): TRL's ``DPOTrainer`` in its MPO setting (:mod:`mpo.tools.bench.peer_trl`).

The objective is TRL's MPO loss list here (reward shift 0, the SFT term a token mean), so the
losses of every path can be compared with TRL's. Every path starts each timed step from the same
weights and optimizer state (a snapshot taken after the warm-up steps), so the paths score the
same model, and the log-probs and losses at a step must agree. The paths' steps are interleaved
(the order rotates each step) so that load from other processes hits them alike.

Reported per path: pairs/s (median step time), peak memory above the resting process during a
step (RSS sampled every millisecond on CPU, ``torch.cuda.max_memory_allocated`` on GPU), the
ratio over the baseline (``trl`` when it runs, else ``plain``) in wall time and in CPU time
(:func:`mpo.tools.bench.measure.cpu_clock`, medians), the FLOP-ideal ratio (matmul FLOPs counted from
the model's dimensions: :class:`mpo.tools.bench.measure.FlopModel`), the share of it achieved, the FLOP
rate (MFU on a GPU), and the largest log-prob and loss differences from ``plain``.

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
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mpo.config import Recipe
from mpo.losses import MPOLoss
from mpo.model.forward import PreferenceForward
from mpo.model.precomputed import PrecomputedReference
from mpo.model.reference import FrozenModelReference
from mpo.tools.bench.measure import FlopModel, PeakMemory, TileCounter, Work, cpu_clock, gpu_peak_tflops, pair_work
from mpo.tools.bench.scenarios import INTERNVL3_VOCAB, PATHS, SCENARIOS, Scenario, collators, load_bench_model, make_pairs
from mpo.train.optim import build_optimizer, zero_missing_gradients
from mpo.train.precision import stepped_parameters
from mpo.types import EncodedPair, SequenceLogps

class Snapshot:
    """Copies of every tensor a training step changes (weights, fp32 masters, optimizer state),
    restored in place so each path's step starts from the same point."""

    @torch.no_grad()
    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        tensors = {id(t): t for t in model.parameters()}
        for group in optimizer.param_groups:
            tensors.update((id(t), t) for t in group["params"])
        for state in optimizer.state.values():
            tensors.update((id(t), t) for t in state.values() if isinstance(t, torch.Tensor))
        self.saved = [(t, t.detach().clone()) for t in tensors.values()]

    @torch.no_grad()
    def restore(self) -> None:
        for tensor, saved in self.saved:
            tensor.copy_(saved)


@dataclass
class PathResult:
    name: str
    seconds: list[float] = field(default_factory=list)
    cpu_seconds: list[float] = field(default_factory=list)
    peak_bytes: int = 0
    flops: list[float] = field(default_factory=list)
    gpu_flops: list[float] = field(default_factory=list)  # what it would be on CUDA (differs for TRL)
    losses: list[float] = field(default_factory=list)
    logps: list[torch.Tensor] = field(default_factory=list)
    pairs: int = 0


class MPORace:
    """mpo's paths on one policy (its weights and optimizer state restored before each step), one
    frozen reference and precomputed reference log-probs of every timed micro-batch."""

    def __init__(self, args, policy_model, reference_model, frozen: bool, pad_id: int, device: torch.device):
        self.args, self.device, self.frozen = args, device, frozen
        policy_model.requires_grad_(True)
        if frozen:
            policy_model.model.vision_tower.requires_grad_(False)
            policy_model.model.multi_modal_projector.requires_grad_(False)
        self.policy = PreferenceForward(policy_model).train()
        recipe = Recipe()
        recipe.train.lr = args.lr
        self.optimizer = build_optimizer(self.policy, recipe, master_weights=args.dtype != "float32", device=device)
        self.reference = FrozenModelReference(PreferenceForward(reference_model), reuse_policy_features=frozen)
        self.policy_tiles, self.reference_tiles = TileCounter(policy_model), TileCounter(reference_model)
        self.collate = collators(pad_id, args.pack_length, args.attention)
        self.loss_fn = MPOLoss(sft_reduction="token")  # TRL's SFT term, so the losses compare
        self.precomputed: PrecomputedReference | None = None

    def precompute(self, batches: list[list[EncodedPair]]) -> None:
        """Reference log-probs of every pair, as ``mpo precompute-ref`` stores them."""
        keys, columns = [], []
        with torch.no_grad(), self.autocast():
            for pairs in batches:
                logps = self.reference(self.collate["auto"](pairs).to(self.device), None)
                for j, pair in enumerate(pairs):
                    keys.append(pair.source)
                    columns.append([logps.chosen_logps[j], logps.rejected_logps[j], logps.chosen_token_counts[j], logps.rejected_token_counts[j]])
        tensors = {name: torch.stack([row[i] for row in columns]).cpu() for i, name in enumerate(SequenceLogps.__dataclass_fields__)}
        self.precomputed = PrecomputedReference(Path("bench"), Path("."), keys, tensors)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.args.dtype == "bfloat16")

    def step(self, name: str, pairs: list[EncodedPair]) -> tuple[float, torch.Tensor, Work, bool]:
        """One training step of path ``name``: (loss, summed log-probs, language work, whether a
        reference forward ran)."""
        layout, precomputed = PATHS[name]
        batch = self.collate[layout](pairs).to(self.device)
        reference = self.precomputed if precomputed else self.reference
        with self.autocast():
            policy = self.policy(batch)
            reference_logps = reference(batch, policy.image_features)
            output = self.loss_fn(policy.logps, reference_logps, 0.0)
        output.loss.backward()
        zero_missing_gradients(self.policy)
        torch.nn.utils.clip_grad_norm_(stepped_parameters(self.policy, self.optimizer), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        logps = torch.cat([policy.logps.chosen_logps, policy.logps.rejected_logps]).detach().float().cpu()
        work = pair_work(pairs, layout != "plain", batch.input_ids.numel() - batch.num_tokens)
        return float(output.loss.detach()), logps, work, not precomputed


def timed(device: torch.device, run) -> tuple[float, float, int, object]:
    """(wall seconds, CPU seconds, peak bytes, result) of ``run()``."""
    with PeakMemory(device) as memory:
        started, cpu_started = time.perf_counter(), cpu_clock()
        result = run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds, cpu_seconds = time.perf_counter() - started, cpu_clock() - cpu_started
    return seconds, cpu_seconds, memory.bytes, result


def bench_setting(args, scenario: Scenario, frozen: bool, base, processor, flop_model: FlopModel, device) -> tuple[list[dict], list]:
    tile_size = base.config.vision_config.image_size[0]
    batches = [make_pairs(scenario, processor, tile_size, args.pairs, seed=args.seed * 1000 + step) for step in range(args.warmup + args.steps)]
    pad_id = processor.tokenizer.pad_token_id
    # Copies: mpo's forward swaps the LM head of the models it wraps, TRL patches their forward.
    race = MPORace(args, copy.deepcopy(base), copy.deepcopy(base), frozen, pad_id, device)
    race.precompute(batches)
    trl = None
    if "trl" in args.paths:
        from mpo.tools.bench.peer_trl import TRLRun, scores_every_position, trl_work

        every_position = scores_every_position(device)
        trl = TRLRun(base, processor, frozen, args.lr, args.dtype == "bfloat16", device)
        trl_tiles = (TileCounter(trl.model), TileCounter(trl.trainer.ref_model))
    results = {name: PathResult(name) for name in args.paths}
    names = list(results)
    for step, pairs in enumerate(batches):
        if step == args.warmup:  # from here on every path starts each step where the warm-up left mpo
            snapshot = Snapshot(race.policy, race.optimizer)
            trl_snapshot = Snapshot(trl.model, trl.trainer.optimizer) if trl else None
        for name in names[step % len(names):] + names[: step % len(names)]:  # rotate: no path always first
            if step >= args.warmup:
                snapshot.restore()
                if trl and name == "trl":
                    trl_snapshot.restore()
                    trl.model.load_state_dict(race.policy.model.state_dict())
            if name == "trl":
                trl_tiles[0].count = trl_tiles[1].count = 0
                seconds, cpu_seconds, peak, loss = timed(device, lambda: trl.step(pairs))
                work, gpu_work = trl_work(pairs, every_position), trl_work(pairs, every_position=False)
                tiles, reference_forward, loss, logps = (trl_tiles[0].count, trl_tiles[1].count), True, float(loss), None
            else:
                race.policy_tiles.count = race.reference_tiles.count = 0
                seconds, cpu_seconds, peak, (loss, logps, work, reference_forward) = timed(device, lambda: race.step(name, pairs))
                gpu_work, tiles = work, (race.policy_tiles.count, race.reference_tiles.count)
            if step < args.warmup:
                continue
            result = results[name]
            result.seconds.append(seconds)
            result.cpu_seconds.append(cpu_seconds)
            result.peak_bytes = max(result.peak_bytes, peak)
            result.pairs = len(pairs)
            result.losses.append(loss)
            if logps is not None:
                result.logps.append(logps)
            for target, counted in ((result.flops, work), (result.gpu_flops, gpu_work)):
                target.append(flop_model.step(counted, *tiles, vision_trainable=not frozen, reference_forward=reference_forward))
    return summarize(args, list(results.values()), scenario, frozen, device), batches[args.warmup :]


def summarize(args, results: list[PathResult], scenario: Scenario, frozen: bool, device: torch.device) -> list[dict]:
    baseline = next((r for r in results if r.name == "trl"), next(r for r in results if r.name == "plain"))
    plain = next(r for r in results if r.name == "plain")
    peak = args.peak_tflops * 1e12 if args.peak_tflops else None
    rows = []
    for result in results:
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
            "peak_mb": result.peak_bytes / 2**20,
            "memory_ratio": result.peak_bytes / max(1, baseline.peak_bytes),
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


def format_table(rows: list[dict], scenario: Scenario, batches: list[list[EncodedPair]], load: tuple[float, float]) -> str:
    pairs = [pair for batch in batches for pair in batch]
    prompt = sum(len(p.prompt_ids) for p in pairs) / len(pairs)
    response = sum(len(p.chosen_ids) + len(p.rejected_ids) for p in pairs) / (2 * len(pairs))
    tiles = sum(p.num_tiles for p in pairs) / len(pairs)
    base = rows[0]["baseline"]
    lines = [
        f"{scenario.name} | {rows[0]['vision']} vision tower | {len(batches[0])} pairs/step | prompt {prompt:.0f} tokens "
        f"({tiles:.1f} tiles), responses {response:.0f} tokens | load average {load[0]:.1f} -> {load[1]:.1f}",
        f"{'path':<14} {'pairs/s':>8} {'peak MB':>8} {'vs ' + base:>10} {'(CPU s)':>8} {'ideal':>6} {'of ideal':>8} "
        f"{'ideal GPU':>9} {'GFLOP/s':>8} {'MFU':>6} {'max|dlogp|':>10} {'|dloss|':>8}",
    ]
    for row in rows:
        mfu = f"{100 * row['mfu']:5.1f}%" if row["mfu"] is not None else "     -"
        logp = f"{row['max_logp_diff']:.1e}" if row["max_logp_diff"] is not None else "-"
        lines.append(
            f"{row['path']:<14} {row['pairs_per_s']:>8.3f} {row['peak_mb']:>8.0f} {row['ratio']:>9.2f}x {row['cpu_ratio']:>7.2f}x "
            f"{row['ideal_ratio']:>5.2f}x {100 * row['of_ideal']:>7.0f}% {row['ideal_ratio_gpu']:>8.2f}x {row['achieved_gflops']:>8.1f} "
            f"{mfu:>6} {logp:>10} {row['max_loss_diff']:>8.1e}"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mpo bench", description=__doc__.splitlines()[0])
    parser.add_argument("--against", default="", choices=["", "trl"], help="also race TRL's DPOTrainer (pip install -e .[trl])")
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
        args.paths = ["trl"] + args.paths
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
            rows, batches = bench_setting(args, SCENARIOS[name], vision == "frozen", base, processor, flop_model, device)
            load = (load_before, os.getloadavg()[0])
            print(format_table(rows, SCENARIOS[name], batches, load) + "\n", flush=True)
            results.extend({**row, "load_average": load} for row in rows)
    print(f"done in {time.perf_counter() - started:.0f} s, load average {os.getloadavg()[0]:.1f}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"model": args.model, "vocab_size": vocab, "device": str(device), "dtype": args.dtype,
                       "threads": torch.get_num_threads(), "results": results}, handle, indent=1)
    return 0
