"""The edge's per-app dependencies, built in the lifespan and handed to handlers."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from cryptography.fernet import MultiFernet

from shared.store import Store
from shared.tokens import StreamGrant
from stream_edge.breaker import Breakers
from stream_edge.grants import GrantVerifier
from stream_edge.limits import StreamLimits
from stream_edge.live_connections import LiveConnections
from stream_edge.metrics import EdgeMetrics
from stream_edge.outbox import Outbox
from stream_edge.settings import EdgeSettings
from stream_edge.transport import Transport
from stream_edge.upstream_client import RetryPolicy

if TYPE_CHECKING:
    from stream_edge.key_callers import ControlPlaneLink


class RunningStream(Protocol):
    """A stream in progress, as shutdown and the revocation watcher see it."""

    grant: StreamGrant | None
    live: tuple[str, bytes | None] | None

    def shut_down(self) -> None: ...

    def revoke(self) -> None: ...

    def supersede(self) -> None: ...


@dataclass
class EdgeState:
    settings: EdgeSettings
    store: Store
    client: Transport
    grants: GrantVerifier
    outbox: Outbox
    metrics: EdgeMetrics
    limits: StreamLimits
    breakers: Breakers
    retry: RetryPolicy
    route_cipher: MultiFernet
    # Signed calls to the control plane for API-key callers (key_callers.py); None:
    # LLMGW_EDGE_SERVICE_SECRET is unset and `sk_…` keys are refused.
    control_plane: ControlPlaneLink | None = None
    # The store's clock (`shared.store_clock.StoreClock.now`): for the times one edge
    # writes in the store and another compares with its own (a stream's end, which a
    # reconnect to any edge is judged by; a provider key's rest; a checkpoint's date).
    store_clock: Callable[[], float] = time.time
    draining: bool = False
    # Streams being served (streaming.Streamed), so a shutdown can end them.
    active: set[RunningStream] = field(default_factory=set)
    # Requests opening their backend or reading a whole answer (`StreamJob`), which
    # the revocation watcher ends too; not the drain's to end (the server cancels).
    answering: set[RunningStream] = field(default_factory=set)
    # Admitted streams whose report is not stored yet (`reporter.Reporter`): the
    # shutdown's last outbox flush waits for them.
    reports_owed: int = 0
    # The connection serving each resumable stream here: a reconnect ends the one
    # before it at once (live_connections.py).
    connections: LiveConnections = field(default_factory=LiveConnections)
