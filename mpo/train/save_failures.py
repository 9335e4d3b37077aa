"""A save that fails (a full disk, a quota, a file-size limit, an I/O error) ends the run in one
line that names the path and the space left, and leaves no partial ``.tmp`` holding that space.

The writers do not say so themselves: ``torch.save`` reports a full disk as ``RuntimeError:
[enforce fail at inline_container.cc] . unexpected pos 16000 vs 15892`` and safetensors as
``SafetensorError: ... IoError(Os { code: 28 ...})``, so the cause is looked for along the whole
chain of exceptions: an ``OSError``'s own text, else a system error text (or torch's short-write
message) inside a message. A failure that is none of these keeps its traceback.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from mpo.errors import RunFailed

IO_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS)
SHORT_WRITE = "unexpected pos"  # torch's zip writer, when the disk took fewer bytes than it was given
SHORT_WRITE_REASON = "the disk took fewer bytes than were written"
FULL_BELOW = 1 << 20
"""Free bytes under which a short write is a full disk."""


def io_reason(error: BaseException) -> str | None:
    """The I/O cause of ``error`` in words (``No space left on device``), or ``None``."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno is not None:
            return current.strerror or os.strerror(current.errno)
        text = str(current)
        for code in IO_ERRNOS:
            if os.strerror(code) in text:
                return os.strerror(code)
        if SHORT_WRITE in text:
            return SHORT_WRITE_REASON
        current = current.__cause__ or current.__context__
    return None


def human_bytes(count: int) -> str:
    """``1536`` -> ``1.5 KiB``."""
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def space_left(path: Path) -> tuple[int, str]:
    """Free bytes on the filesystem holding ``path`` (or its nearest existing parent), and
    ``<free> free of <total>`` in words."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    usage = shutil.disk_usage(existing)
    return usage.free, f"{human_bytes(usage.free)} free of {human_bytes(usage.total)}"


@contextlib.contextmanager
def written(tmp: Path, what: str) -> Iterator[None]:
    """The block writes ``tmp`` (a checkpoint or model directory under its ``.tmp`` name).

    On any failure the partial directory is removed; an I/O failure becomes a :class:`RunFailed`
    naming ``tmp``, the cause and the space left when it failed, e.g. ``cannot write checkpoint
    out/checkpoints/step-00000004.tmp: No space left on device (0 B free of 3.0 MiB); ...``.

    Args:
        tmp: the directory being written.
        what: what it is, for the message (``checkpoint``, ``final model``).
    """
    try:
        yield
    except BaseException as error:
        reason = io_reason(error) if isinstance(error, Exception) else None
        free, space = space_left(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        if reason is None:
            raise
        if reason == SHORT_WRITE_REASON and free < FULL_BELOW:
            reason = os.strerror(errno.ENOSPC)
        raise RunFailed(f"cannot write {what} {tmp}: {reason} ({space}); removed it, the checkpoints before it are "
                        "intact: free space, then resume with resume_from=latest") from error
