"""The edge's stream lifecycle under abuse, on one embedded stack (real sockets):
bodies too large to read, reconnects that would replay a stream or multiply it, and
a usage report whose outbox write fails. Each test here reproduces an attack from
the issues. Malformed `Last-Event-ID`s and unexpected exceptions while opening or
relaying run in-process, in test_edge_stream_errors.py."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from shared.sse import SSEDecoder
from shared.store import SlotRelease
from shared.store_memory import MemoryStore
from tests.stack import InProcessStack, base_env, micro

MIB = 1 << 20


class OutboxFailingStore(MemoryStore):
    """A memory store whose outbox writes can be made to fail (a store that refuses
    writes, e.g. out of memory), while every other command still works."""

    outbox_fails = False

    async def outbox_put(
        self, item_id: str, payload: bytes, due_at: float, release: SlotRelease | None = None
    ) -> None:
        if self.outbox_fails:
            raise ConnectionError("the outbox write failed")
        await super().outbox_put(item_id, payload, due_at, release)


@pytest.fixture(scope="module")
def store() -> OutboxFailingStore:
    return OutboxFailingStore()


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, store: OutboxFailingStore
) -> Iterator[InProcessStack]:
    tmp = tmp_path_factory.mktemp("lifecycle")
    env = {
        **base_env(f"sqlite:///{tmp}/gw.db"),
        "LLMGW_MAX_STREAMS_PER_USER": "2",
        "LLMGW_RESUME_GRACE_SECONDS": "2",
        "LLMGW_WEBHOOK_RETRY_BASE_SECONDS": "0.05",
        "LLMGW_WEBHOOK_RETRY_CAP_SECONDS": "0.5",
        "LLMGW_SPOOL_DIR": str(tmp / "spool"),
    }
    with InProcessStack(env, store=store) as running:
        yield running


def user(stack: InProcessStack, credits: str = "5") -> str:
    return stack.client.new_user(stack.client.new_company(credits))


# --- 11.8: bodies are read with a limit ---------------------------------------------


RESET = 0  # `post_raw`'s status when the edge's reset swallowed its answer


async def post_raw(url: str, head: list[str], body_chunks: int | None) -> tuple[int, int]:
    """POST to the edge on a raw socket. With `body_chunks`, send that many 1 MiB
    chunks (chunked encoding) while watching for an early answer; returns the status
    and how many body bytes the edge accepted from us before it answered."""
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    request = "\r\n".join([f"POST {parts.path} HTTP/1.1", f"Host: {parts.netloc}", *head])
    writer.write(request.encode() + b"\r\n\r\n")
    answer = asyncio.create_task(reader.readuntil(b"\r\n\r\n"))
    sent = 0
    chunk = b"%x\r\n" % MIB + b" " * MIB + b"\r\n"
    try:
        for _ in range(body_chunks or 0):
            if answer.done():
                break
            writer.write(chunk)
            await writer.drain()
            await asyncio.sleep(0)  # let the answer, if any, be read
            sent += MIB
        else:
            if body_chunks:
                writer.write(b"0\r\n\r\n")
        status_line = await asyncio.wait_for(answer, timeout=30)
    except ConnectionError:  # the edge closed the connection on us: read its answer
        try:
            status_line = await asyncio.wait_for(answer, timeout=30)
        except ConnectionError:
            # Closing a socket with unread input makes the kernel send a reset, which
            # may discard the 413 before we read it: the edge refused all the same.
            return RESET, sent
    finally:
        writer.close()
    return int(status_line.split(b" ", 2)[1]), sent


def test_a_huge_chunked_body_is_refused_413_without_being_read(stack: InProcessStack) -> None:
    c = stack.client
    access = user(stack)
    grant = c.init_ok(access, {"query": "big body [[mock tokens=2]]"})
    head = [
        f"Authorization: Bearer {grant['stream_token']}",
        "Content-Type: application/json",
        "Transfer-Encoding: chunked",
    ]
    status, sent = asyncio.run(post_raw(grant["completions_url"], head, body_chunks=60))
    assert status in (413, RESET)
    assert sent < 60 * MIB  # answered (and cut off) long before the body's end
    # A too-large Content-Length is refused at once, before any body byte is sent.
    too_long = [*head[:2], f"Content-Length: {60 * MIB}"]
    status, _ = asyncio.run(post_raw(grant["completions_url"], too_long, body_chunks=None))
    assert status == 413
    # Nothing changed: the token was not burned.
    ok = c.http.post(
        grant["completions_url"],
        headers={"Authorization": f"Bearer {grant['stream_token']}"},
        json={"messages": [{"role": "user", "content": "hi [[mock tokens=2]]"}]},
    )
    assert ok.status_code == 200, ok.text


async def test_the_body_reader_stops_at_the_limit() -> None:
    from starlette.requests import Request

    from stream_edge.admission import MAX_BODY, read_json
    from stream_edge.errors import EdgeError

    consumed = 0

    async def receive() -> dict[str, Any]:  # a 16 MiB body, 64 KiB at a time
        nonlocal consumed
        consumed += 64 * 1024
        more = consumed < 16 * MIB
        return {"type": "http.request", "body": b" " * 64 * 1024, "more_body": more}

    scope = {"type": "http", "method": "POST", "path": "/", "headers": [], "query_string": b""}
    with pytest.raises(EdgeError) as refused:
        await read_json(Request(scope, receive))
    assert refused.value.status == 413
    assert consumed <= MAX_BODY + 64 * 1024


# --- 11.9: reconnects neither replay nor multiply a stream ---------------------------


def test_a_finished_stream_is_not_replayed_to_whoever_has_the_url(stack: InProcessStack) -> None:
    c = stack.client
    grant = c.init_ok(user(stack), {"query": "secret answer [[mock tokens=5]]"})
    first = c.http.get(grant["stream_url"])
    assert first.status_code == 200 and b"event: complete" in first.content
    replay = c.http.get(grant["stream_url"])  # no Last-Event-ID: a second use
    assert replay.status_code == 401
    assert replay.json()["error"]["code"] == "token_used"
    # Within the resume grace a reconnect after the end gets 204 (nothing left)...
    assert c.http.get(grant["stream_url"], headers={"Last-Event-ID": "6"}).status_code == 204
    # ...and once the grace after the end is over, the stream's events are gone for
    # good, whatever Last-Event-ID says.
    deadline = time.monotonic() + 20
    while True:
        late = c.http.get(grant["stream_url"], headers={"Last-Event-ID": "0"})
        if late.status_code in (204, 401):
            break
        assert late.status_code == 200
        assert time.monotonic() < deadline, "the stream is still replayable long after its end"
        time.sleep(0.2)
    assert b"secret" not in late.content


def test_a_head_request_neither_runs_nor_uses_a_stream(stack: InProcessStack) -> None:
    """HEAD is safe (RFC 9110 §9.3.2): a link checker or preview bot may send one for
    any URL it sees. Starlette answers HEAD on every GET route, so a HEAD of the
    stream URL used to claim the token, run the whole upstream call and bill it
    (a 200 with no body: 64 output tokens charged, nothing delivered), and the
    client's own GET then got 401 token_used."""
    c = stack.client
    grant = c.init_ok(user(stack), {"query": "hello [[mock tokens=5]]"})
    before = c.mock_stats()
    head = c.http.head(grant["stream_url"])
    assert head.status_code == 405
    assert head.headers["allow"] == "GET"
    stream = c.http.get(grant["stream_url"])
    assert stream.status_code == 200 and b"event: complete" in stream.content
    # Exactly the GET's one upstream call: the HEAD ran none.
    assert c.mock_stats()["requests"] == before["requests"] + 1


