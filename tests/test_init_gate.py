"""`Store.init_gate` (issue 14.3): init's rate counters, TPM precheck, pending-init
cap and LLM-config version in one step, alike on every backend: memory, Redis (one
script, through the pipelined connection or redis-py) and the step-by-step path a
Redis Cluster takes."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace

import pytest

from shared.store import InitGate, InitGated, Store
from shared.store_memory import MemoryStore
from shared.store_redis import RedisStore
from tests.conftest import REDIS_URL, fresh_redis_prefix

NOW = 1_000_000.0
Gate = Callable[[InitGate], Awaitable[InitGated]]


@pytest.fixture(params=["memory", "redis-pipe", "redis-py", "redis-steps"])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Store, Gate]]:
    if request.param == "memory":
        memory = MemoryStore()
        yield memory, memory.init_gate
        return
    with fresh_redis_prefix() as prefix:
        store = RedisStore.from_url(REDIS_URL, prefix=prefix)
        if request.param == "redis-py":
            store._pipe = None
        gate = store._init_gate_steps if request.param == "redis-steps" else store.init_gate
        yield store, gate
        await store.close()


def gate_of(**changes: object) -> InitGate:
    tag = uuid.uuid4().hex
    base = InitGate(
        rate_keys=[f"rl:user:{tag}", f"rl:company:{tag}"],
        rate_limits=[100, 100],
        rate_window_seconds=60,
        tpm_keys=[],
        tpm_limits=[],
        pending_key=f"pending:init:{tag}",
        used_prefix=f"jti:{{c:{tag}}}:",
        member="a",
        now=NOW,
        expires_at=NOW + 10,
        pending_limit=100,
    )
    return replace(base, **changes)  # type: ignore[arg-type]


async def test_the_first_rate_over_its_limit_refuses_and_stops_counting(
    backend: tuple[Store, Gate],
) -> None:
    store, gate = backend
    g = gate_of(rate_limits=[2, 3])
    for member in ("a", "b"):
        assert (await gate(replace(g, member=member))).verdict == "ok"
    assert await gate(replace(g, member="c")) == InitGated("rate", index=0)
    # the company's counter was not counted for the refused init, nor was it pending
    assert await store.get_many(g.rate_keys) == [b"3", b"2"]
    assert sorted(await store.bounded_members(g.pending_key, NOW)) == ["a", "b"]
    company_only = replace(g, rate_keys=g.rate_keys[1:], rate_limits=[2], member="d")
    assert await gate(company_only) == InitGated("rate", index=0)


async def test_a_full_tpm_window_refuses(backend: tuple[Store, Gate]) -> None:
    store, gate = backend
    g = gate_of(tpm_keys=[f"tpm:user:{uuid.uuid4().hex}", f"tpm:co:{uuid.uuid4().hex}"])
    await store.add(g.tpm_keys[1], 50, 60)
    assert (await gate(replace(g, tpm_limits=[10, 51]))).verdict == "ok"
    assert await gate(replace(g, tpm_limits=[10, 50], member="b")) == InitGated("tpm", index=1)
    assert await store.bounded_members(g.pending_key, NOW) == ["a"]


async def test_pending_grants_are_capped_until_started_or_expired(
    backend: tuple[Store, Gate],
) -> None:
    store, gate = backend
    g = gate_of(pending_limit=2)
    assert (await gate(replace(g, member="a", expires_at=NOW + 10))).verdict == "ok"
    assert (await gate(replace(g, member="b", expires_at=NOW + 20))).verdict == "ok"
    assert await gate(replace(g, member="c")) == InitGated("pending", frees_at=NOW + 10)
    assert (await gate(replace(g, member="a"))).verdict == "ok"  # already in: no new place
    await store.set(g.used_prefix + "a", b"stream", 60)  # a's stream started
    assert (await gate(replace(g, member="c", expires_at=NOW + 30))).verdict == "ok"
    assert sorted(await store.bounded_members(g.pending_key, NOW)) == ["b", "c"]
    later = replace(g, member="d", now=NOW + 25, expires_at=NOW + 40)  # b expired
    assert (await gate(later)).verdict == "ok"
    assert sorted(await store.bounded_members(g.pending_key, NOW + 25)) == ["c", "d"]


async def test_the_fetched_key_comes_back(backend: tuple[Store, Gate]) -> None:
    store, gate = backend
    key = f"llm:config:version:{uuid.uuid4().hex}"
    assert (await gate(gate_of(fetch_key=key))).fetched is None
    await store.set(key, b"v2", 60)
    assert (await gate(gate_of(fetch_key=key))) == InitGated("ok", fetched=b"v2")
    assert (await gate(gate_of())).fetched is None
