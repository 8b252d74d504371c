"""500 concurrent slow streams through one edge process: every one completes with
every token, and every one is billed (PostgreSQL + Redis).

The edge runs as its own `llm-gateway stream-edge` process, as in production: in the
test process it would share one interpreter lock with the control plane, the mock and
the load generator, and measure their contention rather than the edge's."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from tests import raw_http
from tests.conftest import REDIS_URL
from tests.stack import Client, SplitStack, base_env, edge_process

STREAMS = 500
TOKENS = 10
# Each stream lasts about 8 s: longer than opening them all, by 3 times at least
# (measured: all 500 open 2.0 s after the first, at a load average of 6 on 2 CPUs).
# The test's own assertion shows a stream that ended early: `peak == STREAMS` fails.
DELAY_MS = 800
OPENING_AT_ONCE = 50


@pytest.fixture
def split(migrated_pg_url: str, redis_prefix: str, tmp_path: Path) -> Iterator[SplitStack]:
    env = {
        **base_env(migrated_pg_url, REDIS_URL, redis_prefix),
        "LLMGW_MAX_STREAMS_PER_USER": "1000",
        "LLMGW_MAX_STREAMS_PER_COMPANY": "1000",
        "LLMGW_INIT_RATE_PER_USER": "1000000",
        "LLMGW_INIT_RATE_PER_COMPANY": "1000000",
        "LLMGW_MAX_PENDING_INITS_PER_USER": "1000000",
    }
    with SplitStack(env) as stack, edge_process(stack, tmp_path, LLMGW_LOG_LEVEL="WARNING"):
        yield stack


async def run_all(
    cp: str, mock: str, access: str, count: int
) -> tuple[list[tuple[str, bytes]], int]:
    """Open `count` streams and hold them all open at once; returns each stream's
    body and the most streams the backend saw in progress at one time.

    Every request goes through `tests.raw_http`, not the edge's own client: one
    connection per request on plain asyncio streams, closed before its call returns."""
    semaphore = asyncio.Semaphore(50)
    auth = {"Authorization": f"Bearer {access}", "Content-Type": "application/json"}

    async def init(i: int) -> dict[str, str]:
        body = {"query": f"load {i} [[mock tokens={TOKENS} delay_ms={DELAY_MS}]]"}
        async with semaphore:
            response = await raw_http.request(
                "POST", f"{cp}/v1/chat/init", orjson.dumps(body), auth
            )
        assert response.status == 201, response.body
        data: dict[str, str] = orjson.loads(response.body)["data"]
        return data

    grants = await asyncio.gather(*(init(i) for i in range(count)))
    # Users arrive over a second or two, not in one instant; each stream lasts
    # longer than the whole ramp, so all of them are open together.
    opening = asyncio.Semaphore(OPENING_AT_ONCE)
    peak = 0

    async def stream(grant: dict[str, str]) -> tuple[str, bytes]:
        headers_in = asyncio.Event()
        async with opening:  # held until this stream's headers are in
            response = asyncio.create_task(
                raw_http.request("GET", grant["stream_url"], headers_in=headers_in)
            )
            answered = asyncio.create_task(headers_in.wait())
            await asyncio.wait({response, answered}, return_when=asyncio.FIRST_COMPLETED)
            answered.cancel()
        result = await response
        assert result.status == 200, result.body
        return grant["reservation_id"], result.body

    async def watch_backend() -> None:
        nonlocal peak
        while True:
            stats = orjson.loads((await raw_http.request("GET", f"{mock}/_mock/stats")).body)
            peak = max(peak, stats["active"])
            await asyncio.sleep(0.2)

    watcher = asyncio.create_task(watch_backend())
    try:
        results = await asyncio.gather(*(stream(g) for g in grants))
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    return results, peak


def test_500_concurrent_slow_streams_on_one_edge(split: SplitStack) -> None:
    c = split.client
    access = c.new_user(c.new_company("100"))
    results, peak = asyncio.run(run_all(c.cp_url, c.mock_url, access, STREAMS))
    assert peak == STREAMS
    assert all(body.count(b"event: chunk") == TOKENS for _, body in results)
    assert all(b"event: complete" in body for _, body in results)
    expected = {reservation_id for reservation_id, _ in results}
    deadline = time.monotonic() + 30
    while True:
        usage = {str(u["reservation_id"]): u for u in all_usage(c, access)}
        if expected <= set(usage) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert expected <= set(usage)
    assert all(usage[r]["output_tokens"] == TOKENS for r in expected)


def all_usage(c: Client, access: str) -> list[dict[str, object]]:
    items: list[dict[str, object]] = []
    cursor = None
    while True:
        params = {"limit": 200, **({"cursor": cursor} if cursor else {})}
        data = c.as_user(access, "GET", "/v1/usage", params=params).json()["data"]
        items.extend(data["items"])
        cursor = data["next_cursor"]
        if not cursor:
            return items
