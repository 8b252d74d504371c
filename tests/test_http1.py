"""Http1Client against real sockets: small asyncio servers on ephemeral ports that
answer with hand-written bytes, so every framing, reuse and failure case is exact."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import ipaddress
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import uvloop
from cryptography import x509

from stream_edge import transport
from stream_edge.http1 import Http1Client, Http1Response
from stream_edge.http1_connection import HIGH_WATER
from tests import tls_certs

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
)


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def ok(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


async def read_request(reader: asyncio.StreamReader) -> bytes | None:
    """One request's head (its body is read and dropped), or None at EOF."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            await reader.readexactly(int(line.split(b":")[1]))
    return head


async def closed_by_peer(reader: asyncio.StreamReader, within: float = 1.0) -> bool:
    """Whether the client closes the connection within `within` seconds."""
    try:
        async with asyncio.timeout(within):
            while await reader.read(65536):
                pass
    except ConnectionError:
        pass
    except TimeoutError:
        return False
    return True


class Server:
    """asyncio.start_server on 127.0.0.1:0, counting connections and keeping requests."""

    def __init__(self, handler: Handler, ssl_context: ssl.SSLContext | None = None) -> None:
        self.handler, self.ssl = handler, ssl_context
        self.connections = 0
        self.requests: list[bytes] = []
        self.tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> Server:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.ssl)
        self.port = self.server.sockets[0].getsockname()[1]
        scheme = "https" if self.ssl else "http"
        self.url = f"{scheme}://{'localhost' if self.ssl else '127.0.0.1'}:{self.port}/v1/x?y=1"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        self.connections += 1
        try:
            await self.handler(reader, writer)
            writer.close()
            await writer.wait_closed()
        except (ConnectionError, asyncio.CancelledError):
            # Cancelled only by __aexit__; ending normally keeps asyncio's
            # client_connected_cb done-callback from logging the cancellation.
            writer.close()

    async def serve_forever(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, answer: bytes
    ) -> None:
        while (head := await read_request(reader)) is not None:
            self.requests.append(head)
            writer.write(answer)
            await writer.drain()


@pytest.fixture
async def client() -> AsyncIterator[Http1Client]:
    client = Http1Client(connect_timeout=1.0, read_timeout=1.0)
    yield client
    await client.aclose()


def pooled(client: Http1Client) -> int:
    return sum(len(stack) for stack in client._idle.values())


