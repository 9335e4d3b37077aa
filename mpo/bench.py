"""``mpo bench``: training speed and memory of the forward layouts, on the same pairs.

    mpo bench [--model builtin:bench] [--scenarios image_heavy,balanced,text_short]
              [--vision frozen,trainable] [--steps 2] [--warmup 1] [--threads N] [--json FILE]

For each scenario (synthetic pairs of a given shape) and each vision-tower setting, the same
model is trained on the same micro-batches along four paths, one optimisation switched on at a
time:

* ``plain``: the peers' concatenated forward. Two rows per pair, the tiles repeated for the
  rejected row, so the vision tower runs twice for the policy and twice for the reference.
* ``dedupe_vision``: the same rows, the vision tower once per pair; the reference takes the
  policy's image features when the tower and projector are frozen.
* ``shared_prefix``: plus one row ``[prompt | chosen | rejected]`` per pair (mpo.packing).
* ``packed``: plus several pairs per row, up to ``--pack-length`` tokens.

A step is a true training step: collate, policy forward and backward, reference forward, MPO
loss, AdamW step. The paths' steps are interleaved (the order rotates each step) so that load from
other processes hits them alike; warm-up steps are not timed. Reported per path: pairs/s;
tokens/s (tokens the language model is fed, padding excluded: prefix sharing feeds fewer);
peak memory above the resting process during a step (RSS sampled every millisecond on CPU,
``torch.cuda.max_memory_allocated`` on GPU; weights and optimizer state are resting memory);
the speed-up over ``plain`` in wall time and in CPU time (see :func:`cpu_clock`); the ideal
speed-up, the ratio of matmul FLOPs counted from the model's dimensions (:class:`FlopModel`): the
tokens each path feeds the language model, pad slots included, the (query, key) pairs that really
attend, the scored tokens, and the tiles each vision tower encoded (read by forward hooks); the
FLOP rate achieved; and the largest difference of a summed response log-prob from the plain
path's at the same step.

The default model, ``builtin:bench``, is the random ``bench`` InternVL of :mod:`mpo.tiny_model`
(23 M parameters, 128-px tiles of 64 tokens), large enough that matrix products, not Python,
dominate a CPU step. Every path keeps its own policy and optimizer (one reference is shared), so
memory holds four trainable copies of the model: point ``--model`` at small checkpoints only.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import ctypes.util
import json
import os
import random
import threading
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from mpo.collate import collate_plain
from mpo.config import ModelConfig
from mpo.forward import PreferenceForward
from mpo.losses import MPOLoss, RewardShift
from mpo.packing import collate_packed, collate_shared_prefix
from mpo.reference import FrozenModelReference
from mpo.types import EncodedPair


@dataclass(frozen=True)
class Scenario:
    """The shape of a scenario's synthetic pairs (lengths drawn uniformly in the ranges).

    Attributes:
        pairs_per_step: pairs in the micro-batch of one training step.
        images: images per prompt (0: text-only).
        tiles: tiles per image, thumbnail included.
        question: text tokens of the question.
        response: each response's length as a fraction of its prompt's length.
    """

    name: str
    pairs_per_step: int
    images: int
    tiles: tuple[int, int]
    question: tuple[int, int]
    response: tuple[float, float]


SCENARIOS = {
    # InternVL's usual case: 4-6 tiles plus a thumbnail, responses at most a quarter of the prompt
    "image_heavy": Scenario("image_heavy", 2, 1, (5, 7), (40, 80), (0.125, 0.25)),
    # one tile, responses about as long as the prompt
    "balanced": Scenario("balanced", 2, 1, (1, 1), (60, 100), (0.75, 1.25)),
    # short text-only pairs, many per micro-batch
    "text_short": Scenario("text_short", 8, 0, (0, 0), (16, 48), (0.5, 1.5)),
}
PATHS = {  # name -> (layout, one vision pass per pair)
    "plain": ("plain", False),
    "dedupe_vision": ("plain", True),
    "shared_prefix": ("shared_prefix", True),
    "packed": ("packed", True),
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
        responses = [[rng.choice(words) for _ in range(max(2, round(len(prompt) * rng.uniform(*scenario.response))) - 1)] + end for _ in range(2)]
        pairs.append(EncodedPair(prompt, responses[0], responses[1], torch.cat(tiles) if tiles else None, f"{scenario.name}:{index}"))
    return pairs


@dataclass
class FlopModel:
    """Forward matmul FLOPs of an InternVL, from its config (a multiply-add is 2 FLOPs)."""

    token: float  # language model linear layers, per token
    pair_of_tokens: float  # attention scores and weighted values, per (query, key) pair
    scored: float  # LM head, per scored token
    tile: float  # vision tower + pixel shuffle projector, per tile

    @classmethod
    def from_model(cls, model: nn.Module) -> "FlopModel":
        """Reads the sizes off the modules (weights of every matrix product, widths of the
        attention heads), so any InternVL language model is counted right, grouped-query
        attention and explicit head dims included."""
        inner = model.model

        def weights(module: nn.Module, kind: type = nn.Linear) -> int:
            return sum(m.weight.numel() for m in module.modules() if isinstance(m, kind))

        def query_width(module: nn.Module) -> int:  # heads * head_dim, summed over the layers
            return sum(m.out_features for name, m in module.named_modules() if name.endswith("q_proj"))

        embeddings = inner.vision_tower.embeddings.patch_embeddings
        patches = embeddings.num_patches
        vision_tokens = patches + 1  # + the class token
        merged = round(1 / model.config.downsample_ratio) ** 2  # pixel shuffle merges this many patches
        tile = (
            patches * weights(embeddings, nn.Conv2d)
            + vision_tokens * weights(inner.vision_tower)
            + 2 * vision_tokens * vision_tokens * query_width(inner.vision_tower)
            + patches // merged * weights(inner.multi_modal_projector)
        )
        return cls(
            token=2 * weights(inner.language_model),
            pair_of_tokens=4 * query_width(inner.language_model),
            scored=2 * model.lm_head.weight.numel(),
            tile=2 * tile,
        )

    def language_forward(self, pairs: list[EncodedPair], shared_prefix: bool, padding: int = 0) -> float:
        """The tokens fed (``padding`` pad slots included: the linear layers compute them too),
        the (query, key) pairs that really attend, and the LM head on the scored tokens."""
        tokens, attended, scored = padding, 0, 0
        for pair in pairs:
            p, c, r = len(pair.prompt_ids), len(pair.chosen_ids), len(pair.rejected_ids)
            scored += c + r
            if shared_prefix:  # the prompt once; each response sees the prompt and itself
                tokens += p + c + r
                attended += p * (p + 1) // 2 + (c + r) * p + c * (c + 1) // 2 + r * (r + 1) // 2
            else:
                tokens += 2 * p + c + r
                attended += (p + c) * (p + c + 1) // 2 + (p + r) * (p + r + 1) // 2
        return tokens * self.token + attended * self.pair_of_tokens + scored * self.scored

    def step(self, pairs: list[EncodedPair], shared_prefix: bool, padding: int, policy_tiles: int, reference_tiles: int, vision_trainable: bool) -> float:
        """One training step: policy forward + backward (twice the forward), reference forward."""
        language = self.language_forward(pairs, shared_prefix, padding)
        vision = (3 if vision_trainable else 1) * policy_tiles + reference_tiles
        return 3 * language + language + vision * self.tile


class TileCounter:
    """Counts the tiles a vision tower encodes, with a forward hook (the model is not modified)."""

    def __init__(self, model):
        self.count = 0
        model.model.vision_tower.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs, output) -> None:
        self.count += kwargs["pixel_values"].shape[0]


class PeakMemory:
    """Peak memory above the resting process during a block: CUDA's allocator statistics on GPU,
    RSS sampled every millisecond by a thread on CPU (freed heap returned to the OS first, so the
    resting RSS is not inflated by pages the allocator kept)."""

    def __init__(self, device: torch.device):
        self.device = device
        libc = ctypes.util.find_library("c")
        self._trim = ctypes.CDLL(libc).malloc_trim if libc and "libc.so" in libc else None

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._rest = torch.cuda.memory_allocated()
            return self
        import psutil

        if self._trim is not None:
            self._trim(0)
        self._process = psutil.Process()
        self._rest = self._peak = self._process.memory_info().rss
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._done.wait(0.001):
            self._peak = max(self._peak, self._process.memory_info().rss)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.bytes = torch.cuda.max_memory_allocated() - self._rest
        else:
            self._done.set()
            self._thread.join()
            self.bytes = max(self._peak, self._process.memory_info().rss) - self._rest


@dataclass
class PathRun:
    """One path's policy, optimizer and results; the reference model is shared by all paths."""

    name: str
    collate: object
    policy: PreferenceForward
    reference: FrozenModelReference
    optimizer: torch.optim.Optimizer
    policy_tiles: TileCounter
    reference_tiles: TileCounter
    shift: RewardShift = field(default_factory=RewardShift)
    seconds: list[float] = field(default_factory=list)
    cpu_seconds: list[float] = field(default_factory=list)
    tokens: int = 0
    pairs: int = 0
    peak_bytes: int = 0
    flops: float = 0.0
    logps: list[torch.Tensor] = field(default_factory=list)


