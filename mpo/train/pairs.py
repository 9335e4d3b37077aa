"""Micro-batches of dataset items turned into usable pairs, the bad ones reported once."""

from __future__ import annotations

from tqdm import tqdm

from mpo.data.dataset import PreferenceDataset
from mpo.errors import DataError, OverlongPair
from mpo.train.skip_log import SkipLog
from mpo.types import EncodedPair


class PairFetcher:
    """Turns a micro-batch of dataset items into usable pairs.

    A bad pair (``DataError``) stops the run unless ``skip``; an over-long pair to drop
    (``OverlongPair``) is always skipped. A skipped pair is reported once (``skipped.jsonl`` and the
    console, across processes and resumes) and replaced by the next good pair, so every process
    keeps the same micro-batch size and no collective operation waits on a process with less work.
    """

    def __init__(self, dataset: PreferenceDataset, skip: bool, skip_log: SkipLog):
        self.dataset, self.skip, self.skip_log = dataset, skip, skip_log
        self.truncated_count = 0

    def resolve(self, items: list[EncodedPair | DataError], indices: list[int]) -> list[EncodedPair]:
        """``items`` with every unusable one replaced by the next usable pair of the dataset."""
        return [self._usable(item, index) for item, index in zip(items, indices)]

    def usable(self, items: list[EncodedPair | DataError]) -> list[EncodedPair]:
        """The usable pairs of ``items``, the others reported (or raised) and left out."""
        return [item for item in items if self._accept(item)]

    def _accept(self, item: EncodedPair | DataError) -> bool:
        if isinstance(item, EncodedPair):
            self.truncated_count += item.truncated
            return True
        if not (self.skip or isinstance(item, OverlongPair)):
            raise item
        self._report(item)
        return False

    def _usable(self, item: EncodedPair | DataError, index: int) -> EncodedPair:
        for offset in range(1, len(self.dataset) + 1):
            if self._accept(item):
                return item
            item = self.dataset[(index + offset) % len(self.dataset)]
        raise DataError("every pair of the dataset is unusable")

    def _report(self, error: DataError) -> None:
        for new in self.skip_log.add([error]):
            tqdm.write(f"skipped {new}")
