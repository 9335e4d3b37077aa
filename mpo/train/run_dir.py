"""One run per output directory: a lock held for the run's life, and no new run where another lives.

Two trainers writing one ``output_dir`` mix their checkpoints, their ``metrics.jsonl`` and their
``keep_last`` deletions; a new run started where an old one lives overwrites ``final/`` and is
later resumed from the old run's weights. So, before any file is touched:

* the main process takes ``output_dir/.mpo-run.lock``: an exclusive ``flock`` on that file, held
  until the process ends (the kernel drops it when the process dies, however it dies), and a
  record in it of who holds it (pid, host, start time, command). A second run is refused with
  that record. A record left in a lock nobody holds is a run that died without ending: it is
  named and taken over.
* a fresh run (no ``resume_from``, or a checkpoint of another directory) is refused where another
  run trained (its checkpoints, ``final/``, ``best/`` or logged steps in ``metrics.jsonl``): continue it with
  ``resume_from=latest``, or start over with ``--overwrite``, which renames the old run to
  ``<output_dir>.old-<time>`` (nothing is deleted).

Only the main process (global rank 0) locks and decides; it broadcasts the outcome and every
process raises the same error or goes on, so no process writes before the directory is the run's.

On a shared filesystem the lock is only as good as the filesystem's ``flock``: local disks,
NFSv4 (Linux emulates ``flock`` with NFS byte-range locks since 2.6.12), Lustre mounted with
``-o flock``, GPFS and BeeGFS honour it across machines. Where ``flock`` is not supported at all
(it fails with ``ENOLCK``/``EOPNOTSUPP``), the record alone is checked: a live process of this
machine or any record from another machine refuses the run.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shlex
import socket
import sys
import time
from pathlib import Path

from mpo.config import Recipe
from mpo.errors import DataError
from mpo.train.checkpoint import checkpoint_dirs

LOCK_FILE = ".mpo-run.lock"
NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)


def _this_process() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": shlex.join(sys.argv)}


def _describe(owner: dict) -> str:
    if not owner:
        return "a process that is starting"
    return f"process {owner.get('pid')} on {owner.get('host')}, started {owner.get('started')}: {owner.get('command')}"


def _alive_here(owner: dict) -> bool:
    """Whether the owner is a live process of this machine (without ``flock`` to ask)."""
    if owner.get("host") != socket.gethostname():
        return True  # cannot be checked from here: assume it runs
    try:
        os.kill(int(owner.get("pid", 0)), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError):
        return True
    return True


class RunDirLock:
    """The held lock of one output directory (:func:`RunDirLock.acquire`); :meth:`release` ends it.

    The record is written into the locked file itself, in place: the lock belongs to that file's
    inode, so replacing the file (as the atomic writer does) would leave the lock on a file no
    other process opens. A torn record reads as an unknown owner.
    """

    def __init__(self, path: Path, fd: int, stale_owner: dict | None):
        self.path, self.fd, self.stale_owner = path, fd, stale_owner

    @classmethod
    def acquire(cls, directory: Path) -> RunDirLock:
        """Locks ``directory`` (created if missing) or raises a :class:`DataError` naming the holder."""
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            owner = _read_record(fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise DataError(f"{directory} is in use by another run ({_describe(_read_record(fd) or owner or {})}); "
                                "wait for it to end, or choose another output_dir", field="output_dir") from None
            except OSError as error:
                if error.errno not in NO_FLOCK:
                    raise
                if owner and _alive_here(owner):
                    raise DataError(f"{directory} is in use by another run ({_describe(owner)}; this filesystem has no "
                                    f"locks, so if that run has ended, delete {path})", field="output_dir") from None
            record = json.dumps(_this_process()).encode()
            os.ftruncate(fd, 0)
            os.pwrite(fd, record, 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, owner)

    def release(self, remove: bool = False) -> None:
        """Empties the record (an empty lock file is a finished run) and drops the lock; with
        ``remove``, deletes the lock file (a directory moved aside)."""
        if self.fd < 0:
            return
        if remove:
            self.path.unlink(missing_ok=True)
        else:
            os.ftruncate(self.fd, 0)
        os.close(self.fd)  # closing drops the flock
        self.fd = -1


def _read_record(fd: int) -> dict | None:
    data = os.pread(fd, 65536, 0)
    if not data.strip():
        return None
    try:
        record = json.loads(data)
    except ValueError:
        return {"pid": "?", "host": "?", "started": "?", "command": "an unreadable lock record"}
    return record if isinstance(record, dict) else None


def run_found(directory: Path) -> str:
    """What of a run that trained ``directory`` holds, in words (empty: none; a run that stopped
    before logging its first step left nothing to keep, and its ``recipe.yaml`` is rewritten)."""
    found = []
    checkpoints = checkpoint_dirs(directory)
    if checkpoints:
        found.append(f"last checkpoint {checkpoints[-1].name}")
    elif (directory / "checkpoints").is_dir() and any((directory / "checkpoints").iterdir()):
        found.append("an unfinished checkpoint")
    found += [f"{name}/" for name in ("final", "best") if (directory / name).exists()]
    metrics = directory / "metrics.jsonl"
    if metrics.exists() and metrics.stat().st_size:
        found.append("metrics.jsonl")
    return ", ".join(found)


def resumes_here(recipe: Recipe) -> bool:
    """Whether the recipe continues the run of its own output directory."""
    if recipe.resume_from == "latest":
        return True
    if not recipe.resume_from:
        return False
    checkpoints = (Path(recipe.output_dir) / "checkpoints").resolve()
    return checkpoints in Path(recipe.resume_from).resolve().parents


def _aside(directory: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    candidate = directory.with_name(f"{directory.name}.old-{stamp}")
    number = 1
    while candidate.exists():
        number += 1
        candidate = directory.with_name(f"{directory.name}.old-{stamp}-{number}")
    return candidate


def claim(recipe: Recipe, overwrite: bool) -> tuple[RunDirLock, list[str]]:
    """Locks the recipe's output directory for this run (main process only).

    Returns:
        The held lock and the notes to print (a stale lock taken over, an old run moved aside).

    Raises:
        DataError: another run holds the directory, or lives in it and the recipe does not resume it.
    """
    directory = Path(recipe.output_dir)
    lock = RunDirLock.acquire(directory)
    notes = []
    if lock.stale_owner:
        notes.append(f"{lock.path}: taking over the lock of a run that ended without releasing it "
                     f"({_describe(lock.stale_owner)})")
    found = run_found(directory)
    if not found or resumes_here(recipe):
        return lock, notes
    if not overwrite:
        lock.release()
        raise DataError(f"{directory} holds another run ({found}); continue it with resume_from=latest, or pass "
                        "--overwrite to move it aside (nothing is deleted), or choose another output_dir", field="output_dir")
    aside = _aside(directory)
    try:
        os.rename(directory, aside)  # the lock file moves with it, still held: no run can slip in between
    except OSError as error:
        lock.release()
        raise DataError(f"cannot move {directory} aside to {aside} ({error.strerror}); move it yourself or choose "
                        "another output_dir", field="output_dir") from None
    lock.path = aside / LOCK_FILE
    fresh = RunDirLock.acquire(directory)
    lock.release(remove=True)
    notes.append(f"moved the previous run in {directory} to {aside} (--overwrite)")
    return fresh, notes


def claim_for_all(recipe: Recipe, accelerator, overwrite: bool) -> tuple[RunDirLock | None, list[str]]:
    """:func:`claim` on the main process, its outcome broadcast: every process raises the same
    error or goes on. Returns the lock (``None`` off the main process) and the notes to print."""
    from accelerate.utils import broadcast_object_list

    lock, outcome = None, [None, []]
    if accelerator.is_main_process:
        try:
            lock, notes = claim(recipe, overwrite)
            outcome = [None, notes]
        except DataError as error:
            outcome = [str(error), []]
    if accelerator.num_processes > 1:
        broadcast_object_list(outcome, from_process=0)
    refused, notes = outcome
    if refused:
        raise DataError(refused)
    return lock, notes
