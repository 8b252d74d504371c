"""Key pools and fallback decisions in-process (issue 16.1, 16.2): pure tables, and the
edge's `KeyPool` against a fake backend keyed by the key it is sent, an in-memory
store and an injected clock. No sockets."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from types import SimpleNamespace
from typing import Any

import orjson
import pytest

from control_plane.errors import ModelNotInChain
from control_plane.fallbacks import served_price
from control_plane.sweeper import checkpoint_served
from shared.catalog import CatalogError, Price, parse_catalog
from shared.checkpoints import UsageCheckpoint
from shared.key_pool import (
    BAD,
    BAD_MAX_SECONDS,
    PLATFORM,
    KeyState,
    bad_value,
    company_scope,
    key_id,
    limited_key,
    order_keys,
    parse_state,
    state_key,
)
from shared.store_clock import StoreClock
from shared.store_memory import MemoryStore
from stream_edge.breaker import CircuitBreaker
from stream_edge.errors import (
    BadRequest,
    EdgeError,
    InputTooLarge,
    TooManyRequests,
    UpstreamError,
)
from stream_edge.fallback import falls_back
from stream_edge.http1_connection import Headers
from stream_edge.key_pool import KeyPool
from stream_edge.metrics import EdgeMetrics
from stream_edge.transport import Response
from stream_edge.upstream.base import HttpRequest
from stream_edge.upstream.openai_chat import OpenAIChatAdapter
from stream_edge.upstream_client import RetryPolicy, error_for_status, open_stream

NOW = 1_000_000.0


# --- pure -----------------------------------------------------------------------------


def test_a_key_id_never_reveals_the_key() -> None:
    key = "sk-live-" + "x" * 40
    kid = key_id(key)
    assert len(kid) == 12 and kid not in key and key_id(key) == kid
    assert key_id(key + "y") != kid


def test_key_states_are_scoped_per_company() -> None:
    kid = key_id("same-key")
    names = {
        state_key(PLATFORM, "openai", kid),
        state_key(company_scope("a"), "openai", kid),
        state_key(company_scope("b"), "openai", kid),
    }
    assert len(names) == 3


@pytest.mark.parametrize(
    ("raw", "state"),
    [
        (None, "ok"),
        (BAD, "bad"),  # as an older release wrote it: bad for its TTL
        (b"bad 2 %r" % (NOW + 5), "bad"),
        (b"bad 2 %r" % (NOW - 5), "ok"),  # tried again; its strikes remembered
        (b"bad x y", "ok"),
        (b"bad 1", "ok"),
        (repr(NOW + 5).encode(), "resting"),
        (repr(NOW - 5).encode(), "ok"),
        (b"garbage", "ok"),  # unreadable never locks a key out
    ],
)
def test_parse_state(raw: bytes | None, state: str) -> None:
    assert parse_state(raw, NOW).state == state


def test_least_recently_rate_limited_first_resting_and_bad_skipped() -> None:
    states = [
        KeyState("ok", NOW - 10),  # limited 10 s ago, rested since
        KeyState("ok"),  # never limited
        KeyState("resting", NOW + 30),
        KeyState("bad"),
        KeyState("ok", NOW - 100),
    ]
    pick = order_keys(states, NOW, random.Random(1))
    assert pick.order == (1, 4, 0)
    assert pick.next_free_at == NOW + 30 and not pick.all_bad
    assert order_keys([KeyState("bad")] * 2, NOW).all_bad


def test_never_limited_keys_share_the_load() -> None:
    rng = random.Random(7)
    firsts = {order_keys([KeyState("ok")] * 3, NOW, rng).order[0] for _ in range(60)}
    assert firsts == {0, 1, 2}


@pytest.mark.parametrize(
    ("error", "moves_on"),
    [
        (UpstreamError("the backend could not be reached"), True),  # connect error
        (UpstreamError("timed out", code="upstream_timeout", status=504), True),
        (error_for_status(500, None), True),
        (error_for_status(503, None), True),
        (error_for_status(504, None), True),
        (error_for_status(408, None), True),
        (TooManyRequests("no key left", retry_after=3, code="upstream_rate_limited"), True),
        (error_for_status(400, None), False),  # the request's own fault
        (error_for_status(404, None), False),
        (error_for_status(413, None), False),
        (error_for_status(422, None), False),
        (error_for_status(401, None), False),  # a key problem: the pool's, not the chain's
        (error_for_status(403, None), False),
        (TooManyRequests("edge limit", retry_after=1), False),  # our own limits
        (BadRequest("bad"), False),
    ],
)
def test_what_falls_back(error: EdgeError, moves_on: bool) -> None:
    assert falls_back(error) is moves_on


async def test_an_open_breaker_falls_back() -> None:
    breaker = CircuitBreaker(failures=1, reset_seconds=60)
    breaker.record_failure()
    request = HttpRequest(url="http://backend.invalid/v1", headers={}, body=b"{}")
    with pytest.raises(UpstreamError) as caught:
        await open_stream(None, request, breaker=breaker)  # type: ignore[arg-type]
    assert falls_back(caught.value)


def test_catalog_fallbacks_and_key_envs() -> None:
    def doc(fallbacks: Any) -> dict[str, Any]:
        model = {
            "provider": "p",
            "context_length": 10,
            "max_output_tokens": 5,
            "price": {"input_per_mtok": 1, "output_per_mtok": 1},
        }
        return {
            "default_model": "a",
            "providers": {
                "p": {"api_type": "openai_chat", "base_url": "http://x", "api_key_envs": ["K1"]}
            },
            "models": {"a": {**model, "fallbacks": fallbacks}, "b": model},
        }

    catalog = parse_catalog(doc(["b"]))
    assert catalog.models["a"].fallbacks == ("b",)
    assert catalog.providers["p"].key_envs() == ("K1",)
    for bad in (["zzz"], ["a"], ["b", "b"], "b", [1]):
        with pytest.raises(CatalogError):
            parse_catalog(doc(bad))


CHAINED: Any = SimpleNamespace(
    model="big",
    fallbacks=[
        {
            "model": "mid",
            "provider": "anthropic",
            "price_input_per_mtok": "3",
            "price_output_per_mtok": "6",
        }
    ],
)


def test_settlement_accepts_only_the_chain() -> None:
    reservation = CHAINED
    assert served_price(reservation, "big") is None
    assert served_price(reservation, "") is None
    assert served_price(reservation, "mid") == ("anthropic", Price(Decimal(3), Decimal(6)))
    with pytest.raises(ModelNotInChain):
        served_price(reservation, "cheap")


def test_the_sweeper_bills_a_checkpoint_at_its_serving_model_if_in_the_chain() -> None:
    def checkpoint(model: str | None) -> UsageCheckpoint:
        written = UsageCheckpoint("j", "r", 1, 2, "2026-01-01T00:00:00Z", model=model)
        return UsageCheckpoint.loads(written.dumps())

    assert checkpoint_served(CHAINED, checkpoint("mid")) == (
        "mid", "anthropic", Price(Decimal(3), Decimal(6)),
    )  # fmt: skip
    # Outside the chain, or the grant's own model: the reservation's price.
    assert checkpoint_served(CHAINED, checkpoint("cheap")) is None
    assert checkpoint_served(CHAINED, checkpoint(None)) is None


# --- the edge's pool against a fake backend -----------------------------------------------


class Answer:
    def __init__(self, status: int, retry_after: str | None = None, body: bytes = b"{}") -> None:
        self.status_code = status
        self.headers = Headers([(b"retry-after", retry_after.encode())] if retry_after else [])
        self.body = body

    async def aread(self) -> bytes:
        return self.body

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        yield await self.aread()

    async def aclose(self) -> None:
        return None


class Backend:
    """Answers by key: `statuses[key]` (default 200); records which keys were sent."""

    def __init__(self, body: bytes = b"{}", **statuses: int) -> None:
        self.statuses = statuses
        self.body = body  # of every error answer
        self.sent: list[str] = []

    async def send(
        self, method: str, url: str, headers: Any, body: bytes, company: str | None = None
    ) -> Answer:
        key = dict(headers)["authorization"].removeprefix("Bearer ")
        self.sent.append(key)
        status = self.statuses.get(key, 200)
        return Answer(
            status, "30" if status == 429 else None, self.body if status >= 300 else b"{}"
        )


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def store() -> Iterator[MemoryStore]:
    yield MemoryStore()


def pool(
    store: MemoryStore,
    keys: tuple[str, ...],
    clock: Clock,
    scope: str = PLATFORM,
    company: str = "company-a",
) -> Any:
    return KeyPool(store, scope, "openai", keys, EdgeMetrics(), "openai", company, clock)


async def open_via(pool_: KeyPool, backend: Backend) -> Response:
    async def open_with(key: str | None, retry_rate_limited: bool) -> Response:
        request = HttpRequest(
            url="http://b/v1", headers={"authorization": f"Bearer {key}"}, body=b""
        )
        return await open_stream(
            backend,  # type: ignore[arg-type]
            request,
            policy=RetryPolicy(retries=0),
            error_status=OpenAIChatAdapter().error_status,
            retry_rate_limited=retry_rate_limited,
        )

    return await pool_.open(open_with)


async def test_a_rate_limited_key_rests_for_its_retry_after(store: MemoryStore) -> None:
    clock = Clock()
    backend = Backend(k1=429, k2=429)
    keys = ("k1", "k2", "k3")
    # Never-limited keys come in a random order: stream until both limited ones met
    # their 429; each was asked exactly once, then rested.
    for _ in range(200):
        assert (await open_via(pool(store, keys, clock), backend)).status_code == 200
        if {"k1", "k2"} <= set(backend.sent):
            break
    limited = [k for k in backend.sent if k != "k3"]
    assert sorted(limited) == ["k1", "k2"]
    for _ in range(5):
        await open_via(pool(store, keys, clock), backend)
    assert sorted(k for k in backend.sent if k != "k3") == ["k1", "k2"]
    backend.sent.clear()
    clock.now += 5  # k3 is limited later than k1 and k2
    backend.statuses = {"k3": 429}
    with pytest.raises(TooManyRequests) as caught:
        await open_via(pool(store, keys, clock), backend)
    assert backend.sent == ["k3"] and caught.value.code == "upstream_rate_limited"
    assert 24 <= caught.value.retry_after <= 25  # when the first key is back
    # A request every usable key refuses may be its own doing: nothing rests until
    # another company's request meets the same (load is everyone's).
    assert await store.get(state_key(PLATFORM, "openai", key_id("k3"))) is None
    with pytest.raises(TooManyRequests):
        await open_via(pool(store, keys, clock, company="company-b"), backend)
    k3 = await store.get(state_key(PLATFORM, "openai", key_id("k3")))
    assert parse_state(k3, clock.now).state == "resting"
    clock.now += 40  # all rested: the least recently limited come first
    backend.statuses = {}
    backend.sent.clear()
    await open_via(pool(store, keys, clock), backend)
    assert backend.sent[0] in ("k1", "k2")


async def test_a_refused_key_is_bad_and_skipped_until_it_works(store: MemoryStore) -> None:
    clock = Clock()
    backend = Backend(k1=401)
    for _ in range(200):  # in random order until k1 met its 401, then 5 more
        await open_via(pool(store, ("k1", "k2"), clock), backend)
        if "k1" in backend.sent:
            break
    for _ in range(5):
        await open_via(pool(store, ("k1", "k2"), clock), backend)
    assert backend.sent.count("k1") == 1
    raw = await store.get(state_key(PLATFORM, "openai", key_id("k1")))
    assert parse_state(raw, clock.now) == KeyState("bad", strikes=1)
    # A request no key takes proves nothing against the keys: none is marked.
    backend.statuses = {"k2": 403}
    with pytest.raises(UpstreamError) as caught:
        await open_via(pool(store, ("k1", "k2"), clock), backend)
    assert caught.value.code == "upstream_auth"
    assert await store.get(state_key(PLATFORM, "openai", key_id("k2"))) is None
    # Every key bad: still tried (a restored key recovers at its first success).
    await store.set(state_key(PLATFORM, "openai", key_id("k2")), BAD, 60)
    backend.statuses = {}
    await open_via(pool(store, ("k1", "k2"), clock), backend)
    assert await store.get(state_key(PLATFORM, "openai", key_id("k1"))) is None


async def state_of(store: MemoryStore, key: str, clock: Clock) -> KeyState:
    return parse_state(await store.get(state_key(PLATFORM, "openai", key_id(key))), clock.now)


async def test_a_bad_key_is_tried_again_after_a_wait_that_doubles_while_it_is_refused(
    store: MemoryStore,
) -> None:
    """Before, a key refused once (while another took the request) was skipped for a
    day: a vendor's passing authentication fault kept it out of rotation that long.
    Now 5 minutes, doubling with each refusal in a row (up to a day); a success
    clears its strikes."""
    clock = Clock()
    backend = Backend(k1=401)
    for strikes, skip in ((1, 300), (2, 600), (3, 1200)):
        for _ in range(200):  # until k1 is asked (random order among usable keys)
            await open_via(pool(store, ("k1", "k2"), clock), backend)
            if "k1" in backend.sent:
                break
        assert backend.sent.count("k1") == 1
        assert await state_of(store, "k1", clock) == KeyState("bad", strikes=strikes)
        backend.sent.clear()
        clock.now += skip - 1
        for _ in range(20):  # skipped all through its wait
            await open_via(pool(store, ("k1", "k2"), clock), backend)
        assert "k1" not in backend.sent
        clock.now += 1
        backend.sent.clear()
    backend.statuses = {}  # the vendor takes k1 again: its first success clears it
    for _ in range(200):
        await open_via(pool(store, ("k1", "k2"), clock), backend)
        if "k1" in backend.sent:
            break
    assert await store.get(state_key(PLATFORM, "openai", key_id("k1"))) is None
    # However long it stays refused, a day at most between two tries.
    value, ttl = bad_value(KeyState("ok", strikes=500), NOW)
    assert parse_state(value, NOW + BAD_MAX_SECONDS - 1).state == "bad"
    assert parse_state(value, NOW + BAD_MAX_SECONDS).state == "ok"
    assert ttl == 2 * BAD_MAX_SECONDS


async def test_a_request_every_key_refuses_marks_no_key(store: MemoryStore) -> None:
    """A 403 may answer what the request carries (a file the vendor will not fetch),
    not the key: refused by every key of a shared pool, it takes none of them out of
    rotation; refused by one and taken by another, the refusing key is marked."""
    clock = Clock()
    keys = ("k1", "k2", "k3")
    backend = Backend(k1=403, k2=403, k3=403)
    with pytest.raises(UpstreamError):
        await open_via(pool(store, keys, clock), backend)
    assert sorted(backend.sent) == list(keys)
    for key in keys:
        assert await store.get(state_key(PLATFORM, "openai", key_id(key))) is None
    backend = Backend(k1=403)
    for _ in range(200):  # until k1 is asked before a key that takes the request
        await open_via(pool(store, keys, clock), backend)
        if "k1" in backend.sent:
            break
    assert (await state_of(store, "k1", clock)).state == "bad"
    # A lone key is always tried: its mark is only what its admins see, kept as before.
    with pytest.raises(UpstreamError):
        await open_via(pool(store, ("solo",), clock), Backend(solo=401))
    assert (await state_of(store, "solo", clock)).state == "bad"


async def test_one_companys_429s_never_rest_another_companys_keys(store: MemoryStore) -> None:
    clock = Clock()
    limited = Backend(shared=429, other=429)
    a = company_scope("company-a")
    with pytest.raises(TooManyRequests):
        await open_via(pool(store, ("shared", "other"), clock, a), limited)
    fine = Backend()
    b = company_scope("company-b")
    await open_via(pool(store, ("shared", "other"), clock, b), fine)
    await open_via(pool(store, ("shared", "other"), clock, PLATFORM), fine)
    assert len(fine.sent) == 2  # both asked at once, neither resting


SKEW = 600.0


async def edge_on_store_clock(store: MemoryStore, real: Clock, skew: float) -> KeyPool:
    """A company's pool of keys k1, k2 on an edge whose host's clock is `skew` off
    `real`, timed as `opening.py` times it: on the store's clock."""
    clock = StoreClock(monotonic=real, wall=lambda: real() + skew)
    assert await clock.sync(store)
    scope = company_scope("company-a")
    return KeyPool(store, scope, "openai", ("k1", "k2"), EdgeMetrics(), "o", "company-a", clock.now)


