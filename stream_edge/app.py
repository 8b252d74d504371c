"""The stream edge application: `create_app(settings)` and its lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.routing import Route

from shared.request_id import RequestIdMiddleware
from shared.retry import Backoff
from shared.route_claim import route_ciphers_from_keys
from shared.store import Store
from shared.store_clock import StoreClock
from shared.store_factory import open_store
from shared.store_redis import STORE_ERRORS, RedisStore, ReplicaAckMissing
from stream_edge import eventsource, key_callers, routes
from stream_edge.breaker import Breakers
from stream_edge.errors import EdgeError, handle_edge_error
from stream_edge.grants import GrantVerifier
from stream_edge.http1 import Http1Client
from stream_edge.jwks import JWKSCache
from stream_edge.key_callers import ControlPlaneLink
from stream_edge.limits import StreamLimits
from stream_edge.metrics import EdgeMetrics
from stream_edge.origin_share import company_share
from stream_edge.outbox import Outbox
from stream_edge.reporter import ENQUEUE_BUDGET_SECONDS
from stream_edge.revocation_watch import watch_revocations
from stream_edge.settings import EdgeSettings
from stream_edge.spool import Spool
from stream_edge.state import EdgeState
from stream_edge.transport import Transport
from stream_edge.upstream_client import RetryPolicy

log = logging.getLogger("llmgw.edge")

# A report is stored, or spooled, within its enqueue budget (`reporter`).
REPORTS_WAIT_SECONDS = ENQUEUE_BUDGET_SECONDS + 1.0


def _get_only(path: str, endpoint: Callable[..., Any]) -> Route:
    """A GET route that does not also answer HEAD (Starlette adds HEAD to every GET
    route): a GET of `/v1/stream` claims the token and runs the upstream call, and a
    HEAD, which link checkers and preview bots send freely, must change nothing. It
    gets 405 with ``Allow: GET``."""
    route = Route(path, endpoint, methods=["GET"])
    assert route.methods is not None
    route.methods.discard("HEAD")
    return route


def upstream_client(settings: EdgeSettings) -> Http1Client:
    """One pooled client for the backends: a short connect, a long read (the idle gap
    between two tokens). Our own lean HTTP/1.1 client, not httpx: see http1.py for the
    measured difference on the hot path."""
    return Http1Client(
        connect_timeout=settings.upstream_connect_timeout,
        read_timeout=settings.upstream_read_timeout,
        max_per_origin=settings.max_connections_per_origin,
        company_share=company_share(
            settings.max_connections_per_origin, settings.company_origin_share_percent
        ),
    )


def spool_directory(settings: EdgeSettings) -> Path:
    """One subdirectory per deployment (control plane and store), so edges of
    different deployments sharing `LLMGW_SPOOL_DIR` never drain each other's reports
    into the wrong outbox."""
    where = f"{settings.control_plane_url}|{settings.redis_url or 'memory'}|{settings.redis_prefix}"
    return Path(settings.spool_dir) / hashlib.sha256(where.encode()).hexdigest()[:16]


def control_plane_client(transport: httpx.AsyncBaseTransport | None = None) -> httpx.AsyncClient:
    """JWKS fetches: few connections, short timeouts."""
    return httpx.AsyncClient(
        timeout=httpx.Timeout(connect=5.0, read=10.0, write=10.0, pool=10.0),
        limits=httpx.Limits(max_connections=32, max_keepalive_connections=16),
        follow_redirects=False,
        transport=transport,
    )


async def drain(state: EdgeState) -> None:
    """SIGTERM: readiness turns false at once (the server also stops accepting), running
    streams get `drain_seconds` to finish, then are ended with `shutting_down`. The
    outbox is flushed by the lifespan's shutdown afterwards."""
    state.draining = True
    deadline = asyncio.get_running_loop().time() + state.settings.drain_seconds
    while state.active and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)
    for stream in list(state.active):
        stream.shut_down()
    if state.active:
        log.info("ended %d streams still running after the drain", len(state.active))


async def reports_stored(state: EdgeState, timeout: float) -> None:
    """Wait, at most `timeout`, until every admitted stream's report is stored. The
    server cancels the requests still open when its graceful time runs out (one
    opening its backend, one reading a whole answer) and then shuts the app down at
    once: their reports, made as they unwind, reached the outbox after its last flush
    and waited there for another edge's loop (a lease later), the hold meanwhile."""
    deadline = asyncio.get_running_loop().time() + timeout
    while state.reports_owed > 0 and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.02)
    if state.reports_owed > 0:
        log.warning("%d stream reports still unwritten at shutdown", state.reports_owed)


async def warn_missing_replicas(store: RedisStore, wanted: int) -> None:
    """A warning at start when the Redis has fewer replicas than each admission waits
    for (LLMGW_REDIS_MIN_REPLICA_ACKS): every stream would be refused 503 while the
    edge started without a word. Not a refusal: a replica may be restarting as the
    edge does, and admissions recover once it follows."""
    try:
        replicas = await store.connected_replicas()
    except Exception as exc:  # the store down at start: its own errors say so
        log.warning("could not count the Redis replicas: %s", type(exc).__name__)
        return
    if replicas < wanted:
        log.warning(
            "LLMGW_REDIS_MIN_REPLICA_ACKS is %d but the Redis has %d replicas connected: "
            "every stream is refused 503 until that many replicas follow it; lower the "
            "setting or add replicas",
            wanted,
            replicas,
        )