def build_paths(base, reference_model, names: list[str], frozen: bool, pad_id: int, pack_length: int, attention: str, lr: float) -> list[PathRun]:
    runs = []
    reference_tiles = TileCounter(reference_model)
    for name in names:
        layout, dedupe = PATHS[name]
        policy_model = copy.deepcopy(base)
        if frozen:
            policy_model.model.vision_tower.requires_grad_(False)
            policy_model.model.multi_modal_projector.requires_grad_(False)
        policy_model.train()
        collate = {
            "plain": lambda pairs, dedupe=dedupe: collate_plain(pairs, pad_id, dedupe_vision=dedupe),
            "shared_prefix": lambda pairs: collate_shared_prefix(pairs, pad_id, attention),
            "packed": lambda pairs: collate_packed(pairs, pad_id, pack_length, attention),
        }[layout]
        trainable = [p for p in policy_model.parameters() if p.requires_grad]
        run = PathRun(
            name=name,
            collate=collate,
            policy=PreferenceForward(policy_model),
            reference=FrozenModelReference(PreferenceForward(reference_model), reuse_policy_features=dedupe and frozen),
            optimizer=torch.optim.AdamW(trainable, lr=lr, weight_decay=0.05),
            policy_tiles=TileCounter(policy_model),
            reference_tiles=reference_tiles,
        )
        runs.append(run)
    return runs


