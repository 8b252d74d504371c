"""Serve one or several ASGI apps with uvicorn in the current event loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Coroutine, Generator
from typing import Any

import uvicorn

from llm_gateway.http_guard import ConnectionLimits, http_protocol
from shared.logs import RedactingFilter
from shared.settings import CommonSettings


class _Server(uvicorn.Server):
    """Signals are handled once for the whole group (see `serve_all`), not per server."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def limits_of(settings: CommonSettings) -> ConnectionLimits:
    # The edge ends a stream to a client that stopped reading itself (`slow_client`,
    # then the usage report): the server's own cut comes only after it.
    slow_client = float(getattr(settings, "slow_client_timeout", 0.0))
    return ConnectionLimits(
        header_timeout=settings.header_timeout_seconds,
        max_header_bytes=settings.max_header_bytes,
        max_connections=settings.max_connections,
        send_timeout=max(ConnectionLimits.send_timeout, slow_client + 10),
    )


def server_for(
    app: Any,
    host: str,
    port: int,
    *,
    access_log: bool = True,
    graceful_seconds: float = 30,
    limits: ConnectionLimits | None = None,
) -> uvicorn.Server:
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        # Header time, header size and connection count are bounded (http_guard).
        http=http_protocol(limits or ConnectionLimits()),
        lifespan="on",
        access_log=access_log,
        log_config=None,  # keep our logging config (and its redaction filter)
        # Longer than the edge's drain, so streams end with `shutting_down` rather
        # than being cut by the server.
        timeout_graceful_shutdown=int(graceful_seconds),
        proxy_headers=True,
    )
    return _Server(config)


async def serve_all(servers: list[uvicorn.Server]) -> None:
    """Run servers together; SIGINT/SIGTERM asks all of them to stop gracefully."""
    loop = asyncio.get_running_loop()

    hooks: list[asyncio.Task[None]] = []

    def stop() -> None:
        if hooks or any(server.should_exit for server in servers):
            return  # a second signal: uvicorn's own timeout bounds the wait
        for server in servers:
            # Apps that want to drain (the edge) expose `state.on_sigterm`.
            on_sigterm = getattr(getattr(server.config.app, "state", None), "on_sigterm", None)
            if on_sigterm is not None:
                hooks.append(asyncio.ensure_future(on_sigterm()))
            server.should_exit = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop)
    redacting = RedactingFilter()
    for name in ("uvicorn.access", "uvicorn.error"):
        logging.getLogger(name).addFilter(redacting)
    await asyncio.gather(*(server.serve() for server in servers))


def run_loop(main: Coroutine[Any, Any, None]) -> None:
    """Run `main` on uvloop when it is installed (uvicorn[standard] brings it): our
    own `asyncio.run` would otherwise bypass uvicorn's loop choice."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        asyncio.run(main)
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main)
