"""Which pairs each process scores: training steps as a pure function of (seed, step), and
held-out or reference passes in lockstep across processes.

Step s of epoch e takes the global batch ``perm_e[i*G : (i+1)*G]`` (G = micro-batch size x
accumulation x processes, i = s mod steps per epoch, ``perm_e`` a permutation seeded by (seed, e)).
Because the global batch does not depend on how it is split, batch 4 x accumulation 1, batch 2 x
accumulation 2 and two processes x batch 2 see the same pairs at every step, and resuming at step
s needs nothing but s. A last partial global batch of an epoch is left out (and reported).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GlobalBatchOrder:
    num_records: int
    micro_batch_size: int
    accumulation_steps: int
    world_size: int
    seed: int
    shuffle: bool = True

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.accumulation_steps * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        return self.num_records // self.global_batch_size

    @property
    def dropped_per_epoch(self) -> int:
        return self.num_records - self.steps_per_epoch * self.global_batch_size

    def global_batch(self, step: int) -> list[int]:
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{self.num_records} pairs cannot fill one global batch of {self.global_batch_size}"
            )
        epoch, position = divmod(step, self.steps_per_epoch)
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            order = torch.randperm(self.num_records, generator=generator).tolist()
        else:
            order = list(range(self.num_records))
        start = position * self.global_batch_size
        return order[start : start + self.global_batch_size]

    def micro_batches(self, step: int, rank: int) -> list[list[int]]:
        """The ``accumulation_steps`` micro-batches of process ``rank`` at ``step``."""
        batch = self.global_batch(step)
        size = self.micro_batch_size
        return [
            batch[(k * self.world_size + rank) * size : (k * self.world_size + rank + 1) * size]
            for k in range(self.accumulation_steps)
        ]


class MicroBatchIndices:
    """A DataLoader batch sampler: process ``rank``'s micro-batches from step ``start`` to ``stop``."""

    def __init__(self, order: GlobalBatchOrder, start: int, stop: int, rank: int):
        self.order, self.start, self.stop, self.rank = order, start, stop, rank

    def __iter__(self):
        for step in range(self.start, self.stop):
            yield from self.order.micro_batches(step, self.rank)

    def __len__(self) -> int:
        return (self.stop - self.start) * self.order.accumulation_steps


def lockstep_micro_batches(indices: Sequence[int], rank: int, world_size: int, micro_batch_size: int) -> list[list[int]]:
    """Process ``rank``'s micro-batches of ``indices`` when each item is to be scored exactly once.

    Item k goes to process ``k % world_size``. Every process gets the same number of
    micro-batches, its last ones possibly empty: under DDP and ZeRO-3 each forward is a collective,
    so a process out of items must still run one (on a pair whose values it discards) for every
    micro-batch the others run. Evaluation and ``mpo precompute-ref`` both go through here.
    """
    mine = list(indices)[rank::world_size]
    count = math.ceil(math.ceil(len(indices) / world_size) / micro_batch_size)
    return [mine[k * micro_batch_size : (k + 1) * micro_batch_size] for k in range(count)]
