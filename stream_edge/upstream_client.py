"""Open a request to the backend and map its failures before the first byte.

Everything that can go wrong before the stream starts becomes an `UpstreamError`
(502/504), `TooManyRequests` (429, the vendor's `Retry-After` kept) or, for a request
the backend finds too large, `InputTooLarge` (413 `request_too_large`), so the client
gets a clean HTTP error instead of a broken stream. The vendor's raw body and our
upstream key never reach the client.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from shared.retry import Backoff, parse_retry_after
from stream_edge.breaker import Breaker
from stream_edge.errors import EdgeError, InputTooLarge, TooManyRequests, UpstreamError
from stream_edge.transport import (
    ConnectTimeout,
    InvalidURL,
    PoolTimeout,
    Response,
    Timeout,
    Transport,
    TransportError,
    read_at_most,
)
from stream_edge.upstream.base import HttpRequest

log = logging.getLogger("llmgw.edge.upstream")


def error_for_status(status: int, retry_after: str | None) -> EdgeError:
    """A non-2xx backend answer, as the error our client should see (pure)."""
    if status in (401, 403):
        return UpstreamError(
            "the gateway's credentials were refused by the backend",
            code="upstream_auth",
            upstream_status=status,
        )
    if status == 429:
        seconds = parse_retry_after(retry_after)
        return TooManyRequests(
            "the backend is rate limiting; retry later",
            retry_after=max(1, int(seconds or 1)),
            code="upstream_rate_limited",
        )
    if status == 413:
        # The request is too large for the backend (Anthropic's `request_too_large`;
        # OpenAI's "Request too large" 429, `error_status`): the client's to fix, and
        # no other key or model of the same vendor would take it.
        return InputTooLarge(
            "the backend refused this request as too large for its limits; send less "
            "input or ask for fewer max_tokens",
            code="request_too_large",
        )
    if status in (408, 504):
        return UpstreamError(
            "the backend timed out", code="upstream_timeout", status=504, upstream_status=status
        )
    return UpstreamError(f"the backend answered {status}", upstream_status=status)


# 529: Anthropic's `overloaded_error`, a 503 in its own words (its client retries
# it as it retries a 503); like a 503 it counts against the breaker (>= 500) and
# moves a fallback chain on (`fallback.falls_back`).
RETRYABLE_STATUSES = frozenset({429, 502, 503, 504, 529})
# The most of a non-2xx answer's body read (adapters look into it for the vendor's
# error code): the rest is never read, and its connection is closed.
MAX_ERROR_BODY = 64 * 1024
# A backend asking us to wait longer than this is answered to the client instead.
MAX_RETRY_AFTER_SECONDS = 5.0


@dataclass(frozen=True)
class RetryPolicy:
    retries: int = 2
    backoff: Backoff = field(default_factory=lambda: Backoff(base=0.2, cap=2.0))
    # How a backoff is waited out: tests pass one that records it instead.
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep


async def open_stream(
    client: Transport,
    request: HttpRequest,
    *,
    breaker: Breaker | None = None,
    policy: RetryPolicy | None = None,
    error_status: Callable[[int, bytes], int] | None = None,
    retry_rate_limited: bool = True,
    body_retry_after: Callable[[bytes], float | None] | None = None,
    company: str | None = None,
) -> Response:
    """Send `request` and return the streaming response once its headers are in.

    Retries only before the first byte — connection failures and 429/502/503/504/529 —
    with jittered backoff, honouring `Retry-After`; nothing has reached the client
    yet, so a retry is invisible to it. A circuit breaker fails fast while the
    backend keeps failing. `retry_rate_limited=False`: a 429 is raised at once (a key
    pool tries its next key instead of waiting on this one). `body_retry_after`: the
    wait an error body states, for a vendor that sends no `Retry-After` (Gemini).
    `company`: whose stream it is, held to its share of the backend's connections."""
    policy = policy or RetryPolicy()
    attempt = 0
    while True:
        if breaker is not None and not breaker.allow():
            raise UpstreamError("the backend is failing; try again shortly", code="upstream_error")
        try:
            error, retry_after = await _attempt(
                client, request, breaker, error_status, body_retry_after, company
            )
        except BaseException:
            # Cancelled (the client left) mid-attempt: a half-open trial must still
            # end, or the breaker refuses this provider forever (issue 11.11).
            if breaker is not None:
                breaker.record_abandoned()
            raise
        if not isinstance(error, EdgeError):
            return error
        attempt += 1
        if isinstance(error, TooManyRequests) and not retry_rate_limited:
            raise error
        if retry_after is None or attempt > policy.retries or retry_after > MAX_RETRY_AFTER_SECONDS:
            raise error
        await policy.sleep(policy.backoff.delay(attempt, retry_after or None))


async def _attempt(
    client: Transport,
    request: HttpRequest,
    breaker: Breaker | None,
    error_status: Callable[[int, bytes], int] | None,
    body_retry_after: Callable[[bytes], float | None] | None = None,
    company: str | None = None,
) -> tuple[Response | EdgeError, float | None]:
    """One try: the response, or (error, retry-after seconds or None if not retryable)."""
    try:
        response = await client.send(
            "POST", request.url, request.headers, request.body, company=company
        )
    except InvalidURL:
        raise  # the provider's configured URL, not the backend, is broken
    except PoolTimeout:
        # Our own cap on connections to this backend, not the backend failing: no
        # breaker failure, and no retry after a whole connect timeout of waiting.
        log.warning("no free connection to the backend")
        return UpstreamError(
            "the backend could not be reached in time", code="upstream_timeout", status=504
        ), None
    except ConnectTimeout:
        _failed(breaker)
        return UpstreamError(
            "the backend could not be reached in time", code="upstream_timeout", status=504
        ), 0.0
    except Timeout:
        _failed(breaker)
        return UpstreamError(
            "the backend did not answer in time", code="upstream_timeout", status=504
        ), None
    except TransportError as exc:
        log.warning("upstream connection failed: %s", type(exc).__name__)
        _failed(breaker)
        # No response headers yet: a reset or a half-closed keep-alive connection is
        # retried like a refused connect (as the vendors' own clients do); a response
        # that has begun is never retried (see relay).
        return UpstreamError("the backend could not be reached"), 0.0
    status = response.status_code
    if status < 300:
        if breaker is not None:
            breaker.record_success()
        return response, None
    body = b""
    try:
        # Vendor error bodies are small; a hostile one is cut at the cap (and its
        # connection closed) rather than read whole into memory.
        body, _ = await read_at_most(response, MAX_ERROR_BODY)
    except TransportError:
        pass
    finally:
        await response.aclose()
    log.warning("upstream answered %s", status)
    if error_status is not None:
        # The adapter knows its vendor's quirks (Gemini: a refused key is a 400).
        status = error_status(status, body)
    if status >= 500:
        _failed(breaker)
    elif breaker is not None:
        breaker.record_answer()  # a 4xx: the backend is up
    retry_after_header = response.headers.get("retry-after")
    if retry_after_header is None and body_retry_after is not None:
        # Gemini says when in its body (RetryInfo), never in a header.
        delay = body_retry_after(body)
        if delay is not None:
            retry_after_header = str(math.ceil(delay))
    error = error_for_status(status, retry_after_header)
    if status not in RETRYABLE_STATUSES:
        return error, None
    return error, parse_retry_after(retry_after_header) or 0.0


def _failed(breaker: Breaker | None) -> None:
    if breaker is not None:
        breaker.record_failure()
