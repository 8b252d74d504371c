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
        pending_keys=[f"pending:init:{tag}", f"pending:company:{tag}"],
        pending_limits=[100, 100],
        used_prefix=f"jti:{{c:{tag}}}:",
        member="a",
        now=NOW,
        expires_at=NOW + 10,
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def refused(index: int, frees_at: float) -> InitGated:
    """A pending set's refusal: a place frees at `frees_at` on the caller's clock, give
    or take the moments the store's clock moved between the calls."""
    return InitGated("pending", index, frees_at=pytest.approx(frees_at, abs=1))


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
    assert sorted(await store.bounded_members(g.pending_keys[0])) == ["a", "b"]
    company_only = replace(g, rate_keys=g.rate_keys[1:], rate_limits=[2], member="d")
    assert await gate(company_only) == InitGated("rate", index=0)


async def test_a_full_tpm_window_refuses(backend: tuple[Store, Gate]) -> None:
    store, gate = backend
    g = gate_of(tpm_keys=[f"tpm:user:{uuid.uuid4().hex}", f"tpm:co:{uuid.uuid4().hex}"])
    await store.add(g.tpm_keys[1], 50, 60)
    assert (await gate(replace(g, tpm_limits=[10, 51]))).verdict == "ok"
    assert await gate(replace(g, tpm_limits=[10, 50], member="b")) == InitGated("tpm", index=1)
    assert await store.bounded_members(g.pending_keys[0]) == ["a"]


@pytest.mark.parametrize("scope", [0, 1])
async def test_pending_grants_are_capped_until_started_or_expired(
    backend: tuple[Store, Gate], scope: int
) -> None:
    """The same for the user's set (0) and the company's (1), the other roomy."""
    store, gate = backend
    g = gate_of()
    limits = [100, 100]
    limits[scope] = 2
    g, key = replace(g, pending_limits=limits), g.pending_keys[scope]
    assert (await gate(replace(g, member="a", expires_at=NOW + 10))).verdict == "ok"
    assert (await gate(replace(g, member="b", expires_at=NOW + 20))).verdict == "ok"
    assert await gate(replace(g, member="c")) == refused(scope, NOW + 10)
    assert (await gate(replace(g, member="a"))).verdict == "ok"  # already in: no new place
    await store.set(g.used_prefix + "a", b"stream", 60)  # a's stream started
    assert (await gate(replace(g, member="c", expires_at=NOW + 30))).verdict == "ok"
    assert sorted(await store.bounded_members(key)) == ["b", "c"]
    # A caller whose clock reads 25 s later (another replica's) does not expire b:
    # the store's clock decides; the answer is on the caller's clock (b lives 20 s more).
    later = replace(g, member="d", now=NOW + 25, expires_at=NOW + 40)
    assert await gate(later) == refused(scope, NOW + 25 + 20)
    assert sorted(await store.bounded_members(key)) == ["b", "c"]


async def test_a_full_company_set_refuses_a_user_with_room_and_adds_to_neither(
    backend: tuple[Store, Gate],
) -> None:
    """Members of one company, each under its own cap, fill the company's set: the
    next init (a fresh user) is refused and is in no set; a started stream or a
    forgotten grant frees a place."""
    store, gate = backend
    g = replace(gate_of(), pending_limits=[2, 3])
    users = [replace(g, pending_keys=[f"pending:init:{u}-{uuid.uuid4().hex}", g.pending_keys[1]])
             for u in "xyz"]  # fmt: skip
    assert (await gate(replace(users[0], member="a", expires_at=NOW + 10))).verdict == "ok"
    assert (await gate(replace(users[0], member="b", expires_at=NOW + 20))).verdict == "ok"
    assert (await gate(replace(users[1], member="c", expires_at=NOW + 30))).verdict == "ok"
    assert await gate(replace(users[2], member="d")) == refused(1, NOW + 10)
    assert await store.bounded_members(users[2].pending_keys[0]) == []
    assert sorted(await store.bounded_members(g.pending_keys[1])) == ["a", "b", "c"]
    # the user's set is checked first: a full user set names the user
    assert await gate(replace(users[0], member="e")) == refused(0, NOW + 10)
    await store.set(g.used_prefix + "c", b"stream", 60)  # c's stream started
    assert (await gate(replace(users[2], member="d"))).verdict == "ok"
    assert sorted(await store.bounded_members(g.pending_keys[1])) == ["a", "b", "d"]
    await store.bounded_remove([users[0].pending_keys[0], g.pending_keys[1]], "a")  # settled
    assert (await gate(replace(users[2], member="f"))).verdict == "ok"
    assert sorted(await store.bounded_members(users[2].pending_keys[0])) == ["d", "f"]


async def test_the_fetched_key_comes_back(backend: tuple[Store, Gate]) -> None:
    store, gate = backend
    key = f"llm:config:version:{uuid.uuid4().hex}"
    assert (await gate(gate_of(fetch_key=key))).fetched is None
    await store.set(key, b"v2", 60)
    assert (await gate(gate_of(fetch_key=key))) == InitGated("ok", fetched=b"v2")
    assert (await gate(gate_of())).fetched is None
