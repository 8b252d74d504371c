"""When Redis is unreachable the edge refuses streams with a clear 503, never a 500,
and the backend is never called (no grant can be checked for single use)."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import REDIS_URL
from tests.harness import bind_free_socket
from tests.stack import SplitStack, base_env


@pytest.fixture
def edge_without_store(pg_database_url: str, redis_prefix: str) -> Iterator[SplitStack]:
    sock = bind_free_socket()
    dead_port = sock.getsockname()[1]
    sock.close()  # nothing listens there: every Redis command fails to connect
    with SplitStack(base_env(pg_database_url, REDIS_URL, redis_prefix)) as split:
        split.stop("edge")
        split.start("edge", LLMGW_REDIS_URL=f"redis://127.0.0.1:{dead_port}/0")
        yield split


def test_stream_refused_with_503_when_the_store_is_down(edge_without_store: SplitStack) -> None:
    c = edge_without_store.client
    access = c.new_user(c.new_company("5"))
    before = c.mock_stats()["requests"]
    for path in ("completions", "eventsource"):
        grant = c.init_ok(access, {"query": "store down [[mock tokens=3]]"})
        if path == "completions":
            response = httpx.post(
                grant["completions_url"],
                headers={"Authorization": f"Bearer {grant['stream_token']}"},
                json={"stream": True, "messages": [{"role": "user", "content": "hi"}]},
                timeout=30,
            )
        else:
            response = httpx.get(grant["stream_url"], timeout=30)
        assert response.status_code == 503, response.text
        assert response.headers["retry-after"] == "1"
        assert response.json()["error"]["code"] == "store_unavailable"
    assert c.mock_stats()["requests"] == before
