"""Run real uvicorn servers on ephemeral ports in a background thread.

Sockets are bound before the apps are built, so each app can be given the others'
URLs. The servers share one event loop in one thread (as `llm-gateway dev` does);
tests talk to them over real HTTP with sync or async clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import threading
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any

import uvicorn


def bind_free_socket() -> socket.socket:
    # IPPROTO_TCP explicitly: asyncio only sets TCP_NODELAY on sockets it knows are TCP,
    # and without it every small response waits ~40 ms for Nagle + delayed ACK.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def free_port() -> int:
    """A port nothing listens on, for a server bound later (a subprocess, a service
    restarted on its address). Taken below the kernel's ephemeral range: a port from
    `bind(0)` has to be closed before the server binds it, and in between any
    outgoing connection on the machine may take it as its source port ("Address
    already in use", seen once in a full run)."""
    low = _ephemeral_low()
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randrange(10_000, low) if low > 11_000 else rng.randrange(1024, 65536)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port below the ephemeral range")


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{host}:{port}"


class ServerGroup:
    """Serve several ASGI apps, each on its own pre-bound socket, in one thread."""

    def __init__(
        self, apps: list[tuple[Any, socket.socket]], *, startup_timeout: float = 30
    ) -> None:
        self._apps = apps
        self._timeout = startup_timeout
        self._servers: list[uvicorn.Server] = []
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    def _run(self) -> None:
        self.loop = asyncio.new_event_loop()
        try:
            self.loop.run_until_complete(self._serve())
        except BaseException as exc:  # surfaced to the test thread in start()
            self._error = exc
        finally:
            self.loop.close()

    async def _serve(self) -> None:
        for app, _ in self._apps:
            config = uvicorn.Config(
                app,
                lifespan="on",
                log_level="warning",
                access_log=False,
                timeout_graceful_shutdown=2,
            )
            self._servers.append(uvicorn.Server(config))
        await asyncio.gather(
            *(
                server.serve(sockets=[sock])
                for server, (_, sock) in zip(self._servers, self._apps, strict=True)
            )
        )

    def start(self) -> ServerGroup:
        self._thread = threading.Thread(target=self._run, name="test-servers", daemon=True)
        self._thread.start()
        deadline = self._timeout
        step = 0.02
        waited = 0.0
        while waited < deadline:
            if self._error is not None or not self._thread.is_alive():
                raise RuntimeError(f"servers failed to start: {self._error!r}")
            if len(self._servers) == len(self._apps) and all(s.started for s in self._servers):
                return self
            threading.Event().wait(step)
            waited += step
        raise RuntimeError("servers did not start in time")

    def call(self, fn: Callable[[], Any], timeout: float = 30) -> Any:
        """Run a coroutine function on the servers' loop (e.g. to read an app's state)."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(fn(), self.loop).result(timeout)

    def pending_writes(self, app: Any) -> list[int]:
        """Bytes each open connection to `app` has yet to send its client: the
        transports' write buffers, where what a client does not read is held."""
        server = self._servers[[a for a, _ in self._apps].index(app)]

        async def sizes() -> list[int]:
            return [
                p.transport.get_write_buffer_size()
                for p in list(server.server_state.connections)
                if getattr(p, "transport", None) is not None
            ]

        return list(self.call(sizes))

    def stop(self) -> None:
        for server in self._servers:
            server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=15)
        for _, sock in self._apps:
            sock.close()

    def __enter__(self) -> ServerGroup:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


@contextlib.contextmanager
def served_on_a_socket(app: Any) -> Iterator[str]:
    """`app` alone on a free socket, in its own thread: its base URL."""
    sock = bind_free_socket()
    with ServerGroup([(app, sock)]):
        yield url_of(sock)