def test_one_live_connection_per_stream_a_reconnect_supersedes(stack: InProcessStack) -> None:
    c = stack.client
    grant = c.init_ok(user(stack), {"query": "long [[mock tokens=600 delay_ms=25]]"})
    connected: set[int] = set()
    still_open: set[int] = set()
    completed: list[int] = []
    lock = threading.Lock()
    stop = threading.Event()

    def connect(index: int) -> None:
        headers = {} if index == 0 else {"Last-Event-ID": "1"}
        with httpx.Client(timeout=30) as http:
            with http.stream("GET", grant["stream_url"], headers=headers) as response:
                assert response.status_code == 200
                with lock:
                    connected.add(index)
                    still_open.add(index)
                decoder = SSEDecoder()
                for raw in response.iter_raw():
                    if any(e.event == "complete" for e in decoder.feed(raw)):
                        completed.append(index)
                    if stop.is_set():
                        break
        with lock:
            still_open.discard(index)

    threads = [threading.Thread(target=connect, args=(0,))]
    threads[0].start()
    while 0 not in connected:
        time.sleep(0.01)
    # 15 reconnects at once, as many tabs or people sharing the URL would.
    threads += [threading.Thread(target=connect, args=(i,)) for i in range(1, 16)]
    for thread in threads[1:]:
        thread.start()
    try:
        deadline = time.monotonic() + 10
        while True:
            with lock:
                live = set(still_open) if len(connected) == 16 else None
            if live is not None and len(live) == 1:
                break
            assert time.monotonic() < deadline, f"{live} are live connections to one stream"
            time.sleep(0.05)
        assert live != {0}  # the original was superseded too
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
    assert completed == []  # the superseded ones were cut off, not finished


