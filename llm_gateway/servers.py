"""Serve one or several ASGI apps with uvicorn in the current event loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Generator
from typing import Any

import uvicorn

from shared.logs import RedactingFilter


class _Server(uvicorn.Server):
    """Signals are handled once for the whole group (see `serve_all`), not per server."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def server_for(app: Any, host: str, port: int, *, access_log: bool = True) -> uvicorn.Server:
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        lifespan="on",
        access_log=access_log,
        log_config=None,  # keep our logging config (and its redaction filter)
        timeout_graceful_shutdown=30,
        proxy_headers=True,
    )
    return _Server(config)


async def serve_all(servers: list[uvicorn.Server]) -> None:
    """Run servers together; SIGINT/SIGTERM asks all of them to stop gracefully."""
    loop = asyncio.get_running_loop()

    def stop() -> None:
        for server in servers:
            server.should_exit = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop)
    redacting = RedactingFilter()
    for name in ("uvicorn.access", "uvicorn.error"):
        logging.getLogger(name).addFilter(redacting)
    await asyncio.gather(*(server.serve() for server in servers))
