"""Slow and huge headers, bodies that never arrive, and too many connections (12.2,
review 4), against the real apps on a real uvicorn socket built by
`llm_gateway.servers.server_for`, as the CLI runs it: a slowloris client is cut off, a
huge header block refused and a missing body timed out while /healthz on other
connections keeps answering. Polls with deadlines; asserts no durations."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import uvicorn
from cryptography.fernet import Fernet

from control_plane.app import create_app as control_plane_app
from control_plane.migrate import upgrade
from control_plane.settings import ControlPlaneSettings
from llm_gateway.http_guard import (
    MAX_BODY_BYTES,
    MAX_HEADER_FIELDS,
    MIN_BODY_RATE,
    MIN_CONNECTIONS,
    ConnectionLimits,
    body_deadline,
    connection_cap,
)
from llm_gateway.servers import server_for
from shared.store_memory import MemoryStore
from stream_edge.app import create_app as edge_app
from stream_edge.settings import EdgeSettings
from tests.conftest import new_webhook_secret
from tests.harness import bind_free_socket, url_of
from tests.polling import wait_until
from tests.stack import base_env

DEADLINE = 20.0  # seconds; generous on a loaded machine, never reached when it works
CAPPED = 8


def edge() -> Any:
    settings = EdgeSettings.from_env(
        {
            "LLMGW_WEBHOOK_SECRET": new_webhook_secret(),
            "LLMGW_ENCRYPTION_KEY": Fernet.generate_key().decode(),
        }
    )
    return edge_app(settings)


def key_edge() -> Any:
    """An edge that takes gateway API keys (`sk_…`): it reads their body first."""
    settings = EdgeSettings.from_env(
        {
            "LLMGW_WEBHOOK_SECRET": new_webhook_secret(),
            "LLMGW_ENCRYPTION_KEY": Fernet.generate_key().decode(),
            "LLMGW_EDGE_SERVICE_SECRET": new_webhook_secret(),
        }
    )
    return edge_app(settings)


@contextlib.contextmanager
def serving(
    limits: list[ConnectionLimits],
    app: Callable[[], Any] = edge,
    servers: list[uvicorn.Server] | None = None,
) -> Iterator[list[str]]:
    """One app per `limits`, on ephemeral ports, in a background event loop (the
    servers go into `servers` when given, for a test to watch their requests)."""
    socks = [bind_free_socket() for _ in limits]
    servers = [] if servers is None else servers
    servers.extend(
        server_for(app(), "127.0.0.1", 0, access_log=False, graceful_seconds=1, limits=lim)
        for lim in limits
    )

    async def serve() -> None:
        await asyncio.gather(*(s.serve(sockets=[k]) for s, k in zip(servers, socks, strict=True)))

    thread = threading.Thread(target=asyncio.run, args=(serve(),), daemon=True)
    thread.start()
    deadline = time.monotonic() + DEADLINE
    while not all(s.started for s in servers):
        assert time.monotonic() < deadline and thread.is_alive(), "servers did not start"
        time.sleep(0.02)
    try:
        yield [url_of(k) for k in socks]
    finally:
        for server in servers:
            server.should_exit = True
        thread.join(timeout=DEADLINE)
        for sock in socks:
            sock.close()


@pytest.fixture(scope="module")
def urls() -> Iterator[list[str]]:
    limits = [
        ConnectionLimits(header_timeout=1.0, max_header_bytes=16 * 1024, max_connections=1000),
        # Long header timeout: only the connection cap can close these.
        ConnectionLimits(header_timeout=120.0, max_connections=CAPPED),
    ]
    with serving(limits) as started:
        yield started


def raw(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=DEADLINE)


def closed_by_server(sock: socket.socket, wait: float) -> bool:
    """True when the server has closed (EOF or reset) within `wait` seconds."""
    readable, _, _ = select.select([sock], [], [], wait)
    # Readable: EOF, a reset, or an error answer; half a request gets nothing else.
    return bool(readable)


def healthy(url: str) -> None:
    response = httpx.get(f"{url}/healthz", timeout=DEADLINE)
    assert response.status_code == 200 and response.json() == {"status": "ok"}


def test_a_slowloris_client_is_cut_off_while_others_are_served(urls: list[str]) -> None:
    url = urls[0]
    slow = raw(url)
    slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: edge\r\n")
    deadline = time.monotonic() + DEADLINE
    served = 0
    try:
        while True:
            assert time.monotonic() < deadline, "the slow client was never cut off"
            healthy(url)  # a normal client on another connection, meanwhile
            served += 1
            try:
                slow.sendall(b"X")  # one byte of an endless header line
            except OSError:
                break
            if closed_by_server(slow, 0.2):
                break
    finally:
        slow.close()
    healthy(url)
    assert served >= 1


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


def test_a_huge_header_block_is_refused_without_growing_the_server(urls: list[str]) -> None:
    url = urls[0]
    huge = raw(url)
    huge.sendall(b"GET /healthz HTTP/1.1\r\nHost: edge\r\n")
    line = b"X-Pad: " + b"a" * 1017 + b"\r\n"  # 1 KiB header lines, as in the report
    chunk = line * 64
    budget = 64 * 1024 * 1024  # far past any socket buffer: only a close stops us
    before = rss_bytes()
    sent = 0
    try:
        while sent < budget:
            try:
                huge.sendall(chunk)
            except OSError:  # reset: the server closed with our bytes unread
                break
            sent += len(chunk)
            if closed_by_server(huge, 0):
                break
        assert sent < budget, "the server read 64 MiB of headers"
        # The server answered 431 and closed, or reset the connection; nothing else.
        assert closed_by_server(huge, DEADLINE), "the server stopped reading but kept it open"
        try:
            answer = huge.recv(65536)
        except OSError:
            answer = b""
        assert answer == b"" or answer.startswith(b"HTTP/1.1 431 "), answer[:80]
    finally:
        huge.close()
    # The server (this process) kept at most a read or two of it.
    assert rss_bytes() - before < 16 * 1024 * 1024
    healthy(url)


def test_a_header_block_of_many_tiny_fields_is_refused() -> None:
    """64 KiB of 4-byte fields (`a:`), the header block left open: uvicorn keeps each
    field as it arrives, two bytes objects in a tuple, about 30 times its size (measured
    before: 1.9 MiB held per connection, 1.9 GB at the default 1000 connections, for
    the header timeout). Past `MAX_HEADER_FIELDS` the request is 431 and closed."""
    tiny = b"a:\r\n" * ((64 * 1024 - 100) // 4)
    with serving([ConnectionLimits(header_timeout=120.0)]) as (url,):
        held = [raw(url) for _ in range(4)]
        try:
            for sock in held:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: edge\r\n" + tiny)
            for sock in held:
                assert closed_by_server(sock, DEADLINE), "many tiny fields held open"
                assert sock.recv(65536).startswith(b"HTTP/1.1 431 ")
        finally:
            for sock in held:
                sock.close()
        # A header block at the limit is served as before; one field more is not.
        assert answer_to_fields(url, MAX_HEADER_FIELDS).startswith(b"HTTP/1.1 200 ")
        assert answer_to_fields(url, MAX_HEADER_FIELDS + 1).startswith(b"HTTP/1.1 431 ")
        healthy(url)
    # Trailer fields, after a chunked body the edge waits for (an API key's, read
    # first): uvicorn keeps them too, with no byte cap (measured before: 16 MiB of
    # them grew the server by 482 MiB).
    with serving([ConnectionLimits(header_timeout=120.0)], key_edge) as (url,), raw(url) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: edge\r\n"
            b"Authorization: Bearer sk_0123456789abcdef\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n1\r\n{\r\n0\r\n" + tiny
        )
        assert ended_by_server(sock), "many tiny trailer fields held open"


def test_an_endless_trailer_value_is_refused() -> None:
    """A chunked body the edge waits for (an API key's, read first), then a trailer
    field whose value never ends: httptools gathers the value until its line ends,
    and uvicorn counted no bytes past the header block. Past `max_header_bytes` of
    trailers the connection is closed."""
    budget = 16 * 1024 * 1024
    with serving([ConnectionLimits(header_timeout=120.0)], key_edge) as (url,), raw(url) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: edge\r\n"
            b"Authorization: Bearer sk_0123456789abcdef\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n1\r\n{\r\n0\r\nX-T: "
        )
        sent, before = 0, rss_bytes()
        with contextlib.suppress(OSError):  # reset: the server closed with our bytes unread
            while sent < budget and not closed_by_server(sock, 0):
                sock.sendall(b"v" * 65536)
                sent += 65536
        assert ended_by_server(sock), "an endless trailer value read on"
        assert sent < budget, "the server read 16 MiB of one trailer value"
        assert rss_bytes() - before < 16 * 1024 * 1024
        # A body in many chunks, with a trailer, is read as before (its answer: the
        # key is unknown to a control plane this edge cannot reach).
        chunks = b"".join(b"400\r\n" + b" " * 1024 + b"\r\n" for _ in range(300))
        with raw(url) as ok:
            ok.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: edge\r\n"
                b"Authorization: Bearer sk_0123456789abcdef\r\nConnection: close\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n1\r\n{\r\n"
                + chunks
                + b"1\r\n}\r\n0\r\nX-T: v\r\n\r\n"
            )
            assert closed_by_server(ok, DEADLINE)
            answer = ok.recv(65536)
        assert answer.startswith(b"HTTP/1.1 ") and not answer.startswith(b"HTTP/1.1 431"), answer


def ended_by_server(sock: socket.socket) -> bool:
    """Whether the server closes the connection within `DEADLINE` (what it answered
    before, read and dropped)."""
    deadline = time.monotonic() + DEADLINE
    while closed_by_server(sock, max(0.0, deadline - time.monotonic())):
        try:
            if not sock.recv(65536):
                return True
        except OSError:
            return True
    return False


def answer_to_fields(url: str, count: int) -> bytes:
    """The answer to a GET of /healthz whose header block has `count` fields."""
    fields = b"".join(b"X-F%d: v\r\n" % i for i in range(count - 2))
    head = b"GET /healthz HTTP/1.1\r\nHost: edge\r\n" + fields + b"Connection: close\r\n\r\n"
    with raw(url) as sock:
        sock.sendall(head)
        assert closed_by_server(sock, DEADLINE)
        return sock.recv(65536)


def test_at_the_connection_cap_idle_connections_make_room(urls: list[str]) -> None:
    url = urls[1]
    holders = [raw(url) for _ in range(CAPPED)]
    try:
        for sock in holders:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: edge\r\nX-Slow: ")
        # Every slot is held by a half-sent request; real clients still get in...
        for _ in range(3):
            healthy(url)
        # ...because half-sent requests were closed to make room for them.
        closed, _, _ = select.select(holders, [], [], DEADLINE)
        assert closed
    finally:
        for sock in holders:
            sock.close()


@pytest.mark.parametrize(
    ("wanted", "fd_limit", "cap"),
    [
        (1000, 20000, 1000),  # plenty of descriptors
        (1000, 1024, (1024 - 64) // 2),  # two per connection (client + upstream) + reserve
        (1000, 80, MIN_CONNECTIONS),
        (8, 20000, 8),
        (50, -1, 50),  # unlimited
    ],
)
def test_the_connection_cap_fits_the_descriptor_limit(wanted: int, fd_limit: int, cap: int) -> None:
    assert connection_cap(wanted, fd_limit) == cap


def test_servers_carry_the_limits() -> None:
    server: uvicorn.Server = server_for(
        edge(), "127.0.0.1", 0, limits=ConnectionLimits(header_timeout=3, max_header_bytes=2048)
    )
    limits = server.config.http.keywords["limits"]  # type: ignore[union-attr]
    assert (limits.header_timeout, limits.max_header_bytes) == (3, 2048)
    settings = EdgeSettings.from_env(
        {
            "LLMGW_WEBHOOK_SECRET": new_webhook_secret(),
            "LLMGW_HEADER_TIMEOUT_SECONDS": "2.5",
            "LLMGW_MAX_HEADER_BYTES": "131072",
            "LLMGW_MAX_CONNECTIONS": "300",
        }
    )
    assert (settings.header_timeout_seconds, settings.max_header_bytes) == (2.5, 131072)
    assert settings.max_connections == 300


# Bodies that never arrive (review 4) -------------------------------------------------

# The routes that read a body before anything else: a login, and an API-key caller
# on the edge (with a service secret, so the edge takes keys).
HELD_REQUESTS = {
    "control_plane": b"POST /v1/auth/login HTTP/1.1\r\nHost: cp\r\n"
    b"Content-Type: application/json\r\n",
    "edge": b"POST /v1/chat/completions HTTP/1.1\r\nHost: edge\r\nAuthorization: Bearer sk_x\r\n",
}


@dataclasses.dataclass
class BodyServers:
    service: str
    capped: str  # a small cap, a long header timeout: only the cap closes a waiting body
    short: str  # a short header timeout: the body deadline closes it
    servers: list[uvicorn.Server]

    def quiet(self) -> bool:
        """No request in progress on either server."""
        return not any(server.server_state.tasks for server in self.servers)


@pytest.fixture(scope="module", params=sorted(HELD_REQUESTS))
def body_servers(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[BodyServers]:
    """A service twice: at a small cap with a long header timeout (only the cap can
    close a waiting body there), and with a short one (the body deadline closes it)."""
    service: str = request.param
    if service == "control_plane":
        url = f"sqlite:///{tmp_path_factory.mktemp('db') / 'cp.db'}"
        upgrade(url)  # once, here: two apps migrating at once in one process collide
        settings = ControlPlaneSettings.from_env({**base_env(url), "LLMGW_AUTO_MIGRATE": "0"})

        def app() -> Any:
            return control_plane_app(settings, MemoryStore())

    else:
        app = key_edge
    limits = [
        ConnectionLimits(header_timeout=120.0, max_connections=CAPPED),
        ConnectionLimits(header_timeout=0.2),
    ]
    servers: list[uvicorn.Server] = []
    with serving(limits, app, servers) as (capped, short):
        yield BodyServers(service, capped, short, servers)


def waiting_for_its_body(url: str, service: str) -> socket.socket:
    """A connection whose request the app is reading, with 1 of 100 body bytes sent.
    `Expect: 100-continue` makes the server say when the app asks for the body, so
    the header block is known to be in (no sleep)."""
    sock = raw(url)
    try:
        sock.sendall(
            HELD_REQUESTS[service] + b"Content-Length: 100\r\nExpect: 100-continue\r\n\r\n"
        )
        assert sock.recv(64).startswith(b"HTTP/1.1 100 "), "the app never read the body"
        sock.sendall(b"{")
    except BaseException:
        sock.close()
        raise
    return sock


def final_answer(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes (a reset counts as a close)."""
    assert closed_by_server(sock, DEADLINE), "the connection was never closed"
    received = b""
    with contextlib.suppress(OSError):
        while chunk := sock.recv(65536):
            received += chunk
    return received


def test_a_body_that_never_arrives_is_cut_off_and_frees_the_cap(
    body_servers: BodyServers,
) -> None:
    service, capped, short = body_servers.service, body_servers.capped, body_servers.short
    held = [waiting_for_its_body(capped, service) for _ in range(CAPPED)]
    try:
        # Every slot waits for a body; a real client still gets in, by closing one.
        healthy(capped)
        evicted, _, _ = select.select(held, [], [], DEADLINE)
        assert evicted
        assert final_answer(evicted[0]) == b""
    finally:
        for sock in held:
            sock.close()
    # With no cap in reach, the body deadline closes it, with a 408 as nothing was sent.
    late = waiting_for_its_body(short, service)
    try:
        answer = final_answer(late)
    finally:
        late.close()
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:80]
    assert b"connection: close" in answer
    healthy(short)


