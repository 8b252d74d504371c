"""One company's resume logs cannot fill the store every company shares
(`stream_edge/resume.py`, `COMPANY_LOG_BYTES`).

Each stream's log is bounded (16 MiB) and kept for the token's life plus the resume
grace and a minute after its last write (~190 s with the default token life). A
company's own backend that ignores `max_tokens` (or a model prompted to be long)
fills the log of each of its streams, each costing it a hold of `max_tokens: 16`
(within the 48 deltas the edge relays for it, `relay.output_cap`, 1 MB deltas):
inside its init rate (1200 a minute) and stream cap (200), one company could keep
tens of GiB in the Redis every company's limits, tokens and reports live in.
In process (edge, control plane, the hostile backend) on the real Redis.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import redis

from stream_edge import resume
from stream_edge.resume import events_key
from tests.conftest import REDIS_URL, fresh_redis_prefix
from tests.hostile_catalog import hostile_backend_stack
from tests.stack import InProcessStack
from tests.test_resume_budget import _chat, _events

A_STREAMS = 8
MAX_TOKENS = 16  # 24 deltas are within what the edge relays for it (`relay.output_cap`)
# Small for the test: three streams' logs (16 MiB each) pass it.
COMPANY_BUDGET = 40 * 1024 * 1024


@pytest.fixture
def stack(
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> Iterator[tuple[InProcessStack, str]]:
    """The gateway with the bulky backend; parametrized indirectly, settings to add."""
    monkeypatch.setattr(resume, "COMPANY_LOG_BYTES", COMPANY_BUDGET)
    directory = tmp_path_factory.mktemp("bulky-company")
    env = getattr(request, "param", None)
    with (
        fresh_redis_prefix() as prefix,
        hostile_backend_stack(directory, "bulky", _chat, redis_prefix=prefix, env=env) as gateway,
    ):
        yield gateway, prefix


def _held(prefix: str) -> dict[str, int]:
    server = redis.Redis.from_url(REDIS_URL)
    try:
        keys = list(server.scan_iter(match=prefix + events_key("*")))
        return {k.decode(): server.memory_usage(k, samples=0) or 0 for k in keys}
    finally:
        server.close()


def run(grant: dict[str, str]) -> list[str]:
    with httpx.stream("GET", grant["stream_url"], timeout=120) as response:
        return [e.event for e in _events(response)]


def test_one_companys_resume_logs_stay_within_its_share_of_the_store(
    stack: tuple[InProcessStack, str],
) -> None:
    """Company A's 8 streams, `max_tokens: 16` each, from a backend streaming 24 MB.
    Before: 8 full logs, 128 MiB held in Redis for 187 s after the streams ended
    (measured), 16 MiB more for every stream A starts. Now A's logs hold at most its
    budget (past it a log keeps nothing more: a resume gets `resume_gap`, the live
    stream is whole), and company B's stream keeps its whole log."""
    gateway, prefix = stack
    c = gateway.client
    a = c.new_company("1000")
    a_users = [c.new_user(a) for _ in range(2)]
    grants = [
        c.init_ok(
            a_users[i % 2], {"model": "bulky-model", "query": "bulk", "max_tokens": MAX_TOKENS}
        )
        for i in range(A_STREAMS)
    ]

    with ThreadPoolExecutor(A_STREAMS) as pool:
        live = list(pool.map(run, grants))
    assert all(events[-1] == "complete" for events in live)  # every live stream whole
    for i, grant in enumerate(grants):
        c.wait_usage(a_users[i % 2], grant["reservation_id"])
    a_held = sum(_held(prefix).values())
    assert a_held <= COMPANY_BUDGET * 1.1, f"A's logs hold {a_held / 2**20:.0f} MiB"

    b_user = c.new_user(c.new_company("1000"))
    grant = c.init_ok(b_user, {"model": "bulky-model", "query": "bulk", "max_tokens": MAX_TOKENS})
    assert run(grant)[-1] == "complete"
    c.wait_usage(b_user, grant["reservation_id"])
    b_held = sum(_held(prefix).values()) - a_held
    assert b_held >= resume.LOG_BUDGET_BYTES * 0.9  # B's log as long as a stream's may be


@pytest.mark.parametrize("stack", [{"LLMGW_MAX_STREAMS_PER_COMPANY": "400"}], indirect=True)
def test_a_raised_stream_cap_raises_the_companys_log_budget_with_it(
    stack: tuple[InProcessStack, str],
) -> None:
    """An operator doubling the company stream cap doubles the budget its resume logs
    share: four streams of whole 16 MiB logs fit twice the test's 40 MiB. Before, the
    budget was fixed whatever the cap (measured: none of the four whole, each cut at
    9-11 MiB; a company at a cap of 1,000 lost resumability past ~47 tokens/s)."""
    assert resume.company_log_budget(400) == 2 * COMPANY_BUDGET
    assert resume.company_log_budget(1) == COMPANY_BUDGET  # never below the default's
    gateway, prefix = stack
    c = gateway.client
    user = c.new_user(c.new_company("1000"))
    grants = [
        c.init_ok(user, {"model": "bulky-model", "query": "bulk", "max_tokens": MAX_TOKENS})
        for _ in range(4)
    ]
    with ThreadPoolExecutor(4) as pool:
        assert all(events[-1] == "complete" for events in pool.map(run, grants))
    for grant in grants:
        c.wait_usage(user, grant["reservation_id"])
    held = _held(prefix)
    whole = [k for k, size in held.items() if size >= resume.LOG_BUDGET_BYTES * 0.9]
    assert len(whole) == 4, {k: size // 2**20 for k, size in held.items()}
