"""EventStreamResponse when a write finds the client gone before the disconnect is
heard (an ASGI server may raise on `send` first): a resumable stream still lingers
for its reconnect; any other stream stops at once. Driven by events, no sockets."""

from __future__ import annotations

import asyncio
from typing import Any

from stream_edge.streaming import Emit, EventStreamResponse


class GoneClient:
    """An ASGI peer whose body writes fail (it left) until the test lets the server
    hear `http.disconnect`."""

    def __init__(self) -> None:
        self.disconnect = asyncio.Event()

    async def receive(self) -> dict[str, Any]:
        await self.disconnect.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body":
            raise OSError("the client disconnected")


async def run(resumable: bool) -> tuple[list[str], list[str]]:
    client = GoneClient()
    release = asyncio.Event()
    lingered = asyncio.Event()
    steps: list[str] = []
    outcomes: list[str] = []

    async def produce(emit: Emit) -> None:
        await emit(b"data: 1\n\n")  # fails: the client is gone
        steps.append("went on")
        await release.wait()  # e.g. the rest of the answer, for a reconnect
        steps.append("finished")

    async def linger() -> None:
        lingered.set()
        await release.wait()

    async def on_finish(outcome: str) -> None:
        outcomes.append(outcome)

    response = EventStreamResponse(
        produce, on_finish, ping_interval=60, linger=linger if resumable else None
    )
    task = asyncio.create_task(response({"type": "http"}, client.receive, client.send))
    async with asyncio.timeout(10):  # a bound on a broken test, not a timing check
        if resumable:
            while "went on" not in steps:
                await asyncio.sleep(0)
            client.disconnect.set()
            await lingered.wait()
            release.set()
        await task
    return steps, outcomes


async def test_a_failed_write_lets_a_resumable_stream_go_on_for_its_reconnect() -> None:
    steps, outcomes = await run(resumable=True)
    assert steps == ["went on", "finished"]
    assert outcomes == ["client_gone"]


async def test_a_failed_write_stops_a_stream_nobody_can_resume() -> None:
    steps, outcomes = await run(resumable=False)
    assert "finished" not in steps
    assert outcomes == ["client_gone"]


# --- a reconnect flood: what a superseded or stuck response holds -------------------


