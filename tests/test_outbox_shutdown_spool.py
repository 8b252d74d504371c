"""A rolling deploy replaces an edge whose spool still holds a report: the stream
ended while Redis was unreachable (a failover) and its direct post failed too (the
control plane was restarting). The spool lives on the pod's `emptyDir`, which goes
with the pod; the shutdown's last flush is the edge's last chance to hand it on. In
process: a memory store, the control plane's webhook route as a recording app."""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from shared.store_memory import MemoryStore
from shared.webhooks import UsageEvent, generate_secret, verify
from stream_edge.memory_transport import InMemoryTransport
from stream_edge.metrics import EdgeMetrics
from stream_edge.outbox import Outbox
from stream_edge.spool import Spool

URL = "http://cp.test/v1/webhooks/usage"
SECRET = generate_secret()


class ControlPlane:
    """Answers 503 while `restarting`, then settles (records the jti)."""

    def __init__(self) -> None:
        self.restarting = True
        self.settled: list[str] = []
        self.refused = asyncio.Event()

    async def hook(self, request: Request) -> Response:
        body = await request.body()
        verify([SECRET], body, dict(request.headers))
        if self.restarting:
            self.refused.set()
            return JSONResponse({"error": {"code": "database_unavailable"}}, status_code=503)
        self.settled.append(orjson.loads(body)["data"]["jti"])
        return JSONResponse({"ok": True})


def event(jti: str) -> UsageEvent:
    return UsageEvent(
        jti=jti, reservation_id=f"r-{jti}", company_id="c", user_id="u", session_id="s",
        request_id="q", model="m", provider="p", status="completed", finish_reason="stop",
        input_tokens=1, output_tokens=2, usage_source="upstream",
        started_at="2026-01-01T00:00:00Z", first_token_at=None,
        ended_at="2026-01-01T00:00:01Z",
    )  # fmt: skip


async def test_a_spooled_report_is_handed_on_by_the_shutdown_flush(tmp_path: Path) -> None:
    control_plane, store, spool = ControlPlane(), MemoryStore(), Spool(tmp_path)
    app = Starlette(routes=[Route("/v1/webhooks/usage", control_plane.hook, methods=["POST"])])
    box = Outbox(
        store, InMemoryTransport({URL: app}), URL, SECRET, EdgeMetrics(), spool=spool, linger=0
    )
    # Redis refused the report: spooled, and its direct post met a restarting control plane.
    await box.keep(event("a"))
    await control_plane.refused.wait()
    assert control_plane.settled == [] and spool.has_pending()
    # Redis and the control plane are back; SIGTERM arrives before the deliverer
    # loop's next pass (the lifespan cancels the loop, then flushes).
    control_plane.restarting = False
    left = await box.flush(timeout=30)
    # The report was delivered and nothing is left on the disk that goes with the pod.
    assert control_plane.settled == ["a"]
    assert left == 0
    assert not spool.has_pending() and list(tmp_path.iterdir()) == []
