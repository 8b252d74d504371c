"""The edge's JWKS cache under a slow or failing control plane (issue 11.14): one
refresh at a time, failures remembered (the refetch floor holds for them too), and
stale keys served while a refresh runs. Fake transport and injected clock."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shared.jwks import MAX_JWKS_BYTES
from stream_edge.jwks import JWKSCache, KeysUnavailable

URL = "http://cp.invalid/.well-known/jwks.json"
MAX_AGE = 300.0
FLOOR = 5.0


def jwks_doc(*kids: str) -> dict[str, object]:
    keys = []
    for kid in kids:
        public = Ed25519PrivateKey.generate().public_key()
        jwk = jwt.PyJWK.from_dict(
            {**jwt.algorithms.OKPAlgorithm.to_jwk(public, as_dict=True), "kid": kid}
        )
        keys.append({**jwk._jwk_data, "alg": "EdDSA", "use": "sig"})
    return {"keys": keys}


class Clock:
    """The cache's clock; its `sleep` moves it on (sleepers at once: to the latest end)."""

    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        until = self.now + seconds
        self.slept.append(seconds)
        await asyncio.sleep(0)
        self.now = max(self.now, until)


class ControlPlane:
    """Counts fetches; `gate` (when set) holds every answer until released."""

    def __init__(self, answer: Callable[[], httpx.Response]) -> None:
        self.answer = answer
        self.fetches = 0
        self.gate: asyncio.Event | None = None

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.fetches += 1
        if self.gate is not None:
            await self.gate.wait()
        return self.answer()


def cache_for(
    cp: ControlPlane, clock: Clock, answer_age: float = 0.0
) -> tuple[JWKSCache, httpx.AsyncClient]:
    client = httpx.AsyncClient(transport=httpx.MockTransport(cp))
    cache = JWKSCache(
        client,
        URL,
        max_age_seconds=MAX_AGE,
        min_refetch_seconds=FLOOR,
        answer_age_seconds=answer_age,
        clock=clock,
        sleep=clock.sleep,
    )
    return cache, client


async def all_done(aws: list[Awaitable[object]], within: float = 5.0) -> list[object]:
    tasks = [asyncio.ensure_future(a) for a in aws]
    _, pending = await asyncio.wait(tasks, timeout=within)
    for task in pending:
        task.cancel()
    assert not pending, f"{len(pending)} of {len(tasks)} look-ups waited on the refresh"
    return [t.result() for t in tasks]


async def test_stale_keys_are_served_while_one_slow_refresh_runs() -> None:
    doc = jwks_doc("k1")
    cp = ControlPlane(lambda: httpx.Response(200, json=doc))
    clock = Clock()
    cache, client = cache_for(cp, clock)
    async with client:
        first = await cache.key("k1")
        assert first is not None and cp.fetches == 1
        clock.now += MAX_AGE + 1  # stale
        cp.gate = asyncio.Event()  # and the control plane is slow
        keys = await all_done([cache.key("k1") for _ in range(5)])
        assert keys == [first] * 5
        assert cp.fetches <= 2  # one refresh in flight, not five
        cp.gate.set()
        await asyncio.sleep(0)
        for _ in range(100):
            if cp.fetches == 2 and not cache.refreshing:
                break
            await asyncio.sleep(0.01)
        assert cp.fetches == 2


async def test_failed_refreshes_are_remembered_and_not_repeated_by_every_look_up() -> None:
    doc = jwks_doc("k1")
    healthy = True
    cp = ControlPlane(lambda: httpx.Response(200, json=doc) if healthy else httpx.Response(503))
    clock = Clock()
    cache, client = cache_for(cp, clock)
    async with client:
        known = await cache.key("k1")
        healthy = False
        clock.now += MAX_AGE + 1
        # A stale known kid and an unknown one, five times each, concurrently.
        found = await all_done(
            [cache.key("k1") for _ in range(5)] + [cache.key("kX") for _ in range(5)]
        )
        assert found == [known] * 5 + [None] * 5
        assert cp.fetches == 2  # the first fill, then ONE failed refresh
        clock.now += FLOOR - 1
        # Within the floor of a failed attempt: they wait for the floor, then share
        # one fetch, begun once it has passed.
        await all_done([cache.key("kX") for _ in range(5)])
        assert cp.fetches == 3
        assert clock.now == MAX_AGE + 1 + FLOOR


async def test_an_unknown_kid_joins_the_refresh_in_flight() -> None:
    docs = [jwks_doc("k1"), jwks_doc("k1", "k2")]
    cp = ControlPlane(lambda: httpx.Response(200, json=docs[min(cp.fetches, 2) - 1]))
    clock = Clock()
    cache, client = cache_for(cp, clock)
    async with client:
        await cache.key("k1")
        clock.now += FLOOR  # k2 was just rotated in
        keys = await all_done([cache.key("k2") for _ in range(5)])
        assert all(k is not None for k in keys) and cp.fetches == 2


async def test_no_keys_at_all_is_unavailable_and_the_floor_still_holds() -> None:
    cp = ControlPlane(lambda: httpx.Response(503))
    clock = Clock()
    cache, client = cache_for(cp, clock)
    async with client:
        results = await asyncio.gather(*(cache.key("k1") for _ in range(5)), return_exceptions=True)
        assert all(isinstance(r, KeysUnavailable) for r in results)
        assert cp.fetches == 1
        with pytest.raises(KeysUnavailable):
            await cache.key("k1")
        assert cp.fetches == 1
        assert not await cache.ready()


