"""What ``mpo bench`` measures with: FLOPs counted from the model's dimensions, tiles counted by a
forward hook, peak memory above the resting process, CPU time, and the device's peak FLOP rate
(for MFU on a GPU)."""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
import time
from dataclasses import dataclass

import torch
from torch import nn

from mpo.types import EncodedPair

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) of the GPUs a run is likely to meet, matched
# against torch.cuda.get_device_name(); `mpo bench --peak-tflops` overrides.
GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0, "A10": 125.0}


def gpu_peak_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of a GPU named ``device_name`` (``NVIDIA H100 80GB HBM3``), if known."""
    for model, peak in GPU_PEAK_TFLOPS.items():
        if model in device_name:
            return peak
    return None


@dataclass
class Work:
    """What one forward pass feeds the language model and the LM head.

    Attributes:
        tokens: token slots the linear layers compute (padding included).
        attended: (query, key) pairs that really attend.
        scored: positions the LM head projects onto the vocabulary.
    """

    tokens: int
    attended: int
    scored: int


def pair_work(pairs: list[EncodedPair], shared_prefix: bool, padding: int = 0) -> Work:
    """The work of a micro-batch in mpo's layouts: the prompt once per pair with prefix sharing
    (each response sees the prompt and itself), twice in the plain layout; ``padding`` pad slots;
    only response tokens scored."""
    tokens, attended, scored = padding, 0, 0
    for pair in pairs:
        p, c, r = len(pair.prompt_ids), len(pair.chosen_ids), len(pair.rejected_ids)
        scored += c + r
        if shared_prefix:
            tokens += p + c + r
            attended += p * (p + 1) // 2 + (c + r) * p + c * (c + 1) // 2 + r * (r + 1) // 2
        else:
            tokens += 2 * p + c + r
            attended += (p + c) * (p + c + 1) // 2 + (p + r) * (p + r + 1) // 2
    return Work(tokens, attended, scored)


@dataclass
class FlopModel:
    """Forward matmul FLOPs of an InternVL, from its config (a multiply-add is 2 FLOPs)."""

    token: float  # language model linear layers, per token
    pair_of_tokens: float  # attention scores and weighted values, per (query, key) pair
    scored: float  # LM head, per scored position
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
            scored=2 * model.get_output_embeddings().weight.numel(),
            tile=2 * tile,
        )

    def step(self, work: Work, policy_tiles: int, reference_tiles: int, vision_trainable: bool, reference_forward: bool) -> float:
        """One training step. The policy's language model: forward + backward = 3 forwards; its LM
        head 4 (the backward recomputes the logits a chunk at a time, as mpo's and TRL's fused
        heads both do); the reference forward once (none with precomputed log-probs); the policy's
        tiles once (frozen tower) or three times (trained), the reference's once."""
        body = work.tokens * self.token + work.attended * self.pair_of_tokens
        head = work.scored * self.scored
        language = 3 * body + 4 * head + (body + head if reference_forward else 0.0)
        vision = (3 if vision_trainable else 1) * policy_tiles + reference_tiles
        return language + vision * self.tile


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


def cpu_clock() -> float:
    """CPU seconds this process's compute used: the main thread's alone when torch runs on one
    thread (no sampler thread, no waiting for a core shared with other processes), else every
    thread's. Wall time is what users get; CPU time is the steadier comparison on a busy machine."""
    return time.thread_time() if torch.get_num_threads() == 1 else time.process_time()


def path_tiles(name: str, pairs: list[EncodedPair], frozen: bool) -> tuple[int, int]:
    """(policy, reference) tiles a step of path ``name`` encodes: TRL every pair's tiles once per
    row for each model; mpo once per pair for the policy, the reference reusing a frozen tower's
    features, none with precomputed log-probs."""
    tiles = sum(p.num_tiles for p in pairs)
    if name == "trl":
        return 2 * tiles, 2 * tiles
    return tiles, 0 if frozen or name == "precomputed" else tiles
