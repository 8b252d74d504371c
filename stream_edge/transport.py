"""The seam between the edge and the HTTP it sends to backends and the control plane.

Everything on the backend and webhook path (upstream_client, relay, fallback, jobs,
key_callers, outbox) sees a `Transport` and its `Response`, and catches only the
exceptions below, never a library's. Production uses the lean `Http1Client`
(http1.py); tests can pass any other implementation, e.g. one that routes each origin
to an ASGI app in-process (`stream_edge.memory_transport`).

The exception tree, after httpx's (`httpx/_exceptions.py`), so the edge's error
mapping reads the same::

    TransportError
    ├── Timeout
    │   ├── ConnectTimeout
    │   │   └── PoolTimeout     no free connection to the origin within the connect timeout
    │   ├── ReadTimeout
    │   └── WriteTimeout
    ├── NetworkError
    │   ├── ConnectError        refused, DNS, TLS verification
    │   ├── ReadError           reset mid-response
    │   └── WriteError
    ├── ProtocolError
    │   ├── RemoteProtocolError the backend broke HTTP (malformed, closed mid-response)
    │   └── LocalProtocolError  we would have (a CR or LF in a header)
    ├── UnsupportedProtocol     not http:// or https://
    └── InvalidURL
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Protocol

RequestHeaders = Mapping[str, str] | list[tuple[str, str]]


class TransportError(Exception):
    """Anything that kept a request from getting its whole answer."""


class Timeout(TransportError):
    pass


class ConnectTimeout(Timeout):
    pass


class PoolTimeout(ConnectTimeout):
    """Every connection the origin may have was busy for the whole connect timeout."""


class ReadTimeout(Timeout):
    pass


class WriteTimeout(Timeout):
    pass


class NetworkError(TransportError):
    pass


class ConnectError(NetworkError):
    pass


class ReadError(NetworkError):
    pass


class WriteError(NetworkError):
    pass


class ProtocolError(TransportError):
    pass


class RemoteProtocolError(ProtocolError):
    pass


class LocalProtocolError(ProtocolError):
    pass


class UnsupportedProtocol(TransportError):
    pass


class InvalidURL(TransportError):
    pass


class Response(Protocol):
    """A response whose status and headers are in; the body is read with `aiter_raw()`
    (as it arrives) or `aread()`. `aclose()` must always be called: it returns the
    connection for reuse, or closes it (so the backend stops) if the body was not
    read to the end."""

    @property
    def status_code(self) -> int: ...

    @property
    def headers(self) -> Mapping[str, str]: ...

    def aiter_raw(self) -> AsyncIterator[bytes]: ...

    async def aread(self) -> bytes: ...

    async def aclose(self) -> None: ...


class Transport(Protocol):
    """Sends one request with a whole body; returns once the response headers are in.
    Raises only `TransportError`s (and ValueError for a request it cannot send).
    `company`: whose request it is, for a transport that shares an origin's
    connections between companies (`Http1Client`, `stream_edge.origin_share`)."""

    async def send(
        self,
        method: str,
        url: str,
        headers: RequestHeaders,
        body: bytes,
        *,
        company: str | None = None,
    ) -> Response: ...

    async def aclose(self) -> None: ...


async def read_at_most(
    response: Response, limit: int, parts: list[bytes] | None = None
) -> tuple[bytes, bool]:
    """The body, or its first `limit` bytes and True when it is longer than that.

    Reading stops past `limit`, so a backend cannot make us hold more; the caller's
    `aclose()` then drops the connection, whose body was not read to its end (it is
    never reused). For whole bodies only: a stream is read with `aiter_raw()`.
    `parts`, when given, gets each chunk as it is read: what the caller keeps of a
    body whose reading failed (a timeout, a broken connection)."""
    parts = [] if parts is None else parts
    size = 0
    async for chunk in response.aiter_raw():
        parts.append(chunk)
        size += len(chunk)
        if size > limit:
            return b"".join(parts)[:limit], True
    return b"".join(parts), False