def train_step(run: PathRun, pairs: list[EncodedPair], device: torch.device, loss_fn: MPOLoss) -> tuple[int, int]:
    """Collate, policy forward + backward, reference forward, AdamW step (the trainer's order);
    returns the real tokens the language model was fed and the pad slots beside them."""
    batch = run.collate(pairs).to(device)
    policy = run.policy(batch)
    reference = run.reference(batch, policy.image_features)
    output = loss_fn(policy.logps, reference, run.shift.value)
    output.loss.backward()
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.shift.accumulate(output.chosen_rewards, output.rejected_rewards)
    run.shift.step()
    run.logps.append(torch.cat([policy.logps.chosen_logps, policy.logps.rejected_logps]).detach().float().cpu())
    return batch.num_tokens, batch.input_ids.numel() - batch.num_tokens


def cpu_clock() -> float:
    """CPU seconds this process's compute used: the main thread's alone when torch runs on one
    thread (no sampler thread, no waiting for a core shared with other processes), else every
    thread's. Wall time is what users get; CPU time is the steadier comparison on a busy machine."""
    return time.thread_time() if torch.get_num_threads() == 1 else time.process_time()


def bench_scenario(args, scenario: Scenario, frozen: bool, base, reference_model, processor, flop_model: FlopModel, device) -> list[dict]:
    tile_size = base.config.vision_config.image_size[0]
    total_steps = args.warmup + args.steps
    batches = [
        make_pairs(scenario, processor, tile_size, scenario.pairs_per_step, seed=args.seed * 1000 + step)
        for step in range(total_steps)
    ]
    runs = build_paths(base, reference_model, args.paths, frozen, processor.tokenizer.pad_token_id, args.pack_length, args.attention, args.lr)
    loss_fn = MPOLoss()
    for step, pairs in enumerate(batches):
        order = runs[step % len(runs):] + runs[: step % len(runs)]  # rotate: no path always first
        for run in order:
            run.policy_tiles.count = run.reference_tiles.count = 0
            with PeakMemory(device) as memory:
                started, cpu_started = time.perf_counter(), cpu_clock()
                tokens, padding = train_step(run, pairs, device, loss_fn)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                seconds, cpu_seconds = time.perf_counter() - started, cpu_clock() - cpu_started
            if step < args.warmup:
                continue
            run.seconds.append(seconds)
            run.cpu_seconds.append(cpu_seconds)
            run.tokens += tokens
            run.pairs += len(pairs)
            run.peak_bytes = max(run.peak_bytes, memory.bytes)
            shared = PATHS[run.name][0] != "plain"
            run.flops += flop_model.step(pairs, shared, padding, run.policy_tiles.count, run.reference_tiles.count, not frozen)
    return summarize(runs, scenario, frozen), batches[args.warmup :]


def summarize(runs: list[PathRun], scenario: Scenario, frozen: bool) -> list[dict]:
    plain = next((r for r in runs if r.name == "plain"), runs[0])
    rows = []
    for run in runs:
        seconds = sum(run.seconds)
        difference = max(float((a - b).abs().max()) for a, b in zip(run.logps, plain.logps))
        rows.append({
            "scenario": scenario.name,
            "vision": "frozen" if frozen else "trainable",
            "path": run.name,
            "pairs_per_s": run.pairs / seconds,
            "tokens_per_s": run.tokens / seconds,
            "peak_mb": run.peak_bytes / 2**20,
            "speedup": sum(plain.seconds) / seconds,
            "cpu_speedup": sum(plain.cpu_seconds) / sum(run.cpu_seconds),
            "ideal_speedup": plain.flops / run.flops,
            "gflop_per_step": run.flops / len(run.seconds) / 1e9,
            "achieved_gflops": run.flops / seconds / 1e9,
            "max_logp_diff": difference,
            "step_seconds": run.seconds,
        })
    return rows


