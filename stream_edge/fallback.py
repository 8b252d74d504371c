"""Fallback chains (issue 16.2): which failures move a stream to the next model of its
chain, and how the edge waits for a first token before committing to a backend.

A stream may move on only before its first byte reaches the client: a connect error,
a timeout, a 5xx, a 429 with no key left, an open circuit breaker, or no first token
within `LLMGW_FIRST_TOKEN_TIMEOUT_SECONDS`. A 4xx caused by the request (400, 404,
413, 422, a content filter) never does: the next model would refuse it too, or worse,
answer what the first one refused. Nor does a refused key (401/403): that is the key
pool's business (`stream_edge.key_pool`), and a chain is not a way around it.

With a fallback left, the edge reads the backend's stream until its first token
(`await_first_token`: text, a tool call, reasoning or a vendor's running count of its
thinking), keeping those chunks; the
relay then replays them (`Prefetched`) before reading on. Nothing has been written
to the client meanwhile.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping

import anyio

from stream_edge.errors import EdgeError, TooManyRequests, UpstreamError
from stream_edge.transport import Response, TransportError
from stream_edge.upstream.base import (
    Delta,
    Failure,
    Finish,
    OutputSoFar,
    ReasoningDelta,
    StreamParser,
    ToolCallDelta,
)


def falls_back(exc: EdgeError) -> bool:
    """Whether a failure before the first byte moves the stream to its next model (pure)."""
    if isinstance(exc, TooManyRequests):
        return exc.code == "upstream_rate_limited"  # the backend's 429, every key tried
    if not isinstance(exc, UpstreamError) or exc.code == "upstream_auth":
        return False
    status = exc.upstream_status
    # None: the backend never answered (connect error, timeout, open breaker).
    return status is None or status >= 500 or status == 408


class Prefetched:
    """A response whose first chunks were already read: they come first, then the rest."""

    def __init__(self, inner: Response, head: list[bytes]) -> None:
        self.status_code = inner.status_code
        self.headers: Mapping[str, str] = inner.headers
        self._inner = inner
        self._head = head
        self._rest = inner.aiter_raw()

    def aiter_raw(self) -> AsyncIterator[bytes]:
        return self

    def __aiter__(self) -> Prefetched:
        return self

    async def __anext__(self) -> bytes:
        if self._head:
            return self._head.pop(0)
        return await self._rest.__anext__()

    async def aread(self) -> bytes:
        head, self._head = b"".join(self._head), []
        return head + await self._inner.aread()

    async def aclose(self) -> None:
        await self._inner.aclose()


NO_FIRST_TOKEN = "the backend sent no first token in time"
# What a backend may send before its first token while the edge waits to commit to
# it: the chunks are kept to be replayed, so without a bound a backend sending what
# is no token (comments, role-only chunks) for the whole first-token timeout grew the
# edge's memory by all of it (27 MB traced for 24 MB sent, measured). What comes before
# a first token is a few hundred bytes (a role chunk, Anthropic's `message_start`,
# pings, OpenRouter's keep-alive comments): past this the backend is misbehaving,
# and the stream moves on as for any failure before its first byte.
MAX_HEAD_BYTES = 1 << 20


async def await_first_token(response: Response, parser: StreamParser, timeout: float) -> Prefetched:
    """Read until the first token (or the answer's end); raise UpstreamError — closing
    the response — when none comes within `timeout`, the stream breaks or the backend
    reports an error first. `parser` is a throwaway: the relay re-parses the chunks."""
    head: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout):
            async for chunk in response.aiter_raw():
                head.append(chunk)
                size += len(chunk)
                for event in parser.feed(chunk):
                    if isinstance(event, Failure):
                        # The vendor's words stay out of client-facing errors.
                        raise UpstreamError("the backend failed before its first token")
                    # Reasoning is a token too: the backend is answering, and moving on
                    # would leave its reasoning paid to the vendor and billed to no one;
                    # so is a running count of hidden thinking (Gemini's `OutputSoFar`).
                    if isinstance(
                        event, Delta | ToolCallDelta | ReasoningDelta | OutputSoFar | Finish
                    ):
                        return Prefetched(response, head)
                if parser.done:
                    return Prefetched(response, head)
                if size > MAX_HEAD_BYTES:
                    raise UpstreamError(
                        f"the backend sent over {MAX_HEAD_BYTES >> 20} MiB before its first token"
                    )
    except TimeoutError:
        await response.aclose()
        raise UpstreamError(NO_FIRST_TOKEN, code="upstream_timeout", status=504) from None
    except TransportError:
        await response.aclose()
        raise UpstreamError("the backend's stream broke off") from None
    except UpstreamError:
        await response.aclose()
        raise
    except BaseException:
        # Cancelled while waiting (the client left, a revocation, the stream's maximum
        # life, the shutdown): the answer is still ours to close, or the backend keeps
        # its request and generates the whole answer for nobody. Shielded: this task
        # is being cancelled.
        with anyio.CancelScope(shield=True):
            await response.aclose()
        raise
    return Prefetched(response, head)  # ended without a token: the relay says so
