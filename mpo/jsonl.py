"""JSONL read line by line, and every file this project writes written atomically.

Reading is the same in the trainer and in ``mpo-data``.

A file that cannot be opened raises :class:`DataError` at once. A bad *line* (not UTF-8, not JSON,
not an object) is yielded as a :class:`DataError` naming the file and line, so the caller decides:
stop with it, or skip it into its report. Blank lines are ignored but keep their numbers; CRLF
line ends and a UTF-8 byte-order mark on the first line are accepted.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from mpo.errors import DataError

LINE_FIELD = "<line>"
"""The field a whole-line error names."""


def json_object_lines(path: str | os.PathLike, kind: str) -> Iterator[tuple[int, dict | DataError]]:
    """Yields ``(line number, object)`` for each non-blank line, or ``(line number, DataError)``.

    Args:
        path: the JSONL file.
        kind: what the file is, for the open errors (``"annotation file"``, ``"input file"``).
    """
    file = str(path)
    try:
        handle = open(path, "rb")
    except FileNotFoundError:
        raise DataError(f"{kind} not found", file=file) from None
    except IsADirectoryError:
        raise DataError(f"{kind} is a directory, not a JSONL file", file=file) from None
    except OSError as error:
        raise DataError(f"cannot read {kind}: {error.strerror}", file=file) from None
    with handle:
        for number, raw in enumerate(handle, start=1):
            if number == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")
            if raw.strip():
                yield number, _parse(raw, file, number)


def _parse(raw: bytes, file: str, number: int) -> dict | DataError:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        return DataError(
            f"not UTF-8 (byte 0x{raw[error.start]:02x} at column {error.start + 1}); re-encode the file as UTF-8",
            file=file, line=number, field=LINE_FIELD,
        )
    try:
        value = json.loads(text.rstrip("\r\n"))  # so an error at the end names this line's column
    except json.JSONDecodeError as error:
        return DataError(f"malformed JSON ({error.msg} at column {error.colno})", file=file, line=number, field=LINE_FIELD)
    if not isinstance(value, dict):
        return DataError(f"expected a JSON object, got {type(value).__name__}", file=file, line=number, field=LINE_FIELD)
    return value


# ------------------------------------------------------------------------------ atomic writes


def fsync_directory(directory: str | os.PathLike) -> None:
    """Makes a rename (or a new entry) in ``directory`` durable; a no-op where the filesystem
    does not allow opening a directory."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, mode: int = 0o644) -> Iterator[Path]:
    """A temporary file beside ``path`` that becomes ``path`` when the block ends without error.

    The one atomic writer of the project: the block writes the temporary file (by name, so any
    library's ``save(path)`` can be used), then it is fsynced, given ``mode`` and renamed over
    ``path``, and the directory is fsynced. Readers see the old file or the new one, never a
    partial one; on an error (a full disk, an interrupt) the temporary file is removed, so
    nothing is left holding the space. The name comes from ``mkstemp``, so several processes
    writing the same path never share a temporary file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, value: Any) -> None:
    write_text_atomic(path, json.dumps(value, indent=2, ensure_ascii=False) + "\n")


def dumps_line(record: dict) -> str:
    """One JSONL line (non-ASCII text kept as it is)."""
    return json.dumps(record, ensure_ascii=False) + "\n"


def write_jsonl_atomic(path: str | os.PathLike, records: Iterable[dict]) -> int:
    """Writes records as JSONL atomically; returns the number of lines."""
    lines = [dumps_line(record) for record in records]
    write_text_atomic(path, "".join(lines))
    return len(lines)
