"""A connection the edge cuts on purpose logs no ERROR; an app that really leaves a
response unfinished still does (`shared/asgi_abort.py`).

The edge stops writing to a client it will not wait on: one that reads nothing for
`slow_client_timeout` (`slow_client`), and a resume follower superseded by a
reconnect while a send to it is stuck. uvicorn, seeing the app return with the
response unfinished, logged "ASGI callable returned without completing response."
at ERROR once per cut (measured: one ERROR per cut connection, so a flood of
reconnects that read nothing is a flood of ERRORs). Served here as the CLI serves
them (`llm_gateway.servers.server_for`), with clients that read nothing (a tiny
receive buffer); the follower is superseded once the server's writes to it are
paused, so its send is known to be stuck.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable, Iterator

import pytest
import uvicorn
from starlette.types import Receive, Scope, Send

from llm_gateway.http_guard import ConnectionLimits
from stream_edge.streaming import EventStreamResponse
from tests.polling import wait_until
from tests.test_ops_slow_clients import DEADLINE, serving, stalled_connections

UNFINISHED = "ASGI callable returned without completing response."
CHUNK = b"data: " + b"x" * 65_536 + b"\n\n"


class Cuts:
    """An app of three routes: `/slow` (a stream its client does not read, cut as a
    slow client), `/follower` (a detachable stream the test supersedes) and `/broken`
    (a genuine bug: it starts a response and returns)."""

    def __init__(self) -> None:
        self.outcomes: list[str] = []
        self.follower: EventStreamResponse | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    async def _produce(self, emit: Callable[[bytes], Awaitable[None]]) -> None:
        while True:
            await emit(CHUNK)

    async def _finished(self, outcome: str) -> None:
        self.outcomes.append(outcome)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        self.loop = asyncio.get_running_loop()
        if scope["path"] == "/broken":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"half", "more_body": True})
            return
        detachable = scope["path"] == "/follower"
        response = EventStreamResponse(
            self._produce,
            self._finished,
            ping_interval=600,
            # The follower is cut by its supersession, never as a slow client.
            slow_client_timeout=600 if detachable else 0.3,
            detachable=detachable,
        )
        if detachable:
            self.follower = response
        await response(scope, receive, send)


@pytest.fixture
def served() -> Iterator[tuple[Cuts, str, uvicorn.Server]]:
    app = Cuts()
    servers: list[uvicorn.Server] = []
    with serving([ConnectionLimits(send_timeout=600)], lambda: app, servers) as [url]:
        yield app, url, servers[0]


def _reading_nothing(url: str, path: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    sock.settimeout(DEADLINE)
    sock.connect((host, int(port)))
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: edge\r\n\r\n".encode())
    return sock


def _ended(server: uvicorn.Server) -> Callable[[], bool]:
    """The request's task is over (uvicorn reports an unfinished response before)."""
    return lambda: not server.server_state.tasks


def _errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def _closed(sock: socket.socket) -> bool:
    """The server has cut the connection: what is left to read ends in EOF or a reset
    (a timeout, a connection still open after `DEADLINE`, raises and fails the test)."""
    sock.settimeout(DEADLINE)
    with contextlib.suppress(ConnectionResetError):
        while sock.recv(1 << 20):
            pass
    return True


def test_a_slow_client_cut_logs_no_error(
    served: tuple[Cuts, str, uvicorn.Server], caplog: pytest.LogCaptureFixture
) -> None:
    app, url, server = served
    caplog.set_level(logging.INFO)
    with contextlib.closing(_reading_nothing(url, "/slow")) as sock:
        wait_until(
            lambda: app.outcomes == ["slow_client"],
            "the slow client was never cut",
            within=DEADLINE,
        )
        wait_until(_ended(server), "the request never ended", within=DEADLINE)
        assert _closed(sock)
    assert _errors(caplog) == []


def test_a_superseded_follower_stuck_in_a_send_is_cut_without_an_error(
    served: tuple[Cuts, str, uvicorn.Server], caplog: pytest.LogCaptureFixture
) -> None:
    app, url, server = served
    caplog.set_level(logging.INFO)
    with contextlib.closing(_reading_nothing(url, "/follower")) as sock:
        wait_until(
            lambda: stalled_connections(server) == 1,
            "the follower's send never stuck",
            within=DEADLINE,
        )
        follower, loop = app.follower, app.loop
        assert follower is not None and loop is not None
        loop.call_soon_threadsafe(follower.detach)
        wait_until(lambda: len(app.outcomes) == 1, "the follower never stopped", within=DEADLINE)
        wait_until(_ended(server), "the request never ended", within=DEADLINE)
        assert _closed(sock)
    assert _errors(caplog) == [], app.outcomes


def test_an_app_that_leaves_a_response_unfinished_is_still_an_error(
    served: tuple[Cuts, str, uvicorn.Server], caplog: pytest.LogCaptureFixture
) -> None:
    _, url, server = served
    caplog.set_level(logging.INFO)
    with contextlib.closing(_reading_nothing(url, "/broken")) as sock:
        assert _closed(sock)
        wait_until(_ended(server), "the request never ended", within=DEADLINE)
    assert _errors(caplog) == [UNFINISHED]
