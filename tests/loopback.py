"""Real servers on loopback ports for the tests: ``mpo-data serve`` in a thread, and free ports."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from data_pipeline.server import ChatServer


def free_port() -> int:
    """A loopback port nobody listens on (at the time of asking)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def serving(server: ChatServer) -> Iterator[str]:
    """Runs ``server`` in a thread of this process; yields its ``http://host:port/v1`` and stops it."""
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    try:
        yield f"http://{host}:{port}/v1"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=30)