async def test_an_edge_whose_clock_is_behind_takes_keys_back_when_their_rest_ends() -> None:
    """Another edge met a 429 (Retry-After 30 s) on each key, which rested them."""
    real = Clock()
    store = MemoryStore(wall=real)  # the store's clock is the real one
    with pytest.raises(TooManyRequests):
        await open_via(await edge_on_store_clock(store, real, 0), Backend(k1=429, k2=429))
    behind = await edge_on_store_clock(store, real, -SKEW)
    real.now += 31  # the rest is over
    backend = Backend()
    assert (await open_via(behind, backend)).status_code == 200
    assert len(backend.sent) == 1


async def test_an_edge_whose_clock_runs_ahead_leaves_resting_keys_alone() -> None:
    real = Clock()
    store = MemoryStore(wall=real)
    limited = Backend(k1=429, k2=429)
    with pytest.raises(TooManyRequests):
        await open_via(await edge_on_store_clock(store, real, 0), limited)
    ahead = await edge_on_store_clock(store, real, +SKEW)
    real.now += 5  # 25 s of the rest left
    limited.sent.clear()
    with pytest.raises(TooManyRequests) as caught:
        await open_via(ahead, limited)
    assert limited.sent == []  # the vendor is not asked again meanwhile
    assert 24 <= caught.value.retry_after <= 25


