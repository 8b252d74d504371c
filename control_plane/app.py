"""The control plane's ASGI app: `create_app(settings)`.

The lifespan owns every resource: it migrates (when ``LLMGW_AUTO_MIGRATE``), opens
the database and the store, makes sure an active signing key exists, starts the
reconciliation sweeper, and closes all of it on the way out. Nothing happens at
import time; each call builds an independent app (tests run several in one process).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable

import psycopg
import sqlalchemy.exc
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response

from control_plane import background
from control_plane.catalog_cache import CatalogCache
from control_plane.company_webhooks import run_deliveries
from control_plane.db import Database, DatabaseTimeout
from control_plane.deps import Deps
from control_plane.errors import (
    AppError,
    DatabaseUnavailable,
    StoreUnavailable,
    error_response,
    from_http_exception,
)
from control_plane.external_auth import ExternalVerifier
from control_plane.metrics import Metrics
from control_plane.middleware import RequestContextMiddleware
from control_plane.migrate import current, head, upgrade
from control_plane.retired_keys import watch_retired_keys
from control_plane.revocation_republish import republish_revocations
from control_plane.routes import all_routes
from control_plane.settings import ControlPlaneSettings
from control_plane.settlement_batch import SettlementBatcher
from control_plane.signing_keys import KeyRing, load_snapshot, make_fernet
from control_plane.sweeper import run_sweeper
from shared.route_claim import route_ciphers
from shared.store import Store
from shared.store_clock import StoreClock
from shared.store_factory import open_store
from shared.store_redis import STORE_ERRORS

log = logging.getLogger("control_plane")

# How long the shutdown waits for running database calls and background work.
SHUTDOWN_DRAIN_SECONDS = 5.0

# What the database raises when it is unreachable or gives up on a statement: the
# engine's wrapped error and psycopg's own (the raw hot paths, `raw_pg`).
# `DatabaseTimeout`: it did not answer within LLMGW_DATABASE_TIMEOUT_SECONDS.
DATABASE_ERRORS: tuple[type[Exception], ...] = (
    sqlalchemy.exc.OperationalError,
    psycopg.OperationalError,
    DatabaseTimeout,
)
# SQLSTATE 25006 ``read_only_sql_transaction``: the server is up but takes no write,
# a standby that a failover left behind the app's address, or a primary an operator
# set read-only (``default_transaction_read_only``, a full disk, a switchover). We
# never open a read-only transaction ourselves, so it is the database unable to run
# the request, as an outage is; psycopg files it under InternalError, with bugs.
READ_ONLY_SQLSTATE = "25006"
INTERNAL_DATABASE_ERRORS: tuple[type[Exception], ...] = (
    sqlalchemy.exc.InternalError,
    psycopg.InternalError,
)


def refuses_writes(exc: BaseException) -> bool:
    """Whether `exc` (the engine's wrapper or psycopg's own) says the database is
    read-only (`READ_ONLY_SQLSTATE`)."""
    cause = exc.orig if isinstance(exc, sqlalchemy.exc.DBAPIError) else exc
    return isinstance(cause, psycopg.Error) and cause.sqlstate == READ_ONLY_SQLSTATE


async def _app_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, AppError)
    return error_response(exc)


async def _store_error(request: Request, exc: Exception) -> Response:
    log.warning("store unavailable: %s", type(exc).__name__)
    return error_response(StoreUnavailable())


async def _database_error(request: Request, exc: Exception) -> Response:
    # A database that went away (or gave up on a statement: a deadlock) is nobody's
    # fault the client could fix: a 503 to retry, as for the store, not a 500 and a
    # traceback per request for as long as the outage lasts. The transaction was
    # rolled back (or never began), except past the time limit (`DatabaseTimeout`),
    # where it may still commit later: init then releases its hold (`late`), and a
    # retried settlement is found a duplicate. The pool replaces dead connections.
    log.warning("database unavailable: %s", type(exc).__name__)
    return error_response(DatabaseUnavailable())


async def _internal_database_error(request: Request, exc: Exception) -> Response:
    if refuses_writes(exc):  # a failover's standby, a read-only primary: retry later
        return await _database_error(request, exc)
    raise exc  # any other: a bug, the middleware's 500 with its traceback


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return error_response(from_http_exception(exc))


def create_app(
    settings: ControlPlaneSettings,
    store: Store | None = None,
    *,
    wall_clock: Callable[[], float] = time.time,
) -> Starlette:
    """Build the control plane.

    `store`: pass one to share it (``llm-gateway dev`` shares its in-memory store with
    the edge); the app then uses it but does not close it. Without one, the lifespan
    opens ``settings.redis_url`` (or an in-memory store) and closes it.
    `wall_clock`: this host's (a test runs a replica whose clock disagrees); the
    windows shared with other replicas are read on the store's clock instead.
    """
    fernet = make_fernet(settings.require_encryption_key())
    metrics = Metrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if settings.auto_migrate:
            await asyncio.to_thread(upgrade, settings.database_url)
        elif await asyncio.to_thread(current, settings.database_url) != head():
            raise RuntimeError(
                "the database schema is not up to date: run `llm-gateway migrate` "
                "or set LLMGW_AUTO_MIGRATE=1"
            )
        db = Database(
            settings.database_url,
            pgbouncer=settings.database_pgbouncer,
            timeout=settings.database_timeout_seconds,
        )
        own_store = store is None
        active_store = (
            store
            if store is not None
            else open_store(settings.redis_url, prefix=settings.redis_prefix)
        )
        deps: Deps | None = None
        sweeper: asyncio.Task[None] | None = None
        deliveries: asyncio.Task[None] | None = None
        retired: asyncio.Task[None] | None = None
        republish: asyncio.Task[None] | None = None
        store_clock = StoreClock(wall=wall_clock)
        clock_reads: asyncio.Task[None] | None = None
        try:
            clock_reads = asyncio.create_task(store_clock.run(active_store), name="store-clock")
            snapshot = await db.transaction(lambda s: load_snapshot(s, fernet))
            deps = Deps(
                settings=settings,
                db=db,
                store=active_store,
                fernet=fernet,
                route_cipher=route_ciphers([k.reveal() for k in settings.encryption_keys]),
                keyring=KeyRing(snapshot),
                metrics=metrics,
                external=ExternalVerifier.from_settings(settings),
                settler=SettlementBatcher(db),
                catalog_cache=CatalogCache(),
                clock=store_clock.now,
                wall_clock=wall_clock,
            )
            app.state.deps = deps
            app.state.settings = settings
            app.state.sessions = db.sessions
            app.state.db = db
            app.state.keyring = deps.keyring
            app.state.store = active_store
            app.state.store_clock = store_clock
            app.state.metrics = metrics
            sweeper = asyncio.create_task(
                run_sweeper(db, active_store, metrics, settings, store_clock.now),
                name="hold-sweeper",
            )
            # Companies' own events (budget.threshold), off the request path.
            deliveries = asyncio.create_task(
                run_deliveries(
                    db,
                    fernet,
                    settings.sweep_interval_seconds,
                    allow_private=settings.company_webhooks_allow_private,
                ),
                name="company-webhooks",
            )
            retired = asyncio.create_task(watch_retired_keys(deps), name="retired-keys")
            # The edges' revocation keys again, should the store have lost them.
            republish = asyncio.create_task(
                republish_revocations(deps), name="revocations-republish"
            )
            yield
        finally:
            for task in (sweeper, deliveries, retired, republish, clock_reads):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            if deps is not None and deps.settler is not None:
                await deps.settler.close()
            # What commits nobody awaited started (`late`: a hold's release, a
            # tokens-per-minute correction, a revocation) and what cancelled
            # requests still owed (`background.finish`) needs the store and the
            # database: they close after it, or after the bound.
            await background.drain(db.busy, SHUTDOWN_DRAIN_SECONDS)
            if deps is not None and deps.external is not None:
                await deps.external.aclose()
            if own_store:
                await active_store.close()
            await asyncio.to_thread(db.close)

    middleware = [Middleware(RequestContextMiddleware, metrics=metrics)]
    if settings.cors_origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=list(settings.cors_origins),
                allow_methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
                allow_headers=["Authorization", "Content-Type", "Idempotency-Key", "X-Request-Id"],
                expose_headers=["X-Request-Id"],
                max_age=600,
            )
        )
    app = Starlette(
        routes=all_routes(),
        middleware=middleware,
        exception_handlers={
            AppError: _app_error,
            HTTPException: _http_error,
            **{error: _store_error for error in STORE_ERRORS},
            **{error: _database_error for error in DATABASE_ERRORS},
            **{error: _internal_database_error for error in INTERNAL_DATABASE_ERRORS},
        },
        lifespan=lifespan,
    )
    app.state.metrics = metrics
    return app