async def test_chunked_sse_arrives_incrementally(client: Http1Client) -> None:
    go = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(SSE_HEAD + chunk(b"data: 1\n\n"))
        await go.wait()  # the second event exists only after the first was received
        writer.write(chunk(b"data: 2\n\n") + chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
        await read_request(reader)

    async with Server(handler) as server:
        response = await client.send("POST", server.url, {"Accept": "text/event-stream"}, b"{}")
        assert response.status_code == 200
        body = response.aiter_raw()
        assert await anext(body) == b"data: 1\n\n"
        go.set()
        rest = [piece async for piece in body]
        assert b"".join(rest) == b"data: 2\n\ndata: [DONE]\n\n"
        assert len(rest) == 1  # two chunks and the terminator arrive in one read: one item
        await response.aclose()
        assert pooled(client) == 1


async def test_content_length_body_headers_and_request_head(client: Http1Client) -> None:
    async with Server(lambda r, w: server.serve_forever(r, w, answer)) as server:
        answer = ok(
            b'{"ok":true}', b"Content-Type: application/json\r\nX-Multi: a\r\nx-multi: b\r\n"
        )
        response = await client.send(
            "POST", server.url, [("Authorization", "Bearer k"), ("Content-Length", "99")], b"abc"
        )
        assert response.headers.get("content-type") == "application/json"
        assert response.headers.get("CONTENT-TYPE") == "application/json"
        assert "Content-Length" in response.headers and "nope" not in response.headers
        assert response.headers["X-MULTI"] == "a, b"
        assert isinstance(response, Http1Response)
        assert await response.aread() == b'{"ok":true}'
        await response.aclose()
        await response.aclose()  # idempotent
    head = server.requests[0].decode()
    assert head.startswith("POST /v1/x?y=1 HTTP/1.1\r\n")
    assert f"Host: 127.0.0.1:{server.port}\r\n" in head
    for line in ("Content-Length: 3", "Accept-Encoding: identity", "Connection: keep-alive"):
        assert f"\r\n{line}\r\n" in head
    assert "Content-Length: 99" not in head  # the client frames the body, not the caller


async def test_keep_alive_reuses_one_connection(client: Http1Client) -> None:
    async with Server(lambda r, w: server.serve_forever(r, w, ok(b"hello"))) as server:
        for _ in range(3):
            response = await client.send("GET", server.url, {}, b"")
            assert await response.aread() == b"hello"
            await response.aclose()
        assert server.connections == 1
        assert len(server.requests) == 3


async def test_connection_close_and_eof_framed_bodies_are_not_pooled(client: Http1Client) -> None:
    answers = [ok(b"bye", b"Connection: close\r\n"), b"HTTP/1.1 200 OK\r\n\r\nuntil eof"]

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(answers.pop(0))

    async with Server(handler) as server:
        for expected in (b"bye", b"until eof"):
            response = await client.send("GET", server.url, {}, b"")
            assert await response.aread() == expected
            await response.aclose()
            assert pooled(client) == 0
        assert server.connections == 2


async def test_server_closing_idle_connection_is_replaced(client: Http1Client) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(ok(b"one"))  # claims keep-alive, then closes the idle connection

    async with Server(handler) as server:
        for _ in range(2):
            response = await client.send("GET", server.url, {}, b"")
            assert await response.aread() == b"one"
            await response.aclose()
            # The server's close reaches the pooled connection (it is not reused).
            async with asyncio.timeout(5):
                while not all(c.lost for stack in client._idle.values() for c in stack):
                    await asyncio.sleep(0)
        assert server.connections == 2


async def test_keep_alive_race_is_retried_once_on_a_new_connection(client: Http1Client) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        number = server.connections
        await read_request(reader)
        writer.write(ok(b"connection %d" % number))
        # The first connection reads the next request and closes without an answer, as
        # a server does when its idle timeout fires just as the request arrives.
        await read_request(reader)

    async with Server(handler) as server:
        response = await client.send("POST", server.url, {}, b"1")
        assert await response.aread() == b"connection 1"
        await response.aclose()
        response = await client.send("POST", server.url, {}, b"2")
        assert await response.aread() == b"connection 2"
        await response.aclose()
        assert server.connections == 2


async def test_fresh_connection_closed_without_answer_is_not_retried(client: Http1Client) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)

    async with Server(handler) as server:
        with pytest.raises(transport.RemoteProtocolError):
            await client.send("POST", server.url, {}, b"")
        assert server.connections == 1


async def test_idle_connections_expire() -> None:
    client = Http1Client(connect_timeout=1.0, read_timeout=1.0, idle_seconds=4.0)
    async with Server(lambda r, w: server.serve_forever(r, w, ok(b"x"))) as server:
        for _ in range(2):
            response = await client.send("GET", server.url, {}, b"")
            await response.aread()
            await response.aclose()
            for stack in client._idle.values():  # as if 5 s had passed since its release
                for conn in stack:
                    conn.idle_since -= 5.0
        await client.aclose()
        assert server.connections == 2


async def test_connection_refused(client: Http1Client) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(transport.ConnectError):
        await client.send("GET", f"http://127.0.0.1:{port}/", {}, b"")


