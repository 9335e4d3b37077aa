"""Which pairs each process trains on at each step: a pure function of (seed, step).

Step s of epoch e takes the global batch ``perm_e[i*G : (i+1)*G]`` (G = micro-batch size x
accumulation x processes, i = s mod steps per epoch, ``perm_e`` a permutation seeded by (seed, e)).
Because the global batch does not depend on how it is split, batch 4 x accumulation 1, batch 2 x
accumulation 2 and two processes x batch 2 see the same pairs at every step, and resuming at step
s needs nothing but s. A last partial global batch of an epoch is left out (and reported).
"""

from __future__ import annotations

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
