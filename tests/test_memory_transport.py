"""InMemoryTransport, the in-process stand-in for Http1Client: it streams an ASGI
app's answer chunk by chunk, tells the app when its client leaves, and plays the
fault scripts (refused connects, resets, stalls) the edge's tests rely on."""

from __future__ import annotations

import ast
import asyncio
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from stream_edge import transport
from stream_edge.memory_transport import InMemoryTransport, origin_of

URL = "http://backend.test/v1/stream"


class Backend:
    """An app streaming numbered chunks, each only once `next` is set."""

    def __init__(self) -> None:
        self.next = asyncio.Event()
        self.disconnected = asyncio.Event()
        self.seen: list[tuple[str, bytes, str | None]] = []

    async def stream(self, request: Request) -> StreamingResponse:
        self.seen.append((request.method, await request.body(), request.headers.get("x-key")))

        async def chunks() -> object:
            try:
                for index in range(3):
                    if index:
                        await self.next.wait()
                        self.next.clear()
                    yield f"chunk {index}\n".encode()
            except asyncio.CancelledError:
                self.disconnected.set()
                raise

        return StreamingResponse(chunks(), headers={"X-Answer": "yes"})

    async def broken(self, request: Request) -> JSONResponse:
        raise RuntimeError("the backend crashed")

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/v1/stream", self.stream, methods=["GET", "POST"]),
                Route("/v1/broken", self.broken, methods=["POST"]),
            ]
        )


async def test_the_answer_streams_as_the_app_sends_it() -> None:
    backend = Backend()
    client = InMemoryTransport({"http://backend.test": backend.app()})
    response = await client.send("POST", URL, {"X-Key": "k"}, b"hello")
    assert response.status_code == 200 and response.headers["x-answer"] == "yes"
    chunks = response.aiter_raw()
    assert await anext(chunks) == b"chunk 0\n"  # before the app has made the second
    backend.next.set()
    assert await anext(chunks) == b"chunk 1\n"
    backend.next.set()
    assert await response.aread() == b"chunk 2\n"
    await response.aclose()
    assert backend.seen == [("POST", b"hello", "k")]
    assert client.sent == [("POST", URL)]
    await client.aclose()


async def test_closing_early_tells_the_app_its_client_left() -> None:
    backend = Backend()
    client = InMemoryTransport({"http://backend.test": backend.app()})
    response = await client.send("GET", URL, {}, b"")
    assert await anext(response.aiter_raw()) == b"chunk 0\n"
    await response.aclose()
    async with asyncio.timeout(5):
        await backend.disconnected.wait()
    await client.aclose()


async def test_unknown_origins_are_refused_connects() -> None:
    client = InMemoryTransport({})
    with pytest.raises(transport.ConnectError):
        await client.send("GET", URL, {}, b"")
    with pytest.raises(transport.UnsupportedProtocol):
        await client.send("GET", "ftp://backend.test/", {}, b"")
    assert origin_of("https://b.test/x") == "https://b.test:443"


async def test_an_app_failing_is_a_500_or_a_dropped_connection() -> None:
    backend = Backend()
    client = InMemoryTransport({"http://backend.test": backend.app()})
    # Starlette answers 500 and then re-raises: a server logs that, the answer stands.
    response = await client.send("POST", "http://backend.test/v1/broken", {}, b"")
    assert response.status_code == 500 and await response.aread() == b"Internal Server Error"
    await response.aclose()

    async def crashes_at_once(scope: object, receive: object, send: object) -> None:
        raise RuntimeError("no answer at all")

    client.route("http://crash.test", crashes_at_once)
    with pytest.raises(transport.RemoteProtocolError):
        await client.send("GET", "http://crash.test/", {}, b"")

    async def crashes_mid_body(scope: object, receive: object, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"half", "more_body": True})
        raise RuntimeError("cut off")

    client.route("http://half.test", crashes_mid_body)
    response = await client.send("GET", "http://half.test/", {}, b"")
    assert await anext(response.aiter_raw()) == b"half"
    with pytest.raises(transport.ReadError):
        await anext(response.aiter_raw())
    await response.aclose()
    await client.aclose()


async def test_fault_scripts_refuse_reset_and_stall() -> None:
    backend = Backend()
    client = InMemoryTransport({"http://backend.test": backend.app()})
    faults = client.faults_for(URL)
    faults.refuse = 1
    with pytest.raises(transport.ConnectError):
        await client.send("GET", URL, {}, b"")
    faults.reset_after = 1
    response = await client.send("GET", URL, {}, b"")
    assert await anext(response.aiter_raw()) == b"chunk 0\n"
    with pytest.raises(transport.ReadError):
        await anext(response.aiter_raw())
    await response.aclose()
    faults.reset_after, faults.stall_after = None, 1
    response = await client.send("GET", URL, {}, b"")
    assert await anext(response.aiter_raw()) == b"chunk 0\n"
    backend.next.set()
    reading = asyncio.create_task(anext(response.aiter_raw()))
    await faults.stalled.wait()
    assert not reading.done()
    faults.stall_after = None
    faults.release.set()
    assert await reading == b"chunk 1\n"
    await response.aclose()
    await client.aclose()


async def test_a_stall_beyond_the_read_timeout_is_a_read_timeout() -> None:
    backend = Backend()
    client = InMemoryTransport({"http://backend.test": backend.app()}, read_timeout=0.05)
    client.faults_for(URL).stall_headers = 1
    with pytest.raises(transport.ReadTimeout):
        await client.send("GET", URL, {}, b"")
    response = await client.send("GET", URL, {}, b"")
    assert await anext(response.aiter_raw()) == b"chunk 0\n"
    with pytest.raises(transport.ReadTimeout):  # the app waits for `next`, never set
        await anext(response.aiter_raw())
    await response.aclose()
    await client.aclose()


def test_only_the_jwks_fetch_imports_httpx_at_the_edge() -> None:
    """The seam holds: the backend and webhook path sees `stream_edge.transport` only,
    so its exceptions and clients can be swapped (JWKS fetches keep httpx)."""
    root = Path(__file__).resolve().parent.parent / "stream_edge"
    importers = set()
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            if any(name == "httpx" or name.startswith("httpx.") for name in names):
                importers.add(path.relative_to(root).as_posix())
    assert importers == {"app.py", "jwks.py"}