def openai_429(message: str, type_: str = "tokens", code: str = "rate_limit_exceeded") -> bytes:
    error = {"message": message, "type": type_, "param": None, "code": code}
    return orjson.dumps({"error": error})


TOO_LARGE = openai_429(
    "Request too large for gpt-4o in organization org-x on tokens per min (TPM): Limit "
    "30000, Requested 50000. The input or output tokens must be reduced in order to run "
    "successfully. Visit https://platform.openai.com/account/rate-limits to learn more."
)
LOAD = openai_429(
    "Rate limit reached for gpt-4o in organization org-x on tokens per min (TPM): Limit "
    "30000, Used 29000, Requested 2000. Please try again in 2s."
)


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (TOO_LARGE, 413),  # the request alone is over the limit
        (LOAD, 429),  # the key's load
        (openai_429("You exceeded your quota", "insufficient_quota", "insufficient_quota"), 429),
        (openai_429("Request too large for gpt-4o …", code="something_else"), 429),
        (b"Request too large for gpt-4o", 429),  # not OpenAI's JSON: its words prove nothing
        (b"[]", 429),
        (b"", 429),
    ],
)
def test_openais_request_too_large_is_the_requests_fault(body: bytes, status: int) -> None:
    assert OpenAIChatAdapter().error_status(429, body) == status
    too_large = error_for_status(413, None)
    assert isinstance(too_large, InputTooLarge) and too_large.code == "request_too_large"
    assert not falls_back(too_large)


