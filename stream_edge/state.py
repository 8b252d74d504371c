"""The edge's per-app dependencies, built in the lifespan and handed to handlers."""

from __future__ import annotations

from dataclasses import dataclass

import httpx

from shared.settings import Settings
from shared.store import Store
from stream_edge.grants import GrantVerifier
from stream_edge.metrics import EdgeMetrics
from stream_edge.outbox import Outbox


@dataclass
class EdgeState:
    settings: Settings
    store: Store
    client: httpx.AsyncClient
    grants: GrantVerifier
    outbox: Outbox
    metrics: EdgeMetrics
    draining: bool = False
