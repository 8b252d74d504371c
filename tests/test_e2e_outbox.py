"""The usage outbox is durable: nothing is lost while the control plane is down or
when an edge is replaced, nothing is charged twice, and refused events wait in a
dead-letter list until an operator replays them (PostgreSQL + Redis)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from shared.pricing import cost_micro
from shared.sse import SSEDecoder
from tests.conftest import REDIS_URL, new_webhook_secret
from tests.stack import SplitStack, base_env, micro

ROOT = Path(__file__).resolve().parent.parent
FAST_RETRIES = {
    "LLMGW_WEBHOOK_RETRY_BASE_SECONDS": "0.05",
    "LLMGW_WEBHOOK_RETRY_CAP_SECONDS": "0.5",
    "LLMGW_MAX_STREAMS_PER_USER": "100",
}


@pytest.fixture
def split(pg_database_url: str, redis_prefix: str) -> Iterator[SplitStack]:
    with SplitStack({**base_env(pg_database_url, REDIS_URL, redis_prefix), **FAST_RETRIES}) as s:
        yield s


def stream_to_completion(url: str) -> dict[str, object]:
    decoder = SSEDecoder()
    with httpx.stream("GET", url, timeout=30) as response:
        assert response.status_code == 200, response.read()
        events = [e for raw in response.iter_raw() for e in decoder.feed(raw)]
    assert events[-1].event == "complete", events[-1]
    complete: dict[str, object] = json.loads(events[-1].data)
    return complete


def outbox_cli(stack: SplitStack, *args: str) -> dict[str, object] | list[dict[str, object]]:
    env = {**os.environ, "LLMGW_REDIS_URL": REDIS_URL,
           "LLMGW_REDIS_PREFIX": stack.env["LLMGW_REDIS_PREFIX"]}  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-m", "llm_gateway.cli", "outbox", *args],
        env=env, cwd=ROOT, capture_output=True, timeout=60, text=True,
    )  # fmt: skip
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    if args[0] == "dead-letters":
        return lines
    assert result.returncode == 0, result.stderr
    first: dict[str, object] = lines[0]
    return first


def test_fifty_streams_while_the_control_plane_is_down_settle_once_after(
    split: SplitStack,
) -> None:
    c = split.client
    token = c.new_user(c.new_company("20"))
    before = c.credits(token)
    # One stream first, so the edge has fetched the signing keys while they were reachable.
    warm = c.init_ok(token, {"query": "warm up [[mock tokens=2]]"})
    stream_to_completion(warm["stream_url"])
    warm_cost = micro(c.wait_usage(token, warm["reservation_id"])["cost"])
    grants = [c.init_ok(token, {"query": f"q{i} [[mock tokens={5 + i}]]"}) for i in range(50)]

    split.stop("cp")
    with ThreadPoolExecutor(25) as pool:
        completes = list(pool.map(lambda g: stream_to_completion(g["stream_url"]), grants))
    assert all(done["done"] for done in completes)
    # Every report is waiting in the shared outbox; then the edge itself is replaced.
    # (The last report may land a moment after its `complete` event: the report is
    # written once the response is finished.)
    edge_state = split.apps["edge"].state.edge
    deadline = time.monotonic() + 5
    while split.groups["edge"].call(edge_state.store.outbox_size) < 50:
        assert time.monotonic() < deadline, "reports missing from the outbox"
        time.sleep(0.02)
    split.stop("edge")

    split.start("cp")
    split.start("edge")  # a fresh process: it finds the other edge's undelivered events
    records = [c.wait_usage(token, g["reservation_id"], timeout=30) for g in grants]

    price = split.settings().catalog.models["mock-fast"].price
    expected = sum(
        cost_micro(int(done["usage"]["input_tokens"]), int(done["usage"]["output_tokens"]), price)  # type: ignore[index]
        for done in completes
    )
    assert [r["output_tokens"] for r in records] == [5 + i for i in range(50)]
    usage = c.as_user(token, "GET", "/v1/usage", params={"limit": 200}).json()["data"]["items"]
    assert len(usage) == 51 == len({u["reservation_id"] for u in usage})
    after = c.credits(token)
    assert micro(before["balance"]) - micro(after["balance"]) == expected + warm_cost
    assert micro(after["held"]) == 0


def test_refused_events_wait_as_dead_letters_until_replayed(split: SplitStack) -> None:
    c = split.client
    token = c.new_user(c.new_company("5"))
    # An edge deployed with the wrong webhook secret: the control plane answers 401.
    split.stop("edge")
    split.start("edge", LLMGW_WEBHOOK_SECRET=new_webhook_secret())
    grant = c.init_ok(token, {"query": "misconfigured [[mock tokens=9]]"})
    stream_to_completion(grant["stream_url"])
    deadline = time.monotonic() + 15
    dead: list[dict[str, object]] = []
    while time.monotonic() < deadline and not dead:
        dead = outbox_cli(split, "dead-letters")  # type: ignore[assignment]
        time.sleep(0.1)
    assert len(dead) == 1
    webhook_id = str(dead[0]["id"])
    assert dead[0]["data"]["reservation_id"] == grant["reservation_id"]  # type: ignore[index]
    assert micro(c.credits(token)["held"]) > 0  # not settled, not lost

    # The operator fixes the secret and replays.
    split.stop("edge")
    split.start("edge")
    assert outbox_cli(split, "replay") == {"replayed": [webhook_id], "not_found": []}
    record = c.wait_usage(token, grant["reservation_id"])
    assert record["output_tokens"] == 9
    assert outbox_cli(split, "status") == {"pending": 0, "dead_letters": 0}