def format_table(rows: list[dict], scenario: Scenario, batches: list[list[EncodedPair]]) -> str:
    pairs = [pair for batch in batches for pair in batch]
    prompt = sum(len(p.prompt_ids) for p in pairs) / len(pairs)
    response = sum(len(p.chosen_ids) + len(p.rejected_ids) for p in pairs) / (2 * len(pairs))
    tiles = sum(p.num_tiles for p in pairs) / len(pairs)
    lines = [
        f"{scenario.name} | {rows[0]['vision']} vision tower | {scenario.pairs_per_step} pairs/step | "
        f"prompt {prompt:.0f} tokens ({tiles:.1f} tiles), responses {response:.0f} tokens",
        f"{'path':<14} {'pairs/s':>8} {'tokens/s':>9} {'peak MB':>8} {'speed-up':>9} {'(CPU s)':>8} {'ideal':>6} {'GFLOP/s':>8} {'max |dlogp|':>12}",
    ]
    for row in rows:
        lines.append(
            f"{row['path']:<14} {row['pairs_per_s']:>8.3f} {row['tokens_per_s']:>9.0f} {row['peak_mb']:>8.0f} "
            f"{row['speedup']:>8.2f}x {row['cpu_speedup']:>7.2f}x {row['ideal_speedup']:>5.2f}x {row['achieved_gflops']:>8.1f} {row['max_logp_diff']:>12.2e}"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mpo bench", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:bench", help="an InternVL -hf directory, or builtin:<size>")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"comma-separated, from {', '.join(SCENARIOS)}")
    parser.add_argument("--vision", default="frozen,trainable", help="frozen and/or trainable vision tower + projector")
    parser.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated, from {', '.join(PATHS)}")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per path")
    parser.add_argument("--warmup", type=int, default=-1, help="untimed steps first (default 1 on CPU, 3 on GPU)")
    parser.add_argument("--pack-length", type=int, default=4096, help="row length of the packed path")
    parser.add_argument("--attention", default="auto", choices=["auto", "sdpa", "flex"], help="forward.attention")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="auto: float32 on CPU, bfloat16 on GPU")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--json", default="", help="also write every figure to this file")
    args = parser.parse_args(argv)
    args.scenarios = args.scenarios.split(",")
    args.vision = args.vision.split(",")
    args.paths = args.paths.split(",")
    for value, allowed, flag in ((args.scenarios, SCENARIOS, "--scenarios"), (args.vision, ("frozen", "trainable"), "--vision"), (args.paths, PATHS, "--paths")):
        unknown = [v for v in value if v not in allowed]
        if unknown:
            parser.error(f"{flag}: unknown {unknown}; choose from {', '.join(allowed)}")
    if "plain" not in args.paths:
        args.paths = ["plain"] + args.paths  # the baseline every figure is relative to
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from mpo.modeling import load_model, load_processor

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device))
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    if args.warmup < 0:
        args.warmup = 3 if device.type == "cuda" else 1
    config = ModelConfig(name_or_path=args.model, dtype=dtype, attn_implementation="sdpa")
    processor = load_processor(config)
    torch.manual_seed(args.seed)
    base = load_model(config).to(device)
    reference_model = copy.deepcopy(base).requires_grad_(False).eval()
    flop_model = FlopModel.from_model(base)
    params = sum(p.numel() for p in base.parameters())
    where = f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}" if device.type == "cpu" else torch.cuda.get_device_name(device)
    print(
        f"mpo bench: {args.model} ({params / 1e6:.1f} M parameters, {dtype}) on {device} ({where}); "
        f"{args.warmup} warm-up + {args.steps} timed steps per path; packed rows of {args.pack_length} tokens\n"
    )
    started = time.perf_counter()
    results = []
    for name in args.scenarios:
        scenario = SCENARIOS[name]
        for vision in args.vision:
            rows, batches = bench_scenario(args, scenario, vision == "frozen", base, reference_model, processor, flop_model, device)
            print(format_table(rows, scenario, batches) + "\n", flush=True)
            results.extend(rows)
    ending = f", load average {os.getloadavg()[0]:.1f}" if device.type == "cpu" else ""
    print(f"done in {time.perf_counter() - started:.0f} s{ending}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"model": args.model, "device": str(device), "dtype": dtype, "results": results}, handle, indent=1)
    return 0
