"""When Redis is unreachable the edge refuses streams with a clear 503, never a 500,
and the backend is never called (no grant can be checked for single use). When it
dies while a stream runs, the stream completes and its usage is charged once."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import REDIS_URL
from tests.harness import bind_free_socket
from tests.private_redis import PrivateRedis, private_redis
from tests.stack import SplitStack, base_env, micro

__all__ = ["private_redis"]  # the fixture, used by name


@pytest.fixture
def edge_without_store(migrated_pg_url: str, redis_prefix: str) -> Iterator[SplitStack]:
    sock = bind_free_socket()
    dead_port = sock.getsockname()[1]
    sock.close()  # nothing listens there: every Redis command fails to connect
    with SplitStack(base_env(migrated_pg_url, REDIS_URL, redis_prefix)) as split:
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


def test_usage_survives_the_store_dying_before_the_stream_ends(
    tmp_path: Path, redis_prefix: str, private_redis: PrivateRedis
) -> None:
    spool = tmp_path / "spool"
    env = {
        **base_env(f"sqlite:///{tmp_path}/gw.db", REDIS_URL, redis_prefix),
        "LLMGW_SPOOL_DIR": str(spool),
        "LLMGW_WEBHOOK_RETRY_BASE_SECONDS": "0.05",
    }
    split = SplitStack(env)
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(split.__exit__)
        split.start("mock")
        # The store is the private Redis, the one that dies: both services' (the
        # edge starts only the streams whose request init stashed in it).
        split.start("cp", LLMGW_REDIS_URL=private_redis.url)
        split.start("edge", LLMGW_REDIS_URL=private_redis.url)
        c = split.client
        access = c.new_user(c.new_company("5"))
        before = micro(c.credits(access)["balance"])
        query = "outage [[mock tokens=30 delay_ms=30]]"
        grant = c.init_ok(access, {"query": query})
        headers = {"Authorization": f"Bearer {grant['stream_token']}"}
        body = {"stream": True, "messages": [{"role": "user", "content": query}]}
        with httpx.stream(
            "POST", grant["completions_url"], headers=headers, json=body, timeout=30
        ) as response:
            assert response.status_code == 200
            chunks = response.iter_raw()
            received = next(chunks)  # the stream runs...
            private_redis.stop()  # ...and its store dies before the end
            received += b"".join(chunks)
        assert received.rstrip().endswith(b"data: [DONE]")

        # Charged while the store is still down (posted directly)...
        record = c.wait_usage(access, grant["reservation_id"])
        assert (record["status"], record["output_tokens"]) == ("completed", 30)
        # ...and kept on disk: the outbox's own retries are long over.
        assert [p for p in spool.rglob("*.jsonl") if p.stat().st_size > 0]

        private_redis.start()  # back, empty
        edge = split.apps["edge"].state.edge
        deadline = time.monotonic() + 30
        while list(spool.rglob("*.jsonl")) or split.groups["edge"].call(edge.store.outbox_size):
            assert time.monotonic() < deadline, "the spooled report never reached the outbox"
            time.sleep(0.1)
        delivered = edge.metrics.webhook_deliveries.labels("delivered")._value.get()
        assert delivered >= 2  # the direct post, then the spooled copy through the outbox
        usage = c.as_user(access, "GET", "/v1/usage").json()["data"]["items"]
        assert [u["reservation_id"] for u in usage] == [grant["reservation_id"]]
        after = c.credits(access)
        assert before - micro(after["balance"]) == micro(record["cost"]) > 0  # once
        assert after["held"] == "0.000000"