class SilentPeer:
    """An ASGI peer that never sends (no disconnect, no body) and keeps the response's
    bodies written to it; `ended` once its last body is."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.ended = False
        self.never = asyncio.Event()

    async def receive(self) -> dict[str, Any]:
        await self.never.wait()
        return {"type": "http.disconnect"}

    def _written(self, message: dict[str, Any]) -> None:
        if message.get("more_body", False):
            self.bodies.append(message["body"])
        else:
            self.ended = True


class StuckClient(SilentPeer):
    """An ASGI peer that takes `takes` body writes, then reads nothing more: the next
    write waits for ever (the server's buffer toward it is full)."""

    def __init__(self, takes: int) -> None:
        super().__init__()
        self.takes = takes
        self.stuck = asyncio.Event()

    async def send(self, message: dict[str, Any]) -> None:
        if message["type"] != "http.response.body":
            return
        if len(self.bodies) >= self.takes:
            self.stuck.set()
            await self.never.wait()
        self._written(message)


def follower_like(client: StuckClient, frames: list[bytes]) -> tuple[EventStreamResponse, Any]:
    """A non-lingering, detachable response (as a resume follower's) emitting
    `frames`, then waiting for more that never come."""
    more = asyncio.Event()

    async def produce(emit: Emit) -> None:
        for frame in frames:
            await emit(frame)
        await more.wait()

    async def on_finish(outcome: str) -> None:
        return None

    response = EventStreamResponse(
        produce, on_finish, ping_interval=60, slow_client_timeout=600, detachable=True
    )
    task = asyncio.create_task(response({"type": "http"}, client.receive, client.send))
    return response, task


async def test_a_large_body_goes_out_in_slices_so_a_stuck_client_holds_one() -> None:
    from stream_edge.streaming import SEND_SLICE

    client = StuckClient(takes=2)
    frame = b"data: " + b"x" * (5 * SEND_SLICE) + b"\n\n"
    response, task = follower_like(client, [frame])
    async with asyncio.timeout(10):  # a bound on a broken test, not a timing check
        await client.stuck.wait()
        assert [len(b) for b in client.bodies] == [SEND_SLICE, SEND_SLICE]
        # Superseded while a send is stuck: cut at once, never waited on, and no
        # other event glued to half a frame.
        response.detach()
        await task
    assert not client.ended
    assert b"".join(client.bodies) == frame[: 2 * SEND_SLICE]


async def test_a_superseded_follower_stops_at_once_and_its_reading_client_sees_a_clean_end() -> (
    None
):
    client = StuckClient(takes=100)
    response, task = follower_like(client, [b"id: 1\ndata: a\n\n"])
    async with asyncio.timeout(10):
        while not client.bodies:
            await asyncio.sleep(0)
        response.detach()
        await task  # the producer was cancelled: it waited for more frames for ever
    assert client.ended and client.bodies == [b"id: 1\ndata: a\n\n"]


async def test_an_abort_after_half_a_frame_writes_no_event_into_it() -> None:
    from stream_edge.streaming import SEND_SLICE

    client = StuckClient(takes=1)
    response, task = follower_like(client, [b"data: " + b"x" * (2 * SEND_SLICE) + b"\n\n"])
    async with asyncio.timeout(10):
        await client.stuck.wait()
        client.takes = 100  # the client would read again: only the frame is cut off
        response.abort(lambda: b"id: 2\nevent: error\ndata: {}\n\n", outcome="revoked")
        await task
    assert b"event: error" not in b"".join(client.bodies)
    assert client.ended


def test_live_connections_keep_the_latest_reconnect() -> None:
    from stream_edge.live_connections import LiveConnections

    class Conn:
        def __init__(self) -> None:
            self.superseded = False

        def supersede(self) -> None:
            self.superseded = True

    live = LiveConnections()
    producer, a, b = Conn(), Conn(), Conn()
    assert live.attach("live:j", None, producer)  # the first connection needs no claim
    live.claim("live:j", b"a")
    assert producer.superseded  # at once, not at the watcher's next pass
    live.claim("live:j", b"b")  # before a's response started
    assert not live.attach("live:j", b"a", a)  # a lost meanwhile: its caller ends it
    assert live.attach("live:j", b"b", b) and live.serving("live:j") is b
    live.release("live:j", a)  # not the serving one: nothing changes
    assert live.serving("live:j") is b
    live.claim("live:j", b"c")
    assert b.superseded
    live.forget("live:j", b"c")  # c's request failed before its response
    assert live.serving("live:j") is None
    assert not live.attach("live:j", b"c", Conn())
    live.release("live:j", b)
    assert live.attach("live:j", None, Conn())


# --- sends in flight: a ping, a sliced frame and a reconnect's clean end ------------


class PausedClient(SilentPeer):
    """An ASGI peer that reads nothing until the test lets sends through, as uvicorn
    holds each `send` while the client's buffer is full: they wait in order, each is
    written when let through, and a body after the response's end raises as uvicorn's
    "Unexpected ASGI message … after response already completed" does."""

    def __init__(self) -> None:
        super().__init__()
        self.paused = True
        self.waiting: list[tuple[bytes, asyncio.Future[None]]] = []
        self.blocked = asyncio.Event()

    async def send(self, message: dict[str, Any]) -> None:
        if message["type"] != "http.response.body":
            return
        if self.paused:
            gate = asyncio.get_running_loop().create_future()
            self.waiting.append((message["body"], gate))
            self.blocked.set()
            await gate
        if self.ended:
            raise RuntimeError("Unexpected ASGI message sent, after response already completed.")
        self._written(message)

    def let_one_through(self) -> bytes:
        body, gate = self.waiting.pop(0)
        gate.set_result(None)
        return body

    def read_all(self) -> None:
        self.paused = False
        for _, gate in self.waiting:
            gate.set_result(None)
        self.waiting.clear()


async def test_a_ping_ending_mid_frame_lets_no_reconnect_end_the_response_between_slices() -> None:
    """The review's race: a `: ping` stuck on a client that reads nothing, the
    producer's large frame queued behind it in slices; the ping goes out, then a
    reconnect supersedes this connection. The ping's end once cleared the one
    "send in progress" mark while the frame was half sent, so the clean end went out
    between two slices and the next slice raised (uvicorn: after the response ended)."""
    from stream_edge.streaming import PING, SEND_SLICE

    client = PausedClient()
    frame = b"id: 1\nevent: chunk\ndata: " + b"x" * (2 * SEND_SLICE) + b"\n\n"
    go, emitting = asyncio.Event(), asyncio.Event()

    async def produce(emit: Emit) -> None:
        await go.wait()
        emitting.set()  # the producer runs on to its send (or its turn) before the test
        await emit(frame)

    async def linger() -> None:  # the producer of a resumable stream goes on
        await client.never.wait()

    async def on_finish(outcome: str) -> None:
        return None

    response = EventStreamResponse(
        produce,
        on_finish,
        ping_interval=0.001,  # the first ping goes out at once; nothing waits on time
        slow_client_timeout=600,
        linger=linger,
        detachable=True,
    )
    task = asyncio.create_task(response({"type": "http"}, client.receive, client.send))
    async with asyncio.timeout(10):  # a bound on a broken test, not a timing check
        await client.blocked.wait()
        assert [body for body, _ in client.waiting] == [PING]
        go.set()
        await emitting.wait()
        assert client.let_one_through() == PING
        response.detach()  # a reconnect took the stream meanwhile
        client.read_all()
        await task  # raised RuntimeError: a slice went out after the response's end
    sent = b"".join(client.bodies)
    assert client.ended
    assert frame in sent and sent.replace(PING, b"") == frame  # whole, pings around it


async def test_a_ping_stuck_on_a_client_that_reads_nothing_ends_it_as_a_slow_client() -> None:
    """The watchdog once waited on its own stuck ping for ever: nothing was left to
    notice the client read nothing, and the stream (and a reconnect's clean end of it)
    waited with it."""
    client = PausedClient()
    outcomes: list[str] = []

    async def produce(emit: Emit) -> None:
        await client.never.wait()  # a backend that is slow to start

    async def on_finish(outcome: str) -> None:
        outcomes.append(outcome)

    response = EventStreamResponse(
        produce, on_finish, ping_interval=0.001, slow_client_timeout=0.05
    )
    task = asyncio.create_task(response({"type": "http"}, client.receive, client.send))
    async with asyncio.timeout(10):  # a bound on a broken test, not a timing check
        await task
    assert outcomes == ["slow_client"]
    assert not client.ended
