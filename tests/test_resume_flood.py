"""A flood of resume reconnects on one stream pins neither followers nor their bytes.

Attack (measured before the fix, through the real edge): whoever holds a stream URL
may reconnect with `Last-Event-ID` as often as it likes. A hostile in-house backend
sends 1 MB deltas and holds the stream open; 30 reconnects of that one URL, 200 ms
apart, each reading nothing. Each reconnect started a follower that read up to 256
frames at once (the whole log) and handed it to its connection in one `send`; the
superseded ones were only detached at the watcher's next pass, and a detached
follower whose client read nothing was never let go (its clean end waited on that
client, so it ran on until the stream ended). Result: 30 followers running, 366 MB
in their connections' write buffers (+404 MB RSS), unchanged 12 s later.

Now a reconnect ends the previous connection to the same stream on its edge at once
(a superseded client that reads gets a clean end; one stuck in a send is cut), a
follower reads at most `READ_BYTES` a round trip, and a response hands its body to
the server in `SEND_SLICE` slices, so a client that reads nothing holds at most the
transport's high-water mark plus one slice. Measured after: one follower, ~100 KB a
connection, RSS unchanged.
"""

from __future__ import annotations

import asyncio
import fcntl
import socket
import termios
import threading
import time
from collections.abc import AsyncIterator, Iterator
from urllib.parse import urlsplit

import httpx
import pytest
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from shared.sse import ServerSentEvent, SSEDecoder
from shared.store_memory import MemoryStore
from stream_edge import resume
from stream_edge.resume import Follower, ResumeLog, done_key, live_key
from stream_edge.streaming import SEND_SLICE
from tests.conftest import fresh_redis_prefix
from tests.hostile_catalog import hostile_backend_stack, sse_frame
from tests.polling import wait_until
from tests.stack import InProcessStack
from tests.token_claims import jti_of

DELTAS = 6
BIG = "x" * 1_000_000
FLOOD = 10
# A client that reads nothing holds, per connection, the transport's high-water mark
# (64 KiB) plus one slice, plus framing; before the fix, megabytes.
HELD_PER_CONNECTION = 64 * 1024 + SEND_SLICE + 4096
release = threading.Event()


