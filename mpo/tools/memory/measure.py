"""``mpo memory --measure``: the peak of one training micro-batch at the model's real size.

The model is built from its config with random weights (nothing downloaded), in the recipe's
dtype, freezing, LoRA and checkpointing (:func:`mpo.modeling.prepare_policy`), with its frozen
reference (or adapters-off LoRA reference). One micro-batch of the estimate's shape (random token
ids, the prompt's image tokens, random pixels) goes through what the trainer does for it: the
policy's forward, the reference's forward, the MPO loss and the backward. No optimizer step: the
optimizer state is plain arithmetic, the activations are what needs checking.

Peaks are read from ``torch.cuda.max_memory_allocated`` on a GPU; on the CPU from the process's
resident-set high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``), with every
tensor of 64 KiB or more in its own mapping and the free heap returned (``malloc_trim``) before
each reset, so allocator caching inflates the CPU figure a little rather than hiding anything.
"""

from __future__ import annotations

import copy
import ctypes
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from mpo.tools.memory.activations import MicroBatchShape, tile_side
from mpo.config import Recipe


class _PeakMemory:
    """Current and peak bytes of this process on ``device``."""

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cpu":
            # A fixed mmap threshold (glibc's M_MMAP_THRESHOLD, -3) gives every tensor of 64 KiB
            # and more its own mapping, returned when freed: the resident set then follows the
            # live tensors instead of a heap that grows to the sizes it adapted to (up to 32 MiB).
            ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 16)

    def _status(self, field: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"/proc/self/status has no {field}")

    def reset(self) -> int:
        """Starts a new peak; returns the bytes in use now."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return torch.cuda.memory_allocated()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS
        return self._status("VmRSS")

    def peak(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        return self._status("VmHWM")


@dataclass
class Measurement:
    models: int
    """Bytes the policy and its reference hold (above the process before building them)."""
    step: int
    """Peak bytes of one micro-batch's forward, reference forward and backward, above ``models``."""
    seconds: float


def peak_tensor_bytes(build, device: torch.device = torch.device("cpu")) -> int:
    """Peak bytes of tensors live at once while ``build()`` runs on ``device``, beyond those live
    before (what a GPU allocator must hold, without its caching): the CUDA allocator's peak on a
    GPU; on a CPU, torch's profiler, which records every allocation and free of the CPU allocator
    (the running sum's maximum; tensors freed during ``build`` that were allocated before it count
    as freed)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        build()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        build()
    live = peak = 0
    for event in sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def _synthetic_pair(config, shape: MicroBatchShape, seed: int):
    from mpo.types import EncodedPair

    generator = torch.Generator().manual_seed(seed)
    image_tokens = shape.tiles * config.image_seq_length
    text = config.text_config.vocab_size

    def ids(count: int) -> list[int]:
        drawn = torch.randint(0, min(text, config.image_token_id), (count,), generator=generator)
        return drawn.tolist()

    side = tile_side(config.vision_config)
    prompt = ids(shape.prompt_tokens - image_tokens)
    return EncodedPair(
        prompt_ids=prompt[:1] + [config.image_token_id] * image_tokens + prompt[1:],
        chosen_ids=ids(shape.chosen_tokens),
        rejected_ids=ids(shape.rejected_tokens),
        pixel_values=torch.randn(shape.tiles, 3, side, side, generator=generator),
    )


def measure(recipe: Recipe, config, shape: MicroBatchShape, device: torch.device) -> Measurement:
    """Builds the recipe's policy and reference at ``config``'s size and runs one micro-batch."""
    from transformers import AutoModelForImageTextToText

    from mpo.data.layouts import build_collator
    from mpo.model.forward import PreferenceForward
    from mpo.losses import MPOLoss
    from mpo.model.loading import DTYPES, prepare_policy, vision_is_frozen
    from mpo.model.reference import DisabledAdapterReference, FrozenModelReference

    memory = _PeakMemory(device)
    start = memory.reset()
    torch.manual_seed(recipe.seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=DTYPES[recipe.model.dtype]).to(device)
    frozen = None if recipe.model.lora.enabled else copy.deepcopy(model).requires_grad_(False).eval()
    policy = PreferenceForward(prepare_policy(model, recipe.model)).train()
    reuse = recipe.forward.dedupe_vision and vision_is_frozen(policy.model)
    reference = DisabledAdapterReference(policy, reuse) if frozen is None else FrozenModelReference(PreferenceForward(frozen), reuse)
    loss = recipe.loss
    loss_fn = MPOLoss(loss.beta, loss.dpo_weight, loss.bco_weight, loss.sft_weight, loss.sft_reduction)
    models = memory.reset() - start
    collate = build_collator(recipe.forward, recipe.data, pad_id=0)
    autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(recipe.train.mixed_precision)

    def micro_batch(pairs) -> None:
        batch = collate(pairs).to(device)
        with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
            output = policy(batch)
            reference_logps = reference(batch, output.image_features) if loss_fn.needs_reference else None
            objective = loss_fn(output.logps, reference_logps, 0.0).loss
        objective.backward()

    # A small micro-batch first: the kernels' one-time set-up (thread pools, oneDNN / cuBLAS
    # workspaces) is not the micro-batch's memory.
    micro_batch([_synthetic_pair(config, MicroBatchShape(1, 1, config.image_seq_length + 8, 8, 8), recipe.seed)])
    policy.zero_grad(set_to_none=True)
    pairs = [_synthetic_pair(config, shape, recipe.seed + index) for index in range(shape.pairs)]
    before = memory.reset()
    started = time.perf_counter()
    micro_batch(pairs)
    seconds = time.perf_counter() - started
    return Measurement(models, memory.peak() - before, seconds)
