"""Reading JSONL input line by line, the same way in the trainer and in ``mpo-data``.

A file that cannot be opened raises :class:`DataError` at once. A bad *line* (not UTF-8, not JSON,
not an object) is yielded as a :class:`DataError` naming the file and line, so the caller decides:
stop with it, or skip it into its report. Blank lines are ignored but keep their numbers; CRLF
line ends and a UTF-8 byte-order mark on the first line are accepted.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

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