async def _chat(request: Request) -> Response:
    """An in-house backend answering `DELTAS` deltas of 1 MB, then holding the stream
    open until the test releases it."""

    async def frames() -> AsyncIterator[bytes]:
        for _ in range(DELTAS):
            yield sse_frame({"choices": [{"index": 0, "delta": {"content": BIG}}]})
        while not release.is_set():
            await asyncio.sleep(0.02)
        yield sse_frame({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        usage = {"prompt_tokens": 10, "completion_tokens": 60, "total_tokens": 70}
        yield sse_frame({"choices": [], "usage": usage})
        yield b"data: [DONE]\n\n"

    return StreamingResponse(frames(), media_type="text/event-stream")


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessStack]:
    env = {
        "LLMGW_IDLE_TIMEOUT_SECONDS": "120",  # the held stream stays open
        "LLMGW_FIRST_TOKEN_TIMEOUT_SECONDS": "120",
        # A superseded client that reads nothing is let go after this, not 10 s.
        "LLMGW_SLOW_CLIENT_TIMEOUT_SECONDS": "1",
    }
    directory = tmp_path_factory.mktemp("flood")
    with (
        fresh_redis_prefix() as prefix,
        hostile_backend_stack(directory, "bulky", _chat, redis_prefix=prefix, env=env) as stack,
    ):
        yield stack


def _reconnect_reading_nothing(url: str, after: int) -> socket.socket:
    """Send a resume request, then never read (a tiny receive window, so the edge's
    writes back up at once)."""
    parts = urlsplit(url)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((parts.hostname or "127.0.0.1", parts.port or 80))
    request = (
        f"GET {parts.path}?{parts.query} HTTP/1.1\r\nHost: edge\r\nLast-Event-ID: {after}\r\n\r\n"
    )
    sock.sendall(request.encode())
    return sock


def _waiting_bytes(sock: socket.socket) -> int:
    raw = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
    return int.from_bytes(raw, "little")


def test_a_reconnect_flood_runs_one_follower_and_pins_no_frames(gateway: InProcessStack) -> None:
    c = gateway.client
    state = gateway.edge.state.edge
    token = c.new_user(c.new_company("100"))
    grant = c.init_ok(token, {"model": "bulky-model", "query": "bulk"})
    key = live_key(jti_of(grant["stream_token"]))

    def followers() -> int:
        """Resume connections of this stream the edge is serving."""

        async def count() -> int:
            return sum(1 for s in list(state.active) if s.live is not None and s.live[0] == key)

        return int(gateway.group.call(count))

    first_events: list[ServerSentEvent] = []
    got_all = threading.Event()

    def read_first() -> None:
        decoder = SSEDecoder()
        with httpx.stream("GET", grant["stream_url"], timeout=120) as first:
            for raw in first.iter_raw():
                first_events.extend(decoder.feed(raw))
                if sum(e.event == "chunk" for e in first_events) == DELTAS:
                    got_all.set()

    first = threading.Thread(target=read_first, daemon=True)
    first.start()
    flood: list[socket.socket] = []
    try:
        assert got_all.wait(60), "the backend's deltas never arrived"
        for _ in range(FLOOD):
            sock = _reconnect_reading_nothing(grant["stream_url"], after=0)
            flood.append(sock)
            # Its follower is sending (the frames reach the client's socket) before
            # the next reconnect comes.
            wait_until(lambda sock=sock: _waiting_bytes(sock) > 1024, "a follower sent nothing")
        first.join(timeout=30)
        # The producer's own client was superseded with a clean end, not cut.
        assert not first.is_alive()
        assert [e.event for e in first_events] == ["chunk"] * DELTAS

        # One follower serves the stream on this edge; the superseded ones are gone
        # (was: all ten, for as long as the stream ran).
        wait_until(lambda: followers() == 1, "superseded followers still run")
        # And no connection holds the frames its client did not read (was: megabytes
        # each, the whole log handed to the server in one piece).
        held = gateway.group.pending_writes(gateway.edge)
        assert max(held) <= HELD_PER_CONNECTION, held

        # The latest reconnect wins: a reading one now gets the rest, to the end.
        release.set()
        decoder = SSEDecoder()
        with httpx.stream(
            "GET", grant["stream_url"], headers={"Last-Event-ID": str(DELTAS)}, timeout=60
        ) as last:
            assert last.status_code == 200
            tail = [event for raw in last.iter_raw() for event in decoder.feed(raw)]
        assert [e.event for e in tail] == ["complete"]
        assert tail[0].id == str(DELTAS + 1)
    finally:
        release.set()
        for sock in flood:
            sock.close()
    record = c.wait_usage(token, grant["reservation_id"])
    assert (record["status"], record["output_tokens"]) == ("completed", 60)
    wait_until(lambda: followers() == 0, "a follower outlived the stream")


class CountingStore(MemoryStore):
    """The in-memory store, recording how many bytes each log read returned."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[list[bytes]] = []

    async def log_range(
        self, key: str, start: int, count: int, max_bytes: int | None = None
    ) -> list[bytes]:
        items = await super().log_range(key, start, count, max_bytes)
        self.reads.append(items)
        return items


async def test_a_follower_holds_a_bounded_number_of_bytes_whatever_the_frames() -> None:
    store = CountingStore()
    big = [f"id: {i}\nevent: chunk\ndata: {'x' * 100_000}\n\n".encode() for i in range(1, 21)]
    small = [f"id: {i}\nevent: chunk\ndata: y\n\n".encode() for i in range(21, 600)]
    frames = [*big, *small, b"id: 600\nevent: complete\ndata: {}\n\n"]
    log = ResumeLog(store, "j", 60)
    for frame in frames:
        log.append(frame)
    await log.close()
    await store.set(done_key("j"), repr(time.time()).encode(), 60)
    emitted: list[bytes] = []

    async def emit(data: bytes) -> None:
        emitted.append(data)

    await asyncio.wait_for(Follower(store, "j", 0, give_up_after=60).run(emit), timeout=10)
    assert b"".join(emitted) == b"".join(frames)
    # Was: the first read took 256 frames, 2 MB of them here (the whole 16 MiB log
    # with 1 MB deltas), held twice once joined for the client.
    for read in store.reads:
        assert len(read) == 1 or sum(map(len, read)) <= resume.READ_BYTES
    assert max(map(len, emitted)) <= resume.READ_BYTES
    assert max(len(read) for read in store.reads) == resume.READ_BATCH  # small frames
