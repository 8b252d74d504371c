"""500 concurrent slow streams through one edge process: every one completes with
every token, and every one is billed (PostgreSQL + Redis).

The edge runs as its own `llm-gateway stream-edge` process, as in production: in the
test process it would share one interpreter lock with the control plane, the mock and
the load generator, and measure their contention rather than the edge's."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import REDIS_URL
from tests.stack import Client, SplitStack, base_env, edge_process

STREAMS = 500
TOKENS = 20


@pytest.fixture
def split(pg_database_url: str, redis_prefix: str, tmp_path: Path) -> Iterator[SplitStack]:
    env = {
        **base_env(pg_database_url, REDIS_URL, redis_prefix),
        "LLMGW_MAX_STREAMS_PER_USER": "1000",
        "LLMGW_MAX_STREAMS_PER_COMPANY": "1000",
        "LLMGW_INIT_RATE_PER_USER": "1000000",
        "LLMGW_INIT_RATE_PER_COMPANY": "1000000",
    }
    with SplitStack(env) as stack, edge_process(stack, tmp_path, LLMGW_LOG_LEVEL="WARNING"):
        yield stack


async def run_all(cp: str, access: str, count: int) -> list[tuple[str, bytes]]:
    limits = httpx.Limits(max_connections=count + 10)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        semaphore = asyncio.Semaphore(20)

        async def init(i: int) -> dict[str, str]:
            async with semaphore:
                response = await client.post(
                    f"{cp}/v1/chat/init",
                    headers={"Authorization": f"Bearer {access}"},
                    json={"query": f"load {i} [[mock tokens={TOKENS} delay_ms=50]]"},
                )
            assert response.status_code == 201, response.text
            data: dict[str, str] = response.json()["data"]
            return data

        grants = await asyncio.gather(*(init(i) for i in range(count)))

        async def stream(grant: dict[str, str]) -> tuple[str, bytes]:
            async with client.stream("GET", grant["stream_url"]) as response:
                assert response.status_code == 200
                return grant["reservation_id"], await response.aread()

        return await asyncio.gather(*(stream(g) for g in grants))


def test_500_concurrent_slow_streams_on_one_edge(split: SplitStack) -> None:
    c = split.client
    access = c.new_user(c.new_company("100"))
    results = asyncio.run(run_all(c.cp_url, access, STREAMS))
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
