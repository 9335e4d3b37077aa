"""A process that stops answering ends the run in ``train.collective_timeout`` seconds, with one
line naming it, instead of the others waiting in a collective for the backend's 10 to 30 minutes.

A frozen process (SIGSTOP, a machine swapping, a lost network link) gives no error anywhere: the
others block in their next all-reduce, and NCCL's or gloo's timeout, when it comes, names the
collective, not the process that never arrived. So each process bumps a counter of its own in the
launch's rendezvous store (the TCP key-value store every ``torch.distributed`` launch has, at
``MASTER_ADDR:MASTER_PORT``) every few seconds, from a daemon thread that runs while the main
thread computes, loads or waits in a collective; and watches the counter of the next rank (a ring:
each process is watched by one other, so the store sees a few requests per process per interval,
whatever the world size). A counter that has not moved for ``collective_timeout`` seconds is a
process that stopped answering: the watcher posts a verdict naming it in the store, and every
process that reads the verdict ends with that line (exit 1) from its watch thread, whatever its
main thread is blocked in. A process that finished posts that it did, and is not watched further.

Counters, not clocks: machines' clocks need not agree. If the store itself stops answering, the
watch ends quietly and the backend's own timeout (set to twice ``collective_timeout``) remains.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from datetime import timedelta

from mpo.errors import EXIT_FAILED
from mpo.train.report import report_line


class Liveness:
    """The watch of one process (:meth:`start`), ended by :meth:`finish`.

    Args:
        rank: this process's global rank.
        world_size: the number of processes.
        timeout_s: how long a counter may stand still before its process is named.
    """

    def __init__(self, rank: int, world_size: int, timeout_s: float):
        self.rank, self.world_size, self.timeout_s = rank, world_size, timeout_s
        self.interval_s = min(5.0, timeout_s / 4)
        run = os.environ.get("TORCHELASTIC_RUN_ID", "run")
        self.prefix = f"mpo/liveness/{run}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        self._store = None

    @classmethod
    def start(cls, accelerator, timeout_s: float) -> Liveness | None:
        """Starts the watch when several processes run under a rendezvous store; else ``None``."""
        if accelerator.num_processes < 2 or not {"MASTER_ADDR", "MASTER_PORT"} <= set(os.environ):
            return None
        from torch.distributed import TCPStore

        watch = cls(accelerator.process_index, accelerator.num_processes, timeout_s)
        try:
            watch._store = TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                                    timeout=timedelta(seconds=max(30.0, timeout_s)), wait_for_workers=False)
            watch._store.set(watch._key("who", watch.rank), f"pid {os.getpid()} on {socket.gethostname()}")
        except RuntimeError:
            return None  # no TCP store at MASTER_ADDR:MASTER_PORT (another rendezvous): the backend's timeout remains
        watch._thread = threading.Thread(target=watch._watch, name="mpo-liveness", daemon=True)
        watch._thread.start()
        return watch

    def _key(self, kind: str, rank: int | None = None) -> str:
        return f"{self.prefix}{kind}" if rank is None else f"{self.prefix}{kind}/{rank}"

    def finish(self) -> None:
        """Ends the watch and tells the watcher of this process that it ended (not froze)."""
        self._done.set()
        if self._store is not None:
            try:
                self._store.set(self._key("done", self.rank), "1")
            except RuntimeError:
                pass  # the store is gone with the launch: nobody is left watching
        if self._thread is not None:
            self._thread.join(timeout=self.interval_s + 1)

    def _watch(self) -> None:
        store, watched = self._store, (self.rank + 1) % self.world_size
        verdict = self._key("verdict")
        seen, moved_at = None, time.monotonic()
        while not self._done.wait(self.interval_s):
            try:
                store.add(self._key("beat", self.rank), 1)
                if store.check([verdict]):
                    self._fail(store.get(verdict).decode())
                if store.check([self._key("done", watched)]):
                    continue
                beats = store.add(self._key("beat", watched), 0)  # reads the counter (0 before its first beat)
                now = time.monotonic()
                if beats != seen:
                    seen, moved_at = beats, now
                elif now - moved_at >= self.timeout_s:
                    who = store.get(self._key("who", watched)).decode() if store.check([self._key("who", watched)]) else "not started"
                    line = (f"error: process {watched} ({who}) stopped answering: it has not run for {now - moved_at:.0f} s "
                            f"(train.collective_timeout={self.timeout_s:g}): frozen (SIGSTOP), swapped out, or its machine "
                            "unreachable; the other processes stopped")
                    store.set(verdict, line)
                    self._fail(line)
            except RuntimeError:
                return  # the store stopped answering (the launch is ending, or lost): the backend's timeout remains

    def _fail(self, line: str) -> None:
        if self._done.is_set():
            return  # this process is ending anyway
        report_line(line)
        sys.stdout.flush()
        # The main thread may be blocked inside a collective, where no exception reaches it.
        os._exit(EXIT_FAILED)
