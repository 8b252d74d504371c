"""`llm-gateway control-plane|stream-edge --workers N`: N uvicorn worker processes
sharing one listening socket.

The parent (uvicorn's supervisor) binds the socket, restarts a worker that dies and,
on SIGTERM, asks every worker to stop and waits for them. Each worker builds its app
from the environment with the factories below. Metrics use prometheus-client's
multiprocess mode (`shared.metrics`): the parent points ``PROMETHEUS_MULTIPROC_DIR``
at an empty directory before any worker starts, and a scrape of any worker reports
the sums over all of them.

An edge worker drains on SIGTERM as a single process does (`llm_gateway.servers`):
its streams get ``LLMGW_DRAIN_SECONDS`` to finish, then end with ``shutting_down``.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import tempfile
from types import FrameType
from typing import Any

import uvicorn
from starlette.applications import Starlette

from control_plane.settings import ControlPlaneSettings
from llm_gateway.gc_tuning import freeze_startup_heap
from llm_gateway.http_guard import http_protocol
from llm_gateway.servers import limits_of
from shared.logs import configure_logging
from shared.metrics import MULTIPROC_ENV, forget_dead_workers, reset_multiproc_dir
from shared.settings import CommonSettings

FACTORIES = {
    "control-plane": "llm_gateway.workers:control_plane_app",
    "stream-edge": "llm_gateway.workers:stream_edge_app",
}


def _worker_start() -> None:
    configure_logging(os.environ.get("LLMGW_LOG_LEVEL", "INFO"))
    path = os.environ.get(MULTIPROC_ENV)
    if path:
        forget_dead_workers(path)


def control_plane_app() -> Starlette:
    """uvicorn's app factory in a control-plane worker."""
    from control_plane.app import create_app

    _worker_start()
    app = create_app(ControlPlaneSettings.from_env(os.environ))
    freeze_startup_heap()
    return app


def stream_edge_app() -> Starlette:
    """uvicorn's app factory in an edge worker."""
    from stream_edge.app import create_app
    from stream_edge.settings import EdgeSettings

    _worker_start()
    app = create_app(EdgeSettings.from_env(os.environ))
    _drain_on_signal(app)
    freeze_startup_heap()
    return app


def _drain_on_signal(app: Starlette) -> None:
    """Run the app's `on_sigterm` hook (the edge's drain) when the worker is asked to
    stop, alongside uvicorn's own handler, which then waits for the streams.

    Called while uvicorn loads the app: its signal handlers are installed and its
    event loop runs, so the hook is scheduled on that loop."""
    loop = asyncio.get_running_loop()
    tasks: list[asyncio.Future[Any]] = []

    def start_drain() -> None:
        hook = getattr(app.state, "on_sigterm", None)
        if hook is not None and not tasks:
            tasks.append(asyncio.ensure_future(hook()))

    for sig in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(sig)

        def handler(signum: int, frame: FrameType | None, previous: Any = previous) -> None:
            loop.call_soon_threadsafe(start_drain)
            if callable(previous):
                previous(signum, frame)

        signal.signal(sig, handler)


def serve_workers(
    service: str, settings: CommonSettings, host: str, port: int, workers: int, graceful: float
) -> None:
    """Supervise `workers` processes serving `service` until SIGTERM/SIGINT."""
    own_dir = not os.environ.get(MULTIPROC_ENV)
    path = os.environ.get(MULTIPROC_ENV) or tempfile.mkdtemp(prefix="llmgw-metrics-")
    reset_multiproc_dir(path)
    os.environ[MULTIPROC_ENV] = path
    if isinstance(settings, ControlPlaneSettings) and settings.auto_migrate:
        # Once, here, rather than racing in every worker.
        from control_plane.migrate import upgrade

        upgrade(settings.database_url)
        os.environ["LLMGW_AUTO_MIGRATE"] = "0"
    try:
        uvicorn.run(
            FACTORIES[service],
            factory=True,
            host=host,
            port=port,
            workers=workers,
            lifespan="on",
            log_config=None,  # each worker applies ours (`_worker_start`)
            timeout_graceful_shutdown=int(graceful),
            proxy_headers=True,
            # Header time, header size and connections, per worker (http_guard).
            http=http_protocol(limits_of(settings)),
        )
    finally:
        if own_dir:
            shutil.rmtree(path, ignore_errors=True)