async def test_closing_cancels_a_refresh_in_flight() -> None:
    cp = ControlPlane(lambda: httpx.Response(200, json=jwks_doc("k1")))
    cp.gate = asyncio.Event()
    cache, client = cache_for(cp, Clock())
    async with client:
        lookup = asyncio.ensure_future(cache.key("k1"))
        while not cache.refreshing:
            await asyncio.sleep(0)
        await cache.aclose()
        assert not cache.refreshing
        with pytest.raises(asyncio.CancelledError):
            await lookup


async def test_a_key_server_trickling_its_answer_cannot_hold_the_refresh() -> None:
    """httpx's timeouts are per read: a key server sending a byte every 50 ms kept
    the one refresh, and every look-up of an unknown kid waiting on it, for ever.
    A fetch has its timeout in all."""

    async def trickle() -> AsyncIterator[bytes]:
        yield b'{"keys": ['
        while True:
            await asyncio.sleep(0.05)
            yield b" "

    cp = ControlPlane(lambda: httpx.Response(200, content=trickle()))
    client = httpx.AsyncClient(transport=httpx.MockTransport(cp))
    clock = Clock()
    cache = JWKSCache(client, URL, fetch_timeout_seconds=0.3, clock=clock, sleep=clock.sleep)
    async with client:
        [result] = await all_done([_unavailable(cache.key("k1"))], within=30.0)
        assert result is KeysUnavailable


async def test_a_key_set_past_its_size_cap_is_refused_and_the_known_keys_kept() -> None:
    answers = [httpx.Response(200, json=jwks_doc("k1"))]
    huge = {"keys": [{"kty": "OKP", "crv": "Ed25519", "x": "A" * 43, "kid": f"k{i}"}
                     for i in range(MAX_JWKS_BYTES // 40)]}  # fmt: skip
    cp = ControlPlane(lambda: answers[-1])
    clock = Clock()
    cache, client = cache_for(cp, clock)
    async with client:
        assert await cache.key("k1") is not None
        answers.append(httpx.Response(200, json=huge))
        clock.now += MAX_AGE + FLOOR
        assert await cache.key("k2") is None  # the huge set's kid: not read
        assert cp.fetches == 2
        assert await cache.key("k1") is not None


async def _unavailable(lookup: Awaitable[object]) -> object:
    try:
        return await lookup
    except KeysUnavailable:
        return KeysUnavailable


AGE = 1.0  # the control plane's answer age (`PUBLISHED_KEYS_AGE_SECONDS`)


async def test_made_up_kids_wait_at_most_the_bound_and_cost_one_fetch_per_floor() -> None:
    """An unknown kid waits for a fetch begun after it arrived (plus the answer's
    age), never longer than the floor and that age (a fetch takes no time here), and
    a stream of made-up kids makes the fetches begin at least a floor apart."""
    clock = Clock()
    began: list[float] = []
    doc = jwks_doc("k1")

    def answer() -> httpx.Response:
        began.append(clock.now)
        return httpx.Response(200, json=doc)

    cp = ControlPlane(answer)
    cache, client = cache_for(cp, clock, answer_age=AGE)
    async with client:
        await cache.key("k1")
        for step in range(12):
            arrived = clock.now
            found = await all_done([cache.key(f"made-up-{step}-{i}") for i in range(5)])
            assert found == [None] * 5
            assert arrived + AGE <= began[-1] and clock.now - arrived <= FLOOR + AGE
            clock.now += FLOOR / 3  # the next crowd, a third of a floor on
        assert all(b - a >= FLOOR for a, b in itertools.pairwise(began)), began
        assert await cache.key("k1") is not None  # a known kid: at once, no fetch
        assert len(began) == cp.fetches


async def test_a_new_kid_is_found_by_the_fetch_begun_after_its_token_arrived() -> None:
    """A fetch in flight began before the key was rotated in (its answer lacks it):
    a look-up of the new kid arriving meanwhile waits for the next fetch, begun the
    answer's age after it arrived, instead of refusing the token."""
    clock = Clock()
    published = [jwks_doc("k1")]
    began: list[float] = []
    gate = asyncio.Event()

    async def control_plane(request: httpx.Request) -> httpx.Response:
        served = published[-1]  # what the key server reads as the fetch begins
        began.append(clock.now)
        if len(began) == 2:
            await gate.wait()
        return httpx.Response(200, json=served)

    client = httpx.AsyncClient(transport=httpx.MockTransport(control_plane))
    cache = JWKSCache(
        client, URL, min_refetch_seconds=FLOOR, answer_age_seconds=AGE,
        clock=clock, sleep=clock.sleep,
    )  # fmt: skip
    async with client:
        assert await cache.key("k1") is not None
        clock.now += FLOOR
        earlier = asyncio.ensure_future(cache.key("made-up"))
        while len(began) < 2:
            await asyncio.sleep(0)
        published.append(jwks_doc("k1", "k2"))  # rotated in; its token arrives
        arrived = clock.now
        lookup = asyncio.ensure_future(cache.key("k2"))
        await asyncio.sleep(0)
        gate.set()
        assert await earlier is None
        assert await lookup is not None
        assert len(began) == 3 and began[-1] >= arrived + AGE


async def test_a_kid_the_first_fetch_knows_waits_for_nothing_more() -> None:
    """An edge's first token (a cold cache), or a key published a while ago: one fetch
    begun at once knows it, so the look-up neither sleeps nor waits for the answer's
    age (before: every first stream of a fresh edge waited that age, 1 s)."""
    clock = Clock()
    cp = ControlPlane(lambda: httpx.Response(200, json=jwks_doc("k1")))
    cache, client = cache_for(cp, clock, answer_age=AGE)
    async with client:
        assert await cache.key("k1") is not None
        assert (cp.fetches, clock.slept, clock.now) == (1, [], 0.0)
