"""The openai backend over several servers (``--base-url A B``): requests spread, failures move on.

Two real ``mpo-data serve`` servers on loopback ports serve the same tiny checkpoint; the client
spreads requests over them, and when one goes away mid-run its requests are retried on the other.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from data_pipeline.backends import BackendError, GenerationRequest, SamplingParams, TransformersBackend
from data_pipeline.openai_client import OpenAIBackend
from data_pipeline.server import ChatServer
from loopback import serving

# Greedy: the two servers share this process's torch RNG, so seeded sampling would race between them.
PARAMS = SamplingParams(temperature=0.0, max_new_tokens=3)
REQUESTS = [GenerationRequest(f"Question {i}?", num_samples=2, seed=i) for i in range(6)]


@pytest.fixture(scope="module")
def backend(tiny_model_dir: Path) -> TransformersBackend:
    return TransformersBackend(tiny_model_dir)


@pytest.fixture
def servers(backend: TransformersBackend) -> Iterator[tuple[list[ChatServer], list[str]]]:
    started = [ChatServer(backend, "tiny", "127.0.0.1", 0, max_tokens=3) for _ in range(2)]
    with serving(started[0]) as first, serving(started[1]) as second:
        yield started, [first, second]


def test_requests_spread_over_servers_and_move_on_when_one_goes(servers):
    servers, urls = servers
    alone = OpenAIBackend(urls[0], timeout=60, retries=0)
    reference = [g.texts for g in alone.generate(REQUESTS, PARAMS)]
    alone.close()

    client = OpenAIBackend(urls, model="tiny", concurrency=1, timeout=60, retries=1)
    assert client.answered == [1, 1]  # each server was asked whether it serves "tiny"
    assert [g.texts for g in client.generate(REQUESTS, PARAMS)] == reference  # whichever server answered
    assert sum(client.answered) == 2 + len(REQUESTS) and min(client.answered) >= 2  # both served chat requests

    servers[1].shutdown()
    servers[1].server_close()
    before = list(client.answered)
    assert [g.texts for g in client.generate(REQUESTS, PARAMS)] == reference
    assert client.answered[0] - before[0] == len(REQUESTS) and client.answered[1] == before[1]
    client.close()


def test_a_server_serving_another_model_is_refused(servers, backend):
    with serving(ChatServer(backend, "other", "127.0.0.1", 0)) as other:
        with pytest.raises(BackendError, match=r"does not serve 'tiny' \(it lists \['other'\]\)"):
            OpenAIBackend([servers[1][0], other], timeout=60, retries=0)