async def test_connect_timeout() -> None:
    client = Http1Client(connect_timeout=0.1, read_timeout=1.0)
    # A listener whose accept queue is full drops further SYNs: connect() just hangs.
    with socket.socket() as listener, contextlib.ExitStack() as stack:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        address = listener.getsockname()
        while True:
            filler = stack.enter_context(socket.socket())
            filler.settimeout(0.05)
            try:
                filler.connect(address)
            except TimeoutError:
                break
        # The outer limit only stops a broken connect timeout from waiting out the
        # kernel's SYN retries (minutes): it would fail the test, not pass it slowly.
        with pytest.raises(transport.ConnectTimeout):
            async with asyncio.timeout(5):
                await client.send("GET", f"http://127.0.0.1:{address[1]}/", {}, b"")


@pytest.mark.parametrize("stage", ["headers", "body"])
async def test_silent_server_times_out(stage: str) -> None:
    client = Http1Client(connect_timeout=1.0, read_timeout=0.2)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        if stage == "body":
            writer.write(SSE_HEAD + chunk(b"data: 1\n\n"))
        await asyncio.Event().wait()  # silent until the test ends

    async with Server(handler) as server:
        started = time.monotonic()
        with pytest.raises(transport.ReadTimeout):
            async with asyncio.timeout(5):  # a broken read timeout fails, not hangs
                response = await client.send("POST", server.url, {}, b"")
                async for _ in response.aiter_raw():
                    pass
        assert time.monotonic() - started >= 0.19  # the timer does not fire early
        await client.aclose()


@pytest.mark.parametrize(
    "answer",
    [
        SSE_HEAD + chunk(b"data: 1\n\n") + b"64\r\nonly ten b",  # chunk of 100, cut
        ok(b"short")[:-2],  # shorter than its Content-Length
    ],
)
async def test_body_cut_off_raises(client: Http1Client, answer: bytes) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(answer)

    async with Server(handler) as server:
        response = await client.send("POST", server.url, {}, b"")
        with pytest.raises((transport.RemoteProtocolError, transport.ReadError)):
            async for _ in response.aiter_raw():
                pass
        await response.aclose()
        assert pooled(client) == 0


async def test_malformed_response(client: Http1Client) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"NOT HTTP AT ALL\r\n\r\n")
        await asyncio.Event().wait()  # keeps the connection open until the test ends

    async with Server(handler) as server:
        with pytest.raises(transport.RemoteProtocolError):
            await client.send("GET", server.url, {}, b"")


async def test_aclose_mid_stream_closes_the_upstream_connection(client: Http1Client) -> None:
    observed: asyncio.Queue[bool] = asyncio.Queue()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if server.connections > 1:
            return await server.serve_forever(reader, writer, ok(b"fresh"))
        await read_request(reader)
        writer.write(SSE_HEAD + chunk(b"data: 1\n\n"))
        # Bounded: a connection kept open (pooled) instead would never be closed here.
        await observed.put(await closed_by_peer(reader, within=5.0))

    async with Server(handler) as server:
        response = await client.send("POST", server.url, {}, b"")
        assert await anext(response.aiter_raw()) == b"data: 1\n\n"
        await response.aclose()
        assert await observed.get() is True
        response = await client.send("POST", server.url, {}, b"")
        assert await response.aread() == b"fresh"
        await response.aclose()
        assert server.connections == 2


@pytest.mark.parametrize("during", ["send", "body"])
async def test_cancellation_closes_the_socket(client: Http1Client, during: str) -> None:
    closed = asyncio.Event()
    first = asyncio.Event()
    received = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        received.set()
        if during == "body":
            writer.write(SSE_HEAD + chunk(b"data: 1\n\n"))
        if await closed_by_peer(reader):
            closed.set()

    async def consume(url: str) -> None:
        response = await client.send("POST", url, {}, b"")
        async for _ in response.aiter_raw():
            first.set()

    async with Server(handler) as server:
        task = asyncio.create_task(consume(server.url))
        if during == "body":
            await first.wait()
        else:
            await received.wait()  # the request is out; its answer is awaited
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        async with asyncio.timeout(1.0):
            await closed.wait()
        assert pooled(client) == 0


