"""Redis restarts empty (no AOF, a new instance, keys evicted) while a stream runs.

The token's single-use mark (`jti:…`) is gone with everything else, so the store no
longer knows the token was used. Neither a reconnect nor a replay may then pass for
a first use: that ran the token again, and its report (the stream's own webhook id,
`usage_<jti>`) settled the reservation before the running stream's, whose report was
then a duplicate: the answer went unbilled.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.private_redis import PrivateRedis, private_redis
from tests.stack import SplitStack, base_env, micro

__all__ = ["private_redis"]  # the fixture, used by name

TOKENS = 30
# Long enough that the store's restart and the second request land mid-stream
# (~6 s); nothing asserts on time.
QUERY = f"store lost [[mock tokens={TOKENS} delay_ms=200]]"


@pytest.fixture
def split(tmp_path: Path, private_redis: PrivateRedis) -> Iterator[SplitStack]:
    # Both services on the private Redis: the stash init wrote is lost too.
    env = {
        **base_env(f"sqlite:///{tmp_path}/gw.db", private_redis.url, "lost:"),
        "LLMGW_SPOOL_DIR": str(tmp_path / "spool"),
    }
    with SplitStack(env) as stack:
        yield stack


def _restart_empty(server: PrivateRedis) -> None:
    server.stop()
    server.start()


def _settled(split: SplitStack, access: str, grant: dict[str, Any]) -> dict[str, Any]:
    record = split.client.wait_usage(access, grant["reservation_id"])
    usage = split.client.as_user(access, "GET", "/v1/usage").json()["data"]["items"]
    assert [u["reservation_id"] for u in usage] == [grant["reservation_id"]]
    return record


def test_a_reconnect_after_the_store_lost_its_memory_cannot_zero_the_running_streams_bill(
    split: SplitStack, private_redis: PrivateRedis
) -> None:
    c = split.client
    access = c.new_user(c.new_company("5"))
    before = micro(c.credits(access)["balance"])
    grant = c.init_ok(access, {"query": QUERY})
    with httpx.stream("GET", grant["stream_url"], timeout=30) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        seen = [next(lines) for _ in range(6)]  # the stream runs...
        _restart_empty(private_redis)  # ...and its store comes back empty
        # The browser's EventSource reconnects, as it does after any network blip.
        reconnect = httpx.get(grant["stream_url"], headers={"Last-Event-ID": "1"}, timeout=30)
        rest = "\n".join([*seen, *lines])
    assert "event: complete" in rest
    assert reconnect.status_code == 401, reconnect.text
    assert reconnect.json()["error"]["code"] == "token_unknown"

    record = _settled(split, access, grant)
    assert (record["status"], record["output_tokens"]) == ("completed", TOKENS)
    after = c.credits(access)
    assert before - micro(after["balance"]) == micro(record["cost"]) > 0
    assert after["held"] == "0.000000"


def test_a_used_token_is_not_replayed_after_the_store_lost_its_memory(
    split: SplitStack, private_redis: PrivateRedis
) -> None:
    c = split.client
    access = c.new_user(c.new_company("5"))
    grant = c.init_ok(access, {"query": QUERY})
    headers = {"Authorization": f"Bearer {grant['stream_token']}"}
    body = {"stream": True, "messages": [{"role": "user", "content": QUERY}]}
    with contextlib.ExitStack() as streams:
        first = streams.enter_context(
            httpx.stream("POST", grant["completions_url"], headers=headers, json=body, timeout=30)
        )
        assert first.status_code == 200
        chunks = first.iter_raw()
        received = next(chunks)
        _restart_empty(private_redis)
        requests_before = c.mock_stats()["requests"]
        replay = httpx.post(grant["completions_url"], headers=headers, json=body, timeout=30)
        # No second answer from the backend on the same hold, however the replay ends.
        assert c.mock_stats()["requests"] == requests_before
        received += b"".join(chunks)
    assert received.rstrip().endswith(b"data: [DONE]")
    assert replay.status_code == 401, replay.text
    assert replay.json()["error"]["code"] == "token_unknown"
    record = _settled(split, access, grant)
    assert (record["status"], record["output_tokens"]) == ("completed", TOKENS)
