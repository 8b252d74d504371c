"""Atomic holds under load (issue point 2), on PostgreSQL + Redis over real HTTP:
200 concurrent ``POST /v1/chat/init`` against a balance that covers exactly N holds
give exactly N x 201 and (200 - N) x 402, while ``/v1/me`` pollers never see
``available`` below zero; then all N streams settle concurrently and the books
still balance."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from shared.pricing import cost_micro, estimate_input_tokens, format_credits
from shared.webhooks import sign
from tests.test_control_plane import (
    CP,
    assert_books_balance,
    credits_of,
    micro,
    start_cp,
    usage_event,
)

N = 37
TOTAL = 200
POLLERS = 4
MESSAGES = [{"role": "user", "content": "hi"}]
MAX_TOKENS = 16


@pytest.fixture
def cp(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[CP]:
    with start_cp(request, tmp_path, "postgres") as handle:
        yield handle


@dataclass
class Burst:
    results: list[httpx.Response]
    observations: list[dict[str, str]]
    wall_seconds: float


async def _burst(url: str, authorization: str) -> Burst:
    limits = httpx.Limits(max_connections=TOTAL + POLLERS, max_keepalive_connections=0)
    async with httpx.AsyncClient(
        base_url=url, headers={"Authorization": authorization}, timeout=60, limits=limits
    ) as http:
        done = asyncio.Event()
        observations: list[dict[str, str]] = []

        async def poll() -> None:
            while not done.is_set():
                r = await http.get("/v1/me")
                assert r.status_code == 200, r.text
                observations.append(r.json()["data"]["credits"])

        pollers = [asyncio.create_task(poll()) for _ in range(POLLERS)]
        body = {"messages": MESSAGES, "max_tokens": MAX_TOKENS}
        started = time.perf_counter()
        results = await asyncio.gather(
            *(http.post("/v1/chat/init", json=body) for _ in range(TOTAL))
        )
        wall = time.perf_counter() - started
        done.set()
        await asyncio.gather(*pollers)
    return Burst(list(results), observations, wall)


async def _settle_all(cp: CP, events: list[Any]) -> list[int]:
    async with httpx.AsyncClient(base_url=cp.url, timeout=60) as http:

        async def post(event: Any) -> int:
            body = event.body()
            headers = sign(cp.settings.webhook_secret.reveal(), event.webhook_id, body)
            return (
                await http.post("/v1/webhooks/usage", content=body, headers=headers)
            ).status_code

        return list(await asyncio.gather(*(post(e) for e in events)))


def test_200_concurrent_inits_take_exactly_the_holds_the_balance_covers(cp: CP) -> None:
    price = cp.settings.catalog.models[cp.settings.catalog.default_model].price
    hold = cost_micro(estimate_input_tokens(MESSAGES), MAX_TOKENS, price)
    client, company_id = cp.owner_client(format_credits(N * hold))

    burst = asyncio.run(_burst(cp.url, str(client.headers["Authorization"])))

    codes = [r.status_code for r in burst.results]
    assert codes.count(201) == N and codes.count(402) == TOTAL - N, sorted(set(codes))
    refused = [r.json() for r in burst.results if r.status_code == 402]
    assert {body["error"]["code"] for body in refused} == {"insufficient_credits"}
    inits = [r.json()["data"] for r in burst.results if r.status_code == 201]
    assert len({i["reservation_id"] for i in inits}) == N
    assert {micro(i["reserved_credits"]) for i in inits} == {hold}
    # Every concurrent observation was consistent: nothing overdrawn, nothing invented.
    assert burst.observations, "the pollers saw nothing"
    for seen in burst.observations:
        assert micro(seen["available"]) >= 0, seen
        assert micro(seen["balance"]) == N * hold, seen
        assert micro(seen["held"]) + micro(seen["available"]) == N * hold, seen
    assert credits_of(client) == {
        "balance": format_credits(N * hold),
        "held": format_credits(N * hold),
        "available": "0.000000",
    }
    assert_books_balance(cp, company_id, client)

    # All N streams report at once (each used 2 input + 3 output tokens).
    events = [usage_event(i, company_id, input_tokens=2, output_tokens=3) for i in inits]
    assert asyncio.run(_settle_all(cp, events)) == [200] * N
    charge = cost_micro(2, 3, price)
    assert credits_of(client) == {
        "balance": format_credits(N * (hold - charge)),
        "held": "0.000000",
        "available": format_credits(N * (hold - charge)),
    }
    assert_books_balance(cp, company_id, client)
    print(  # the figures, for `pytest -s`
        f"\n{TOTAL} concurrent inits, N={N}: {codes.count(201)}x201 {codes.count(402)}x402 "
        f"in {burst.wall_seconds:.2f} s; {len(burst.observations)} /v1/me observations"
    )
