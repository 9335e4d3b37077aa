"""The contenders of ``mpo bench``: mpo's paths on one policy, and TRL's ``DPOTrainer``.

Each contender takes its own micro-batches from the same records (:mod:`mpo.tools.bench.data`),
starts every timed step from the same weights (:class:`Snapshot`), and reports what it computed
(:class:`Outcome`), so the race can compare losses and count FLOPs.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from mpo.config import Recipe
from mpo.losses import MPOLoss
from mpo.model.forward import PreferenceForward
from mpo.model.precomputed import PrecomputedReference
from mpo.model.reference import FrozenModelReference
from mpo.tools.bench.data import BenchData, step_batches
from mpo.tools.bench.measure import TileCounter, Work, pair_work
from mpo.tools.bench.scenarios import PATHS, collators
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
class Outcome:
    """What one step of a contender computed.

    Attributes:
        loss: the step's loss.
        logps: ``[chosen..., rejected...]`` summed log-probs of the policy (mpo's paths), or None.
        work: the language work of one forward as it ran here; gpu_work: as it would on a GPU.
        reference_forward: whether a reference forward ran.
        data_seconds: wall seconds the step waited for its micro-batch (decoding, tiling,
            tokenizing, TRL's collating; near 0 when workers prefetched it).
    """

    loss: float
    logps: torch.Tensor | None
    work: Work
    gpu_work: Work
    reference_forward: bool
    data_seconds: float


@dataclass
class Contender:
    """One side of the race.

    Attributes:
        name: the path's name (``trl``, ``trl_precomputed`` or one of :data:`PATHS`).
        settings: one line saying how it runs.
        run: one step on the next micro-batch.
        counters: the tiles its policy's and its reference's vision towers encode (no reference
            counter when it runs no reference model).
        snapshot: ``() -> Snapshot`` of its trained state (taken once, after the warm-up).
        sync: after its snapshot is restored, copies the policy weights mpo's paths start from.
        check: after the clock stops, checks what the step ran on.
    """

    name: str
    settings: str
    run: Callable[[], Outcome]
    counters: tuple[TileCounter, TileCounter | None]
    snapshot: Callable[[], Snapshot]
    sync: Callable[[], None] = lambda: None
    check: Callable[[], None] = lambda: None

    def tiles(self) -> tuple[int, int]:
        """``(policy tiles, reference tiles)`` encoded since the last :meth:`reset_tiles`."""
        policy, reference = self.counters
        return policy.count, reference.count if reference is not None else 0

    def reset_tiles(self) -> None:
        for counter in self.counters:
            if counter is not None:
                counter.count = 0


def waited(batches: Iterator):
    """``(next batch, wall seconds spent getting it)``."""
    started = time.perf_counter()
    batch = next(batches)
    return batch, time.perf_counter() - started


class MPORace:
    """mpo's paths on one policy (its weights and optimizer state restored before each step), one
    frozen reference and precomputed reference log-probs of every micro-batch."""

    def __init__(self, args, policy_model, reference_model, frozen: bool, pad_id: int, device: torch.device):
        self.args, self.device, self.frozen = args, device, frozen
        policy_model.requires_grad_(True)
        if frozen:
            policy_model.model.vision_tower.requires_grad_(False)
            policy_model.model.multi_modal_projector.requires_grad_(False)
        self.policy = PreferenceForward(policy_model, sparse_embedding_gradient=True).train()  # one process, as the trainer
        recipe = Recipe()
        recipe.train.lr = args.lr
        self.optimizer = build_optimizer(self.policy, recipe, master_weights=args.dtype != "float32", device=device)
        self.reference = FrozenModelReference(PreferenceForward(reference_model), reuse_policy_features=frozen)
        self.counters = (TileCounter(policy_model), TileCounter(reference_model))
        self.collate = collators(pad_id, args.pack_length, args.attention)
        self.loss_fn = MPOLoss(sft_reduction="token")  # TRL's SFT term, so the losses compare
        self.precomputed: PrecomputedReference | None = None
        self._snapshot: Snapshot | None = None

    def snapshot(self) -> Snapshot:
        """The one snapshot every path restores (taken at the first call)."""
        if self._snapshot is None:
            self._snapshot = Snapshot(self.policy, self.optimizer)
        return self._snapshot

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

    def step(self, name: str, pairs: list[EncodedPair]) -> tuple[float, torch.Tensor, Work]:
        """One training step of path ``name``: (loss, summed log-probs, language work)."""
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
        return float(output.loss.detach()), logps, work

    def contender(self, name: str, data: BenchData, steps: int) -> Contender:
        """Path ``name``, its micro-batches from mpo's dataset (decoded and tiled in the step, or
        by ``--data-workers`` workers)."""
        batches = step_batches(steps, data.mpo_pairs, self.args.data_workers)
        layout, precomputed = PATHS[name]

        def run() -> Outcome:
            pairs, seconds = waited(batches)
            loss, logps, work = self.step(name, pairs)
            return Outcome(loss, logps, work, work, not precomputed, seconds)

        reference = "precomputed reference log-probs (looked up)" if precomputed else (
            "reference: frozen copy run live" + (", reusing the policy's image features" if self.frozen else ""))
        settings = (f"mpo forward.layout {layout}, forward.attention {self.args.attention}, one vision pass per pair, {reference}, "
                    f"fp32 LM head on response positions, sparse tied-embedding gradient (one process), fused AdamW, "
                    f"data.num_workers={self.args.data_workers}")
        return Contender(name, settings, run, self.counters, self.snapshot)


def trl_contender(name: str, args, base, processor, data: BenchData, frozen: bool, device: torch.device, steps: int,
                  policy: PreferenceForward) -> Contender:
    """TRL's ``DPOTrainer`` (``trl``, its reference live; ``trl_precomputed``, its reference
    log-probs precomputed, text pairs only), its micro-batches from its own dataset and collator."""
    from mpo.tools.bench.peer_trl import TRLRun, scores_every_position, trl_settings, trl_work

    precompute = name == "trl_precomputed"
    trl = TRLRun(base, processor, frozen, args.lr, args.dtype == "bfloat16", device, args.trl_head, precompute)
    collator = data.trl_collator()
    reference = None
    if precompute:  # TRL's precompute pass, with the policy still equal to the reference
        plain = data.trl_maker(data.trl_dataset(), collator)
        reference = [trl.reference_logps({k: v.to(device) for k, v in plain(step).items()}) for step in range(steps)]
    dataset = data.trl_dataset(reference)
    batches = step_batches(steps, data.trl_maker(dataset, collator), args.data_workers)
    every_position = scores_every_position(device, args.trl_head)
    step_numbers = itertools.count()
    last: list[dict[str, torch.Tensor]] = []

    def run() -> Outcome:
        inputs, seconds = waited(batches)
        loss = float(trl.step(inputs))
        last[:] = [inputs]
        return Outcome(loss, None, trl_work(inputs, every_position), trl_work(inputs, False), not precompute, seconds)

    def check() -> None:  # mpo's token ids and tiles
        data.check_trl_batch(next(step_numbers), last[0])

    counters = (TileCounter(trl.model), None if precompute else TileCounter(trl.trainer.ref_model))
    settings = trl_settings(args.trl_head, precompute, args.data_workers, device)
    return Contender(name, settings, run, counters, lambda: Snapshot(trl.model, trl.trainer.optimizer),
                     sync=lambda: trl.model.load_state_dict(policy.model.state_dict()), check=check)
