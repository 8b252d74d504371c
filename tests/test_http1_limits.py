"""What a hostile backend can make the edge's HTTP client hold or wait for, against
real sockets: a response head is at most 64 KiB and 100 fields and must be in within
one read timeout of the request; a whole body is read only up to its cap."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from shared.catalog import load_catalog
from stream_edge import transport
from stream_edge.admission import Route
from stream_edge.attempts import Attempt, Backend
from stream_edge.completion import MAX_COMPLETION_BYTES, read_completion
from stream_edge.errors import UpstreamError
from stream_edge.http1 import Http1Client
from stream_edge.http1_connection import MAX_HEAD_BYTES, MAX_HEAD_FIELDS
from stream_edge.meter import Meter
from stream_edge.upstream.base import HttpRequest
from stream_edge.upstream.openai_chat import OpenAIChatAdapter
from stream_edge.upstream_client import MAX_ERROR_BODY, RetryPolicy, open_stream
from tests.test_http1 import Server, closed_by_peer, pooled, read_request


def fields(count: int) -> bytes:
    return b"".join(b"X-Field-%d: %d\r\n" % (i, i) for i in range(count))


async def test_an_endless_header_value_is_refused_past_64_kib() -> None:
    client = Http1Client(connect_timeout=1.0, read_timeout=5.0)
    closed: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nX-Big: ")
        try:
            for _ in range(4 * MAX_HEAD_BYTES // 4096):  # a value that never ends
                writer.write(b"a" * 4096)
                await writer.drain()
                await asyncio.sleep(0)
        except ConnectionError:
            closed.set_result(True)
            return
        closed.set_result(await closed_by_peer(reader))

    async with Server(handler) as server:
        with pytest.raises(transport.RemoteProtocolError, match="longer than 65536 bytes"):
            await client.send("POST", server.url, {}, b"")
        assert await closed
        assert pooled(client) == 0
    await client.aclose()


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\n" + fields(MAX_HEAD_FIELDS) + b"Content-Length: 2\r\n\r\nok",
        # An interim answer's fields count towards the same limit.
        b"HTTP/1.1 103 Early Hints\r\n" + fields(60) + b"\r\n"
        b"HTTP/1.1 200 OK\r\n" + fields(40) + b"Content-Length: 2\r\n\r\nok",
    ],
    ids=["final", "interim-and-final"],
)
async def test_more_than_100_header_fields_are_refused(head: bytes) -> None:
    client = Http1Client(connect_timeout=1.0, read_timeout=5.0)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(head)
        await asyncio.Event().wait()  # keeps the connection open until the test ends

    async with Server(handler) as server:
        with pytest.raises(transport.RemoteProtocolError, match="more than 100 response header"):
            await client.send("POST", server.url, {}, b"")
        assert pooled(client) == 0
    await client.aclose()


async def test_a_head_within_the_limits_is_served() -> None:
    client = Http1Client(connect_timeout=1.0, read_timeout=5.0)
    head = b"HTTP/1.1 200 OK\r\n" + fields(MAX_HEAD_FIELDS - 2) + b"X-Big: "
    head += b"a" * (MAX_HEAD_BYTES - len(head) - 64) + b"\r\nContent-Length: 2\r\n\r\n"

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        for i in range(0, len(head), 1000):
            writer.write(head[i : i + 1000])
            await writer.drain()
        writer.write(b"ok")
        await asyncio.Event().wait()

    async with Server(handler) as server:
        response = await client.send("POST", server.url, {}, b"")
        assert (response.status_code, await response.aread()) == (200, b"ok")
        assert len(response.headers) == MAX_HEAD_FIELDS
        await response.aclose()
    await client.aclose()


async def test_headers_dribbled_byte_by_byte_time_out_within_one_read_timeout() -> None:
    """Each byte comes well within the read timeout, but the head as a whole does not:
    the head has one read timeout in all, counted from the request. The error is the
    read timeout's, which the edge answers with 504 `upstream_timeout`."""
    client = Http1Client(connect_timeout=1.0, read_timeout=0.5)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
        for _ in range(40):  # 4 s of one byte per 0.1 s, then a complete head
            await asyncio.sleep(0.1)
            writer.write(b"a")
        writer.write(b"\r\nContent-Length: 2\r\n\r\nok")
        await asyncio.Event().wait()

    async with Server(handler) as server:
        with pytest.raises(UpstreamError) as raised:
            await open_stream(
                client, HttpRequest(server.url, {}, b"{}"), policy=RetryPolicy(retries=0)
            )
        assert (raised.value.status, raised.value.code) == (504, "upstream_timeout")
        assert raised.value.message == "the backend did not answer in time"  # a read timeout
        assert pooled(client) == 0
    await client.aclose()


async def test_a_huge_error_body_is_read_to_64_kib_and_its_connection_closed() -> None:
    client = Http1Client(connect_timeout=1.0, read_timeout=5.0)
    size = 16 * MAX_ERROR_BODY
    closed: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 500 Oops\r\nContent-Length: %d\r\n\r\n" % size)
        # The write would block past what the client reads: do not wait for it.
        writer.write(b"e" * size)
        closed.set_result(await closed_by_peer(reader, within=5.0))

    seen: list[int] = []

    def error_status(status: int, body: bytes) -> int:
        seen.append(len(body))
        return status

    async with Server(handler) as server:
        request = HttpRequest(server.url, {}, b"{}")
        with pytest.raises(UpstreamError) as raised:
            await open_stream(
                client, request, policy=RetryPolicy(retries=0), error_status=error_status
            )
        assert (raised.value.status, raised.value.upstream_status) == (502, 500)
        assert seen == [MAX_ERROR_BODY]
        assert await closed  # not read to its end, so never reused
        assert pooled(client) == 0 and client.open_connections(server.url) == 0
    await client.aclose()


def backend() -> Backend:
    catalog = load_catalog(None)
    model = catalog.models["mock-fast"]
    route = Route(model, catalog.providers[model.provider], None, max_tokens=50)
    meter = Meter(input_estimate=5, keep_transcript=False)
    return Backend(Attempt(route, [], {}, 50, 5), OpenAIChatAdapter(), meter, "m", "p")


async def test_a_whole_answer_over_its_cap_is_a_502_and_its_connection_closed() -> None:
    client = Http1Client(connect_timeout=1.0, read_timeout=5.0)
    # A well-formed answer: without the cap it would be read and served whole.
    answer = {"choices": [{"message": {"content": "a" * 2 * MAX_COMPLETION_BYTES}}]}
    body = orjson.dumps(answer)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body))
        for i in range(0, len(body), 65536):
            writer.write(body[i : i + 65536])
            await writer.drain()  # raises once the client has closed: the test goes on
        await asyncio.Event().wait()

    async with Server(handler) as server:
        response = await client.send("POST", server.url, {}, b"{}")
        with pytest.raises(UpstreamError, match="longer than 8 MiB") as raised:
            await read_completion(response, backend())
        assert (raised.value.status, raised.value.code) == (502, "upstream_error")
        assert pooled(client) == 0 and client.open_connections(server.url) == 0
    await client.aclose()
