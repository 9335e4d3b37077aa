"""``output_dir/skipped.jsonl``: one line per bad record, across processes and resumes.

With ``data.on_bad_sample: skip`` (and for over-long pairs to drop) every bad record is written
once, whichever process finds it and however often it comes up again (a later epoch, a resumed
run): a record is identified by its ``file:line``. Processes share the file under an exclusive
lock and read each other's new lines before writing, so the count is the number of lines.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from pathlib import Path

from mpo.errors import DataError

FILE_NAME = "skipped.jsonl"


def _key(entry: dict) -> str:
    # A whole-file problem has no line; its message tells one apart from another.
    line = entry["line"] if entry["line"] is not None else entry["error"]
    return f"{entry['file']}:{line}"


class SkipLog:
    """The skip report of one run.

    Args:
        output_dir: the run's directory.
        start_over: empty the file first (a fresh run, on the main process only, before any
            other process opens its log); a resumed run keeps what is there and adds to it.
    """

    def __init__(self, output_dir: str | Path, start_over: bool):
        self.path = Path(output_dir) / FILE_NAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.keys: set[str] = set()
        self._offset = 0
        with _locked(self.path) as handle:
            if start_over:
                handle.truncate(0)
            self._read_new(handle)

    def _read_new(self, handle) -> None:
        """Takes in the lines other processes (or an earlier run) wrote since the last read."""
        handle.seek(self._offset)
        data = handle.read()
        complete = data[: data.rfind(b"\n") + 1]
        if len(complete) < len(data):
            # A run killed mid-line left a torn tail: cut it, or the next line would join it.
            handle.truncate(self._offset + len(complete))
        for text in complete.decode("utf-8").splitlines():
            self.keys.add(_key(json.loads(text)))
        self._offset += len(complete)

    def add(self, errors: list[DataError]) -> list[DataError]:
        """Writes the errors whose records are not in the file yet; returns those."""
        with _locked(self.path) as handle:
            self._read_new(handle)
            new, lines = [], []
            for error in errors:
                entry = error.to_record()
                if _key(entry) not in self.keys:
                    self.keys.add(_key(entry))
                    new.append(error)
                    lines.append(json.dumps(entry, ensure_ascii=False) + "\n")
            if lines:
                handle.seek(0, os.SEEK_END)
                data = "".join(lines).encode("utf-8")
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
                self._offset += len(data)
        return new

    @property
    def count(self) -> int:
        """Bad records in the file (as of this process's last read or write)."""
        return len(self.keys)

    def refresh(self) -> int:
        """Reads what other processes added; returns the count."""
        with _locked(self.path) as handle:
            self._read_new(handle)
        return self.count


@contextlib.contextmanager
def _locked(path: Path):
    """The file opened for reading and appending, under an exclusive ``flock``."""
    with open(path, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield handle
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
