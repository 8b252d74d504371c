"""Open a request to the backend and map its failures before the first byte.

Everything that can go wrong before the stream starts becomes an `UpstreamError`
(502/504) or `TooManyRequests` (429, the vendor's `Retry-After` kept), so the client
gets a clean HTTP error instead of a broken stream. The vendor's raw body and our
upstream key never reach the client.
"""

from __future__ import annotations

import logging

import httpx

from shared.retry import parse_retry_after
from stream_edge.errors import EdgeError, TooManyRequests, UpstreamError
from stream_edge.upstream.base import HttpRequest

log = logging.getLogger("llmgw.edge.upstream")


def error_for_status(status: int, retry_after: str | None) -> EdgeError:
    """A non-2xx backend answer, as the error our client should see (pure)."""
    if status in (401, 403):
        return UpstreamError(
            "the gateway's credentials were refused by the backend", code="upstream_auth"
        )
    if status == 429:
        seconds = parse_retry_after(retry_after)
        return TooManyRequests(
            "the backend is rate limiting; retry later",
            retry_after=max(1, int(seconds or 1)),
            code="upstream_rate_limited",
        )
    if status in (408, 504):
        return UpstreamError("the backend timed out", code="upstream_timeout", status=504)
    return UpstreamError(f"the backend answered {status}")


async def open_stream(client: httpx.AsyncClient, request: HttpRequest) -> httpx.Response:
    """Send `request` and return the streaming response once its headers are in."""
    http_request = client.build_request(
        "POST", request.url, headers=request.headers, content=request.body
    )
    try:
        response = await client.send(http_request, stream=True)
    except httpx.TimeoutException as exc:
        raise UpstreamError(
            "the backend did not answer in time", code="upstream_timeout", status=504
        ) from exc
    except httpx.HTTPError as exc:
        log.warning("upstream connection failed: %s", type(exc).__name__)
        raise UpstreamError("the backend could not be reached") from exc
    if response.status_code >= 300:
        try:
            await response.aread()
        except httpx.HTTPError:
            pass
        finally:
            await response.aclose()
        log.warning("upstream answered %s", response.status_code)
        raise error_for_status(response.status_code, response.headers.get("retry-after"))
    return response
