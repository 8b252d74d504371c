"""A JWKS document fetched over HTTP and cached by ``kid``, for key servers that can
be slow, down or hostile: the edge's copy of the control plane's keys
(`stream_edge.jwks`) and the control plane's copy of an identity provider's
(`control_plane.external_auth`).

An unknown `kid` is answered only once a fetch that began after the look-up arrived
has finished (a key rotated in just before the token was signed is then known; a
refusal there would be a valid token refused), and fetches begin at least
`min_refetch_seconds` apart (1 s by default), so a flood of tokens with made-up kids
cannot turn the service into a request amplifier against the key server: it costs
the key server at most one fetch a second, and each such look-up waits at most
about the floor plus a fetch. A key server answering from a copy up to
`answer_age_seconds` old (the control plane's, `PUBLISHED_KEYS_AGE_SECONDS`) is
fetched that much after the look-up arrived, so its answer was read after it. Every
wait is bounded (`_fresh_bound`); a known `kid` is answered at once from the cache.

With a slow or failing key server (issue 11.14) there is one refresh at a time:
look-ups that need it join the one in flight; the floor counts attempts, failed
ones too (the first included); a failed fetch keeps the keys of the last good one;
and a known `kid` whose cache is merely stale is answered at once from the cache
while the refresh runs in the background, so a slow key server never stalls
requests, and a silent one does not drop keys that were known. The fetch is async:
it holds no thread that password hashing (``asyncio.to_thread``) would wait behind.
A fetch has `fetch_timeout_seconds` in all, not per read (a key server trickling its
answer a byte at a time would otherwise keep the one refresh, and every look-up of
an unknown `kid` waiting on it, for ever), and reads at most `MAX_JWKS_BYTES`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

import httpx
import orjson

log = logging.getLogger("llmgw.jwks")

K = TypeVar("K")
# A key set is a few keys of a few hundred bytes each; a provider publishing more
# than this is answering something else.
MAX_JWKS_BYTES = 256 * 1024
# How old the control plane's answer to `/.well-known/jwks.json` may be (it serves one
# read a second whatever the traffic, `control_plane.recent_answer`): the edge asks
# that much after a token with an unknown `kid` arrived, so the answer it gets was
# read after the token was signed.
PUBLISHED_KEYS_AGE_SECONDS = 1.0


class KeysUnavailable(Exception):
    """The key set could not be fetched and nothing usable is cached."""


class JWKSCache(Generic[K]):
    """`parse` turns a JWKS document into the usable keys by kid (raising when the
    document is not one); the cache keeps the last set it returned."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        url: str,
        parse: Callable[[object], dict[str, K]],
        *,
        max_age_seconds: float = 300.0,
        min_refetch_seconds: float = 1.0,
        fetch_timeout_seconds: float = 5.0,
        answer_age_seconds: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        source: str = "the key server",
    ) -> None:
        self._client = client
        self._url = url
        self._parse = parse
        self._max_age = max_age_seconds
        self._min_refetch = min_refetch_seconds
        self._timeout = fetch_timeout_seconds
        self._answer_age = answer_age_seconds
        self._clock = clock
        self._sleep = sleep  # with `clock`: tests drive both
        self._source = source
        self._keys: dict[str, K] = {}
        self._retired: frozenset[str] = frozenset()  # `retire`
        self._fetched_at: float | None = None  # last success
        self._attempted_at: float | None = None  # last attempt, failed or not
        self._finished_from: float | None = None  # when the latest attempt finished began
        self._inflight: asyncio.Task[None] | None = None

    @property
    def refreshing(self) -> bool:
        return self._inflight is not None and not self._inflight.done()

    def retire(self, kids: frozenset[str]) -> None:
        """Refuse `kids` from now on, whatever the cache or a fetch holds: the key
        server retired them (a leaked key), and an answer read before that, cached
        here for minutes or by the key server for a second, still lists them."""
        if kids == self._retired:
            return
        self._retired = kids
        self._keys = {kid: key for kid, key in self._keys.items() if kid not in kids}

    async def key(self, kid: str) -> K | None:
        """The key for `kid`, or None when the key server does not know it (or
        retired it)."""
        if kid in self._retired:
            return None
        known = self._keys.get(kid)
        if known is not None:
            assert self._fetched_at is not None
            if self._clock() - self._fetched_at > self._max_age:
                self._start_refresh()  # in the background: stale keys are still good
            return known
        arrived = self._clock()
        with contextlib.suppress(TimeoutError):  # then answer with what we have
            async with asyncio.timeout(self._fresh_bound()):
                # A fetch begun now (floor permitting) knows the usual unknown kid: an
                # edge's first token, a key published a while ago. Only one still
                # unknown waits for an answer the key server read after it arrived.
                await self._fetched_since(arrived)
                if kid not in self._keys and self._answer_age > 0:
                    await self._fetched_since(arrived + self._answer_age)
        if self._fetched_at is None:
            raise KeysUnavailable(f"cannot fetch {self._source}'s signing keys")
        return self._keys.get(kid)

    def _fresh_bound(self) -> float:
        """The longest the two `_fetched_since` can take: a fetch begun before them
        (its timeout), the floor, a fetch, the answer's age, then a last fetch."""
        return self._min_refetch + self._answer_age + 3 * self._timeout

    async def _fetched_since(self, since: float) -> None:
        """Return once a fetch (failed or not) that began at or after `since` has
        finished: joining the one in flight, else starting one once the floor since
        the last attempt has passed, sleeping until then."""
        while self._finished_from is None or self._finished_from < since:
            if self._inflight is not None and not self._inflight.done():
                # Shielded: a caller that gives up must not cancel everyone's refresh.
                await asyncio.shield(self._inflight)
                continue
            now = self._clock()
            start_at = since
            if self._attempted_at is not None:
                start_at = max(start_at, self._attempted_at + self._min_refetch)
            if now < start_at:
                await self._sleep(start_at - now)
                continue
            self._begin_refresh(now)

    def _start_refresh(self) -> asyncio.Task[None] | None:
        """The refresh in flight, or a new one unless the last attempt is more recent
        than the floor (None: nothing to wait for)."""
        if self.refreshing:
            return self._inflight
        now = self._clock()
        if self._attempted_at is not None and now - self._attempted_at < self._min_refetch:
            return None
        return self._begin_refresh(now)

    def _begin_refresh(self, now: float) -> asyncio.Task[None]:
        self._attempted_at = now
        self._inflight = asyncio.create_task(self._refresh(now), name="jwks-refresh")
        return self._inflight

    async def _refresh(self, began: float) -> None:
        try:
            async with asyncio.timeout(self._timeout):
                keys = self._parse(orjson.loads(await self._fetch()))
        except Exception as exc:  # in the background too: nothing may escape
            log.warning("jwks fetch from %s failed: %r", self._url, exc)
            return  # keep serving with the keys we have
        else:
            self._keys = {kid: key for kid, key in keys.items() if kid not in self._retired}
            self._fetched_at = self._clock()
        finally:
            if self._finished_from is None or began > self._finished_from:
                self._finished_from = began

    async def _fetch(self) -> bytes:
        async with self._client.stream("GET", self._url, timeout=self._timeout) as response:
            response.raise_for_status()
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > MAX_JWKS_BYTES:
                    raise ValueError(f"the key set is over {MAX_JWKS_BYTES} bytes")
            return bytes(body)

    async def aclose(self) -> None:
        """Cancel a refresh still running (the app's lifespan, before its client closes)."""
        if self._inflight is not None:
            self._inflight.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._inflight

    async def ready(self) -> bool:
        """Whether keys are cached: fetched now if none are (within the floor), never
        waiting out the floor as an unknown `kid` does (a probe would stall on it)."""
        if not self._keys:
            refresh = self._start_refresh()
            if refresh is not None:
                await asyncio.shield(refresh)
        return bool(self._keys)
