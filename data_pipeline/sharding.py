"""Deterministic sharding and seeding, both keyed by question id.

Keying by id (not by position in a worker's queue) means a question's shard and its random seed
do not depend on how many workers run, which ones were restarted, or what was already done.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass


def stable_hash(*parts: object) -> int:
    """A 64-bit hash that is the same in every process (``hash()`` is salted per process)."""
    digest = hashlib.sha256("\x1f".join(str(part) for part in parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big")


def derive_seed(seed: int, *parts: object) -> int:
    """A per-item seed in ``[0, 2**31)``: what torch, numpy and OpenAI-compatible servers all accept."""
    return stable_hash(seed, *parts) % (2**31)


@dataclass(frozen=True)
class ShardSpec:
    """Worker ``index`` of ``count`` (0-based): it owns the ids whose hash is ``index`` mod ``count``."""

    index: int = 0
    count: int = 1

    @classmethod
    def parse(cls, text: str) -> ShardSpec:
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
        if not match:
            raise ValueError(f"--shard must look like i/N (e.g. 0/4), got {text!r}")
        index, count = int(match.group(1)), int(match.group(2))
        if count < 1 or not 0 <= index < count:
            raise ValueError(f"--shard {text}: need N >= 1 and 0 <= i < N")
        return cls(index, count)

    def owns(self, question_id: str) -> bool:
        return self.count == 1 or stable_hash("shard", question_id) % self.count == self.index

    @property
    def tag(self) -> str:
        """File-name part, e.g. ``shard-0-of-4``."""
        return f"shard-{self.index}-of-{self.count}"

    def all(self) -> list[ShardSpec]:
        return [ShardSpec(i, self.count) for i in range(self.count)]
