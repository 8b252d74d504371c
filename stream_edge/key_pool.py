"""Open a backend stream through one of a provider's keys (issue 16.1).

Decided at the edge from what the token carries (a company's keys, sealed) or the
edge's own settings (the platform's keys), plus each key's state in the shared store
(`shared.key_pool`): one `get_many` per stream, no control-plane call.

Order: usable keys, least recently rate-limited first. A key answering 429 is tried
past at once, and rests for its `Retry-After` once the request's outcome is known
(below); one answering 401/403 is tried past, and marked bad (counted in metrics,
shown to the company's admins, `GET …/providers`, and skipped, from 5 minutes to a
day as its refusals repeat: `shared.key_pool.bad_value`) once another key of the
pool has accepted the same request. When every key is bad they are still tried
(a restored key recovers at its first success); when every usable key rests, the
stream gets a 429 with the time the first one is back ("no key left": a fallback
trigger, `stream_edge.fallback`). A provider with a single key always tries it
(nothing to spread over), waiting out a short `Retry-After` on it as before pools.

Why a refusal needs another key's success before it marks: a vendor may answer 403
to what a request carries rather than to the key (Gemini to an image whose `fileUri`
is another project's file), and the platform's pool is shared by every tenant. When
every key refuses one request, that request is the likelier culprit: marking them
let one member take all but one of the platform's keys out of rotation for a day
(the first key to serve again cleared only itself).

Why a 429 may not rest its key: a vendor answers 429 to a request too large for the
organization's per-minute limit on its own (Gemini's RESOURCE_EXHAUSTED looks the same
either way). Every key answers it alike, and resting them on it let one member's
oversized request every few seconds keep the platform's pool resting for every
tenant. So: 429s followed by another key's success rest their keys (the request was
fine: load); a request every key answers 429 rests the platform's keys only when
another company's request met the same within `CORROBORATE_SECONDS` (load is
everyone's; the oversized request is one company's), and a company's own keys as
before. OpenAI says outright when it is the request ("Request too large"): the
adapter makes that a 413 (`upstream_client.error_for_status`), raised at once, no
other key tried.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

import anyio

from shared.key_pool import (
    CORROBORATE_SECONDS,
    PLATFORM,
    REMEMBER_SECONDS,
    KeyState,
    bad_value,
    key_id,
    limited_key,
    order_keys,
    parse_state,
    rest_seconds,
    rests_pool,
    state_key,
)
from shared.store import KeyValueStore
from stream_edge.errors import EdgeError, TooManyRequests, UpstreamError
from stream_edge.metrics import CUSTOM, EdgeMetrics
from stream_edge.transport import Response

log = logging.getLogger("llmgw.edge.keys")

# Opens the stream with one key (None: the provider takes none); raises EdgeError.
OpenWith = Callable[[str | None, bool], Awaitable[Response]]


class KeyPool:
    def __init__(
        self,
        store: KeyValueStore,
        scope: str,
        provider: str,
        keys: tuple[str, ...],
        metrics: EdgeMetrics,
        provider_label: str,
        company_id: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._company_id = company_id  # whose request this pool opens
        self._scope = scope
        self._provider = provider
        self.keys = keys
        self._ids = [key_id(k) for k in keys]
        self._metrics = metrics
        self._provider_label = provider_label
        self._clock = clock

    def _label(self, index: int) -> str:
        # A company's key ids are unbounded: `custom` (issue 11's metric label rule).
        return self._ids[index] if self._scope == PLATFORM else CUSTOM

    def _key(self, index: int) -> str:
        return state_key(self._scope, self._provider, self._ids[index])

    async def open(self, open_with: OpenWith) -> Response:
        if not self.keys:
            return await open_with(None, True)
        now = self._clock()
        raws = await self._store.get_many([self._key(i) for i in range(len(self.keys))])
        states = [parse_state(raw, now) for raw in raws]
        pick = order_keys(states, now)
        order = pick.order or (tuple(range(len(self.keys))) if pick.all_bad else ())
        rest_until = pick.next_free_at
        if len(self.keys) == 1:
            # No pool to spread over: the one key is always tried (its state is still
            # recorded, for the admins), as before pools.
            order, rest_until = (0,), None
        last: EdgeError | None = None
        refused: list[int] = []  # marked bad only if another key then takes the request
        limited: list[tuple[int, float]] = []  # (key, rest until): rested once judged
        for index in order:
            try:
                # One key: it may wait out a short Retry-After itself, as before pools.
                response = await open_with(self.keys[index], len(self.keys) == 1)
            except TooManyRequests as exc:
                if exc.code != "upstream_rate_limited":
                    raise
                until = self._clock() + rest_seconds(exc.retry_after)
                limited.append((index, until))
                rest_until = until if rest_until is None else min(rest_until, until)
                last = exc
                continue
            except UpstreamError as exc:
                if exc.code != "upstream_auth":
                    raise
                log.warning("provider %s refused key %s", self._provider, self._ids[index])
                refused.append(index)
                if len(self.keys) == 1:
                    # Always tried whatever its state: the mark is only what the
                    # admins see, and moves no stream of anyone's elsewhere.
                    await self._mark_bad(index, states[index])
                last = exc
                continue
            # This request was fine: the keys that refused it or were limited are what failed.
            try:
                await self._rest(limited, now)
                for bad in refused:
                    await self._mark_bad(bad, states[bad])
                if states[index].strikes:
                    await self._forget(index)  # it works again: its strikes go
            except BaseException:
                # Cancelled while recording (a whole answer's client left, the
                # shutdown): the response is still ours to close. Dropped, its
                # connection stayed busy under the origin's cap, which every
                # company's streams share, for as long as the backend kept it open.
                with anyio.CancelScope(shield=True):
                    await response.aclose()
                raise
            return response
        if limited:
            if await self._whole_pool_rests():
                await self._rest(limited, now)
            else:
                for index, _ in limited:
                    self._event(index, "limited_not_rested")
        if rest_until is not None:
            raise TooManyRequests(
                "every key of this provider is rate limited; retry later",
                retry_after=max(1, int(rest_until - self._clock() + 0.999)),
                code="upstream_rate_limited",
            )
        raise last or UpstreamError(
            "the gateway's credentials were refused by the backend", code="upstream_auth"
        )

    async def _whole_pool_rests(self) -> bool:
        """Every key tried answered 429: whether they rest (`shared.key_pool.rests_pool`).
        The platform's pool remembers this company as the last to meet it, so that
        another company meeting it next confirms the load."""
        if self._scope != PLATFORM or len(self.keys) == 1:
            return True
        name = limited_key(self._scope, self._provider)
        try:
            last_company = await self._store.get(name)
            rests = rests_pool(last_company, self._company_id)
            await self._store.set(name, self._company_id.encode("utf-8"), CORROBORATE_SECONDS)
        except Exception as exc:  # the state is advice: unknown, nothing rests
            log.warning("could not record a pool's limits: %s", type(exc).__name__)
            return False
        return rests

    async def _rest(self, limited: list[tuple[int, float]], now: float) -> None:
        for index, until in limited:
            await self._mark(index, repr(until).encode(), until - now + REMEMBER_SECONDS)
            self._event(index, "rate_limited")

    def _event(self, index: int, event: str) -> None:
        self._metrics.key_events.labels(self._provider_label, self._label(index), event).inc()

    async def _mark_bad(self, index: int, previous: KeyState) -> None:
        value, ttl = bad_value(previous, self._clock())
        await self._mark(index, value, ttl)
        self._event(index, "bad")

    async def _mark(self, index: int, value: bytes, ttl: float) -> None:
        try:
            await self._store.set(self._key(index), value, max(1.0, ttl))
        except Exception as exc:  # the state is advice; the stream goes on
            log.warning("could not record a key's state: %s", type(exc).__name__)

    async def _forget(self, index: int) -> None:
        try:
            await self._store.delete(self._key(index))
        except Exception as exc:
            log.warning("could not clear a key's state: %s", type(exc).__name__)
