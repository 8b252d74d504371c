"""Open a stream's backend before its first byte: the chain's models in order (issue
16.2), each through its key pool (issue 16.1), its circuit breaker and the upstream
client's retries (`upstream_client.open_stream`)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from shared.key_pool import PLATFORM, company_scope
from shared.tokens import StreamGrant
from stream_edge import thought_signatures
from stream_edge.attempts import Attempt, Backend, upstream_call
from stream_edge.errors import EdgeError, UpstreamError
from stream_edge.fallback import await_first_token, falls_back
from stream_edge.key_pool import KeyPool
from stream_edge.state import EdgeState
from stream_edge.transport import Response
from stream_edge.upstream.base import parser_for
from stream_edge.upstream_client import open_stream

log = logging.getLogger("llmgw.edge.jobs")


class Opener:
    """`attempts`: the grant's model, then its fallbacks. `backend` is the one the
    stream is on: the first, then each fallback as the chain moves to it."""

    def __init__(self, state: EdgeState, grant: StreamGrant, attempts: Sequence[Attempt]) -> None:
        self._state = state
        self._grant = grant
        self._attempts = list(attempts)
        self.backend = Backend.of(self._attempts[0], state.settings)
        self._first_label = self.backend.model_label
        # Call id → its kept thought signature (None: none kept), as read for this stream.
        self._signatures_read: dict[str, str | None] = {}

    async def open(self, stream: bool) -> Response:
        """Connect to the backend — the chain's next model after a failure that
        `falls_back` — or raise the last attempt's `EdgeError`."""
        metrics = self._state.metrics
        for n, attempt in enumerate(self._attempts):
            if n:
                self.backend = Backend.of(attempt, self._state.settings)
                metrics.fallbacks.labels(self._first_label, self.backend.model_label).inc()
                log.info("stream falls back to %s", self.backend.model_label)
            last = n + 1 == len(self._attempts)
            try:
                return await self._open_one(stream, wait_first_token=stream and not last)
            except EdgeError as exc:
                metrics.upstream_errors.labels(self.backend.provider_label, exc.code).inc()
                if last or not falls_back(exc):
                    raise
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def _open_one(self, stream: bool, *, wait_first_token: bool) -> Response:
        backend = self.backend
        adapter = backend.adapter
        if adapter is None:
            raise UpstreamError(f"the edge cannot speak the {backend.provider.api_type} format")
        state = self._state
        breaker = state.breakers.for_call(backend.provider.name, self._grant.company_id)
        signatures = await self._thought_signatures(backend)

        async def open_with(key: str | None, retry_rate_limited: bool) -> Response:
            call = upstream_call(
                backend.attempt,
                self._grant,
                state.settings,
                stream=stream,
                key=key,
                thought_signatures=signatures,
            )
            backend.credentials = tuple(c for c in (call.api_key, call.service_token) if c)
            return await open_stream(
                state.client,
                adapter.build_request(call),
                breaker=breaker,
                policy=state.retry,
                error_status=adapter.error_status,
                retry_rate_limited=retry_rate_limited,
                body_retry_after=adapter.retry_after,
                company=self._grant.company_id,
            )

        response = await self._pool().open(open_with)
        if wait_first_token:
            # A fallback is left: commit to this backend only once it has answered.
            parser = parser_for(adapter, backend.credentials)
            return await await_first_token(response, parser, state.settings.first_token_timeout)
        return response

    async def _thought_signatures(self, backend: Backend) -> dict[str, str]:
        """The signatures kept for the history's calls, for a Gemini backend only, read
        under the grant's company (never the client's say) in one round trip; a later
        Gemini attempt of the chain reuses what was read."""
        if backend.provider.api_type != "gemini":
            return {}
        calls = thought_signatures.history_calls(backend.attempt.messages)
        missing = [c for c in calls if c[0] not in self._signatures_read]
        if missing:
            found = await thought_signatures.load(
                self._state.store, self._grant.company_id, missing
            )
            for call_id, _, _ in missing:
                self._signatures_read[call_id] = found.get(call_id)
        return {c[0]: s for c in calls if (s := self._signatures_read.get(c[0])) is not None}

    def _pool(self) -> KeyPool:
        """The company's keys for its own route, else the platform's for the provider."""
        route = self.backend.attempt.route
        own = route.api_keys or ((route.api_key,) if route.api_key else ())
        if own:
            scope, keys = company_scope(self._grant.company_id), own
        else:
            pool = self._state.settings.provider_key_pools.get(route.provider.name, ())
            scope, keys = PLATFORM, tuple(k.reveal() for k in pool)
        return KeyPool(
            self._state.store,
            scope,
            route.provider.name,
            keys,
            self._state.metrics,
            self.backend.provider_label,
            self._grant.company_id,
            # The keys' rests and bad marks are times other edges judge: the store's.
            clock=self._state.store_clock,
        )