# --- 11.12 / 11.10: a failed outbox write loses neither slots nor usage ---------------


def test_slots_and_usage_survive_an_outbox_write_that_fails(
    stack: InProcessStack, store: OutboxFailingStore
) -> None:
    c = stack.client
    access = user(stack)
    before = micro(c.credits(access)["balance"])
    grants = [c.init_ok(access, {"query": f"q{i} [[mock tokens=3]]"}) for i in range(3)]
    store.outbox_fails = True
    try:
        for grant in grants:  # three in a row for a user with 2 slots
            # A stream's slots go back just after its end (the report is written once
            # the response is done): a 429 may show for a moment, never for long.
            deadline = time.monotonic() + 10
            while (response := c.http.get(grant["stream_url"])).status_code == 429:
                assert time.monotonic() < deadline, "the slots of finished streams leaked"
                time.sleep(0.05)
            assert response.status_code == 200, response.text
            assert b"event: complete" in response.content
        # Delivered even though the outbox never took the reports.
        records = [c.wait_usage(access, g["reservation_id"]) for g in grants]
    finally:
        store.outbox_fails = False
    assert all(r["status"] == "completed" for r in records)
    charged = sum(micro(r["cost"]) for r in records)
    assert charged > 0
    # The spooled reports reach the outbox once it works again; redelivered, they
    # charge nothing more.
    spool = Path(stack.edge_settings.spool_dir)
    deadline = time.monotonic() + 15
    while any(p.is_file() for p in spool.rglob("*")):
        assert time.monotonic() < deadline, "the spool was not drained"
        time.sleep(0.1)
    edge_state = stack.edge.state.edge
    while edge_state.outbox._in_flight or store._outbox:
        assert time.monotonic() < deadline, "the drained reports were not delivered"
        time.sleep(0.05)
    after = c.credits(access)
    assert before - micro(after["balance"]) == charged
    assert Decimal(after["held"]) == 0


# --- the pure rules behind them -----------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [(None, None), ("", None), ("0", 0), ("41", 41), ("000000007", 7)],
)
def test_last_event_id_accepted(raw: str | None, expected: int | None) -> None:
    from stream_edge.resume import parse_last_event_id

    assert parse_last_event_id(raw) == expected


@pytest.mark.parametrize("raw", ["²", "٣", "1e3", "-1", " 1", "1" * 10, "abc"])
def test_last_event_id_refused(raw: str) -> None:
    from stream_edge.resume import parse_last_event_id

    with pytest.raises(ValueError):
        parse_last_event_id(raw)


def test_resume_grace_and_supersede_rules() -> None:
    from stream_edge.resume import within_grace
    from stream_edge.revocation_watch import superseded

    assert within_grace(b"100.0", now=105.0, grace=10)
    assert not within_grace(b"100.0", now=110.5, grace=10)
    assert not within_grace(b"1", now=110.5, grace=10)  # a marker from before the rule
    assert not within_grace(b"garbage", now=100.0, grace=10)
    assert superseded(None, b"a")  # the first connection yields to any reconnect
    assert not superseded(None, None)
    assert superseded(b"a", b"b") and not superseded(b"b", b"b")