async def test_a_request_openai_calls_too_large_rests_no_key_and_tries_no_other(
    store: MemoryStore,
) -> None:
    clock = Clock()
    keys = ("k1", "k2", "k3")
    backend = Backend(TOO_LARGE, k1=429, k2=429, k3=429)
    with pytest.raises(InputTooLarge):
        await open_via(pool(store, keys, clock), backend)
    assert len(backend.sent) == 1
    for key in keys:
        assert await store.get(state_key(PLATFORM, "openai", key_id(key))) is None


async def test_one_companys_request_every_platform_key_limits_rests_none(
    store: MemoryStore,
) -> None:
    """A 429 on every key may answer the request (too large for the vendor's per-minute
    limit on its own, in words that look like load): one company's such requests rest
    none of the platform's keys, however many. Load is everyone's: once another
    company's request meets every key limited too, they rest; a company's own pool
    rests at its first."""
    clock = Clock()
    keys = ("k1", "k2")
    limited = Backend(LOAD, k1=429, k2=429)
    for _ in range(5):
        with pytest.raises(TooManyRequests) as caught:
            await open_via(pool(store, keys, clock, company="member"), limited)
        assert caught.value.code == "upstream_rate_limited" and caught.value.retry_after == 30
    assert len(limited.sent) == 10  # each request asked each key: none rested
    for key in keys:
        assert await store.get(state_key(PLATFORM, "openai", key_id(key))) is None
    fine = Backend()
    await open_via(pool(store, keys, clock, company="other"), fine)
    assert len(fine.sent) == 1  # another company is served at once
    # Load: another company's request meets every key limited too, and they rest.
    with pytest.raises(TooManyRequests):
        await open_via(pool(store, keys, clock, company="other"), limited)
    for key in keys:
        raw = await store.get(state_key(PLATFORM, "openai", key_id(key)))
        assert parse_state(raw, clock.now).state == "resting"
    limited.sent.clear()
    with pytest.raises(TooManyRequests):
        await open_via(pool(store, keys, clock, company="third"), limited)
    assert limited.sent == []  # every key rests: nothing asked
    # A company's own pool is its alone: its first request every key limits rests them.
    own = company_scope("member")
    with pytest.raises(TooManyRequests):
        await open_via(pool(store, keys, clock, own, company="member"), limited)
    for key in keys:
        raw = await store.get(state_key(own, "openai", key_id(key)))
        assert parse_state(raw, clock.now).state == "resting"
    assert await store.get(limited_key(own, "openai")) is None


def test_a_fallback_is_billed_at_its_own_cache_rates() -> None:
    """A chain entry keeps the fallback's cache rates, so its cached input is billed
    at them, not at the first choice's (nor silently at the full input rate)."""
    cache_rates = {"price_cached_input_per_mtok": "0.3", "price_cache_write_per_mtok": "3.75"}
    reservation: Any = SimpleNamespace(
        model="big", fallbacks=[{**CHAINED.fallbacks[0], **cache_rates}]
    )
    assert served_price(reservation, "mid") == (
        "anthropic",
        Price(Decimal(3), Decimal(6), Decimal("0.3"), Decimal("3.75")),
    )