def test_a_client_leaving_mid_body_logs_no_error(
    body_servers: BodyServers, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    deadline = time.monotonic() + DEADLINE
    while not body_servers.quiet():  # the previous test's requests, still ending
        assert time.monotonic() < deadline
        time.sleep(0.01)
    with contextlib.closing(waiting_for_its_body(body_servers.capped, body_servers.service)):
        pass  # gone mid-body
    while not body_servers.quiet():
        assert time.monotonic() < deadline, "the request never ended"
        time.sleep(0.01)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, errors
    healthy(body_servers.capped)


@pytest.mark.parametrize(
    ("length", "seconds"),
    [
        (b"100", 10 + 100 / MIN_BODY_RATE),
        # 2 MiB at 16 KiB/s (128 kbit/s): a slow mobile uplink still gets it in.
        (b"2097152", 10 + 128),
        (None, 10 + MAX_BODY_BYTES / MIN_BODY_RATE),  # chunked: as the largest body
        (b"999999999", 10 + MAX_BODY_BYTES / MIN_BODY_RATE),  # refused by the app anyway
        (b"1e9", 10 + MAX_BODY_BYTES / MIN_BODY_RATE),
    ],
)
def test_a_body_deadline_fits_a_slow_link(length: bytes | None, seconds: float) -> None:
    assert body_deadline(10, length) == pytest.approx(seconds)


# Clients that read nothing (review 5) -----------------------------------------------

# 50 pipelined requests for the console's 200 KiB chart library: ~10 MiB, far past
# what the kernel's buffers take for a client that reads nothing.
STALLING_REQUESTS = b"GET /console/vendor/chart.umd.min.js HTTP/1.1\r\nHost: cp\r\n\r\n" * 50


@pytest.fixture(scope="module")
def console_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BodyServers]:
    """The control plane twice: at a small cap with long timeouts (only the cap can
    close a stalled connection there), and with a short send timeout."""
    url = f"sqlite:///{tmp_path_factory.mktemp('db') / 'cp.db'}"
    upgrade(url)
    settings = ControlPlaneSettings.from_env({**base_env(url), "LLMGW_AUTO_MIGRATE": "0"})
    limits = [
        ConnectionLimits(
            header_timeout=120.0, max_connections=CAPPED, send_timeout=120.0, stall_grace=0.2
        ),
        ConnectionLimits(header_timeout=120.0, send_timeout=0.5),
    ]
    servers: list[uvicorn.Server] = []
    with serving(limits, lambda: control_plane_app(settings, MemoryStore()), servers) as urls:
        capped, short = urls
        yield BodyServers("control_plane", capped, short, servers)