async def deliver_on_store_clock(outbox: Outbox, clock: StoreClock) -> None:
    """The outbox's deliverer loop, from a first reading of the store's clock on
    (`StoreClock.run` takes it, however long the store is down at start): on this
    host's, an edge minutes ahead would claim the reports other edges hold leased."""
    await clock.first_reading()
    await outbox.run()


def create_app(
    settings: EdgeSettings,
    store: Store | None = None,
    *,
    transport: Transport | None = None,
    jwks_transport: httpx.AsyncBaseTransport | None = None,
    clock: Callable[[], float] = time.time,
) -> Starlette:
    """`transport`: what the edge sends its backend requests, usage webhooks and
    control-plane calls through, owned by the caller (tests: one routing each origin
    to an app in-process); by default its own lean clients. `jwks_transport`: the
    same for the JWKS fetch, which goes through httpx. `clock`: this host's wall clock
    (tests skew it): the usage webhooks' signatures are dated by it, and the store's
    clock starts from it until its first reading."""
    # The `upr` claim's keys (DESIGN §11): refuse to start without them.
    route_cipher = route_ciphers_from_keys(settings.route_cipher_keys())

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        own_store = store is None
        active_store = (
            store
            if store is not None
            else open_store(
                settings.redis_url,
                prefix=settings.redis_prefix,
                replica_acks=settings.replica_acks(),
            )
        )
        if (acks := settings.replica_acks()) is not None and isinstance(active_store, RedisStore):
            await warn_missing_replicas(active_store, acks.count)
        client = transport or upstream_client(settings)
        cp_client = control_plane_client(jwks_transport)
        metrics = EdgeMetrics()
        jwks = JWKSCache(cp_client, f"{settings.control_plane_url}/.well-known/jwks.json")
        # Webhooks go through the lean client too: one POST per stream is hot-path
        # work; the rare JWKS fetch keeps httpx.
        webhook_client = transport or Http1Client(connect_timeout=5.0, read_timeout=10.0)
        # Times this edge writes in the store and other edges judge (the outbox's due
        # times and leases, a stream's end) are read on the store's clock: Redis's
        # `TIME` every 15 s, run on on this host's monotonic clock, as the control
        # plane names its rate windows; no round trip on the hot path.
        store_clock = StoreClock(wall=clock)
        outbox = Outbox(
            active_store,
            webhook_client,
            f"{settings.control_plane_url}/v1/webhooks/usage",
            settings.webhook_secret.reveal(),
            metrics,
            backoff=Backoff(
                base=settings.webhook_retry_base_seconds, cap=settings.webhook_retry_cap_seconds
            ),
            spool=Spool(spool_directory(settings)),
            linger=settings.webhook_linger_seconds,
            clock=clock,
            store_clock=store_clock.now,
        )
        state = EdgeState(
            settings,
            active_store,
            client,
            GrantVerifier(jwks),
            outbox,
            metrics,
            limits=StreamLimits(settings),
            breakers=Breakers(settings.breaker_failures, settings.breaker_reset_seconds),
            retry=RetryPolicy(retries=settings.upstream_retries),
            route_cipher=route_cipher,
            control_plane=ControlPlaneLink.of(settings, transport),
            store_clock=store_clock.now,
        )
        app.state.edge = state
        app.state.store_clock = store_clock
        app.state.on_sigterm = lambda: drain(state)
        clock_reads = asyncio.create_task(store_clock.run(active_store), name="store-clock")
        deliverer = asyncio.create_task(
            deliver_on_store_clock(outbox, store_clock), name="usage-outbox"
        )
        revocations = asyncio.create_task(watch_revocations(state), name="revocations")
        try:
            yield
        finally:
            state.draining = True
            await reports_stored(state, REPORTS_WAIT_SECONDS)
            for task in (deliverer, revocations, clock_reads):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            try:
                pending = await outbox.flush(timeout=5.0)
            except Exception as exc:  # the store is down: what it holds waits there
                log.warning("could not flush the outbox at shutdown: %s", type(exc).__name__)
            else:
                if pending:
                    log.warning("%d usage events left in the outbox for the next start", pending)
            if transport is None:
                await client.aclose()
                await webhook_client.aclose()
            await jwks.aclose()
            if state.control_plane is not None:
                await state.control_plane.aclose()
            await cp_client.aclose()
            if own_store:
                await active_store.close()

    middleware = [Middleware(RequestIdMiddleware)]
    if settings.cors_origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=list(settings.cors_origins),
                allow_methods=["GET", "POST", "OPTIONS"],
                allow_headers=["Authorization", "Content-Type", "Last-Event-ID", "X-Request-Id"],
                expose_headers=["X-Request-Id", "Retry-After"],
                max_age=600,
            )
        )
    return Starlette(
        routes=[
            Route("/v1/chat/completions", routes.chat_completions, methods=["POST"]),
            _get_only("/v1/stream", eventsource.event_stream),
            Route("/v1/models", key_callers.list_models, methods=["GET"]),
            Route("/healthz", routes.healthz, methods=["GET"]),
            Route("/readyz", routes.readyz, methods=["GET"]),
            Route("/metrics", routes.metrics, methods=["GET"]),
        ],
        middleware=middleware,
        exception_handlers={
            EdgeError: handle_edge_error,
            **{error: routes.store_unavailable for error in STORE_ERRORS},
            ReplicaAckMissing: routes.replicas_behind,
            404: routes.not_found,
            405: routes.method_not_allowed,
            Exception: routes.internal_error,
        },
        lifespan=lifespan,
    )
