"""A client independent of the code under test: one HTTP/1.1 request per connection
on plain asyncio streams, read to the end, the socket closed before returning.

For load tests that must not drive the edge with the edge's own client (its bugs
would hide its bugs) nor leave sockets for the garbage collector to close."""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit


class RawResponse:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body


async def request(
    method: str,
    url: str,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
    timeout: float = 120.0,
    headers_in: asyncio.Event | None = None,
) -> RawResponse:
    """Send one request with `Connection: close` and read the whole answer (chunked,
    sized or until the server closes). `headers_in` is set once the status line and
    headers have arrived."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    lines = [f"{method} {target} HTTP/1.1", f"Host: {parts.netloc}", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    lines.append(f"Content-Length: {len(body)}")
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
            await writer.drain()
            return await _read_response(reader, headers_in)
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except ConnectionError:
                pass  # the peer reset it first: closed all the same


async def _read_response(
    reader: asyncio.StreamReader, headers_in: asyncio.Event | None
) -> RawResponse:
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    if headers_in is not None:
        headers_in.set()
    status = int(head[0].split(" ", 2)[1])
    fields: dict[str, str] = {}
    for line in head[1:]:
        if line:
            name, _, value = line.partition(":")
            fields[name.strip().lower()] = value.strip()
    if fields.get("transfer-encoding", "").lower() == "chunked":
        pieces = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")  # no trailers expected: the final CRLF
                break
            pieces.append(await reader.readexactly(size))
            await reader.readexactly(2)
        return RawResponse(status, fields, b"".join(pieces))
    if "content-length" in fields:
        return RawResponse(status, fields, await reader.readexactly(int(fields["content-length"])))
    return RawResponse(status, fields, await reader.read())