async def test_slow_consumer_pauses_reading(client: Http1Client) -> None:
    body = bytes(4 * 1024 * 1024)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(ok(body))
        await writer.drain()
        await read_request(reader)

    async with Server(handler) as server:
        response = await client.send("GET", server.url, {}, b"")
        conn = response._conn
        assert conn is not None
        # Nobody reads the body: the connection must pause once its buffer fills.
        async with asyncio.timeout(10):
            while not conn.paused:
                await asyncio.sleep(0.01)
        assert HIGH_WATER < conn.buffered < 1024 * 1024  # the rest waits in the kernel
        assert len(await response.aread()) == len(body)
        await response.aclose()
        assert pooled(client) == 1


def self_signed(tmp: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server context, client context trusting only that server's certificate)."""
    names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    return tls_certs.self_signed(tmp, "localhost", names)


async def test_https_with_a_self_signed_certificate(tmp_path: Path) -> None:
    server_context, client_context = self_signed(tmp_path)
    async with Server(
        lambda r, w: server.serve_forever(r, w, ok(b"secret")), server_context
    ) as server:
        trusting = Http1Client(connect_timeout=1.0, read_timeout=1.0, ssl_context=client_context)
        for _ in range(2):
            response = await trusting.send("GET", server.url, {}, b"")
            assert await response.aread() == b"secret"
            await response.aclose()
        await trusting.aclose()
        assert server.connections == 1
        assert f"Host: localhost:{server.port}\r\n" in server.requests[0].decode()
        untrusting = Http1Client(connect_timeout=1.0, read_timeout=1.0)
        with pytest.raises(transport.ConnectError):
            await untrusting.send("GET", server.url, {}, b"")


async def test_rejects_bad_requests(client: Http1Client) -> None:
    with pytest.raises(transport.UnsupportedProtocol):
        await client.send("GET", "ftp://example.com/", {}, b"")
    with pytest.raises(transport.LocalProtocolError):
        await client.send("GET", "http://127.0.0.1:1/", {"X": "a\r\nEvil: 1"}, b"")


SCENARIOS: list[tuple[Callable[..., Awaitable[None]], dict[str, object]]] = [
    (test_chunked_sse_arrives_incrementally, {}),
    (test_content_length_body_headers_and_request_head, {}),
    (test_keep_alive_reuses_one_connection, {}),
    (test_connection_close_and_eof_framed_bodies_are_not_pooled, {}),
    (test_server_closing_idle_connection_is_replaced, {}),
    (test_keep_alive_race_is_retried_once_on_a_new_connection, {}),
    (test_fresh_connection_closed_without_answer_is_not_retried, {}),
    (test_idle_connections_expire, {}),
    (test_connection_refused, {}),
    (test_connect_timeout, {}),
    (test_silent_server_times_out, {"stage": "body"}),
    (test_body_cut_off_raises, {"answer": SSE_HEAD + b"64\r\ncut"}),
    (test_malformed_response, {}),
    (test_aclose_mid_stream_closes_the_upstream_connection, {}),
    (test_cancellation_closes_the_socket, {"during": "send"}),
    (test_cancellation_closes_the_socket, {"during": "body"}),
    (test_slow_consumer_pauses_reading, {}),
    (test_https_with_a_self_signed_certificate, {}),
]


@pytest.mark.parametrize(
    ("scenario", "kwargs"), SCENARIOS, ids=[f"{s.__name__[5:]}{k}" for s, k in SCENARIOS]
)
def test_on_uvloop(
    scenario: Callable[..., Awaitable[None]], kwargs: dict[str, object], tmp_path: Path
) -> None:
    """The same scenarios on uvloop, which the edge runs on: its transports differ."""

    async def main() -> None:
        client = Http1Client(connect_timeout=1.0, read_timeout=1.0)
        wanted = inspect.signature(scenario).parameters
        given = {"client": client, "tmp_path": tmp_path, **kwargs}
        try:
            await scenario(**{name: given[name] for name in wanted})
        finally:
            await client.aclose()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())