def reading_nothing(url: str) -> socket.socket:
    """A connection asking for megabytes it never reads (a tiny receive buffer)."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    sock.settimeout(DEADLINE)
    sock.connect((host, int(port)))
    sock.sendall(STALLING_REQUESTS[:4096])  # the server reads one request at a time
    return sock


def stalled_connections(server: uvicorn.Server, for_seconds: float = 0.0) -> int:
    """Connections whose writes have waited `for_seconds` for a client that does not
    read (the servers' loop is asyncio's: its clock is `time.monotonic`)."""
    since = [getattr(c, "write_paused_since", None) for c in server.server_state.connections]
    now = time.monotonic()
    return sum(s is not None and now - s >= for_seconds for s in since)


def test_clients_that_read_nothing_cannot_hold_the_connection_cap(
    console_servers: BodyServers,
) -> None:
    capped_server = console_servers.servers[0]
    held = [reading_nothing(console_servers.capped) for _ in range(CAPPED)]
    try:
        # Every slot holds a response its client does not take; before the fix a
        # real client was refused for as long as they liked (minutes, measured).
        grace = capped_server.config.http.keywords["limits"].stall_grace  # type: ignore[union-attr]
        wait_until(
            lambda: stalled_connections(capped_server, grace) == CAPPED,
            "never stalled",
            within=DEADLINE,
        )
        healthy(console_servers.capped)
    finally:
        for sock in held:
            sock.close()


def test_a_client_that_reads_nothing_is_cut_off_after_the_send_timeout(
    console_servers: BodyServers,
) -> None:
    short_server = console_servers.servers[1]
    with contextlib.closing(reading_nothing(console_servers.short)):
        wait_until(lambda: stalled_connections(short_server) == 1, "never stalled", within=DEADLINE)
        wait_until(
            lambda: not short_server.server_state.connections, "never cut off", within=DEADLINE
        )
    healthy(console_servers.short)
