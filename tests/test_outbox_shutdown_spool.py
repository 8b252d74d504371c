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

from shared.store import SlotRelease
from shared.store_memory import MemoryStore
from shared.webhooks import generate_secret, verify
from stream_edge.memory_transport import InMemoryTransport
from stream_edge.metrics import EdgeMetrics
from stream_edge.outbox import Outbox
from stream_edge.spool import Spool
from tests.inproc import eventually
from tests.test_outbox_linger import event

URL = "http://cp.test/v1/webhooks/usage"
SECRET = generate_secret()


class ControlPlane:
    """Answers 503 while `restarting` (and for the jtis in `refuse`), else settles
    (records the jti)."""

    def __init__(self) -> None:
        self.restarting = True
        self.refuse: set[str] = set()
        self.settled: list[str] = []
        self.refused = asyncio.Event()
        self.refusals = 0

    async def hook(self, request: Request) -> Response:
        body = await request.body()
        verify([SECRET], body, dict(request.headers))
        jti = orjson.loads(body)["data"]["jti"]
        if self.restarting or jti in self.refuse:
            self.refused.set()
            self.refusals += 1
            return JSONResponse({"error": {"code": "database_unavailable"}}, status_code=503)
        self.settled.append(jti)
        return JSONResponse({"ok": True})


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


class WritesRefused(MemoryStore):
    """Redis still refusing writes at shutdown (down, a failover's read-only replica,
    full under `noeviction`): the spool cannot move into it."""

    async def outbox_put(
        self, item_id: str, payload: bytes, due_at: float, release: SlotRelease | None = None
    ) -> None:
        raise ConnectionError("store down")


def outbox(control_plane: ControlPlane, spool: Spool) -> Outbox:
    app = Starlette(routes=[Route("/v1/webhooks/usage", control_plane.hook, methods=["POST"])])
    transport = InMemoryTransport({URL: app})
    return Outbox(WritesRefused(), transport, URL, SECRET, EdgeMetrics(), spool=spool, linger=0)


async def test_a_spooled_report_reaches_the_control_plane_when_the_store_is_still_down(
    tmp_path: Path,
) -> None:
    control_plane, spool = ControlPlane(), Spool(tmp_path)
    box = outbox(control_plane, spool)
    await box.keep(event("a"))  # spooled; its direct post met a restarting control plane
    await control_plane.refused.wait()
    # The control plane is back, Redis is not; SIGTERM: the pod and its spool go.
    control_plane.restarting = False
    await box.flush(timeout=30)
    # Posted from the spool, settled once; the disk keeps nothing it would lose.
    assert control_plane.settled == ["a"]
    assert not spool.has_pending() and list(tmp_path.iterdir()) == []


async def test_a_spooled_report_stays_when_the_control_plane_is_down_too(tmp_path: Path) -> None:
    control_plane, spool = ControlPlane(), Spool(tmp_path)
    box = outbox(control_plane, spool)
    await box.keep(event("a"))
    await control_plane.refused.wait()
    await box.flush(timeout=30)  # the control plane still answers 503: retry later
    assert control_plane.settled == []
    [path] = spool.claim()
    assert [orjson.loads(line)["item"]["id"] for line in spool.read(path)] == ["usage_a"]


async def test_only_the_accepted_reports_leave_the_spool(tmp_path: Path) -> None:
    control_plane, spool = ControlPlane(), Spool(tmp_path)
    box = outbox(control_plane, spool)
    for jti in ("a", "b", "c"):
        await box.keep(event(jti))
    await eventually(lambda: control_plane.refusals == 3, "the direct posts")
    # Back, but still refusing b's settlement (its database shard restarting).
    control_plane.restarting = False
    control_plane.refuse = {"b"}
    await box.flush(timeout=30)
    assert sorted(control_plane.settled) == ["a", "c"]
    [path] = spool.claim()
    assert [orjson.loads(line)["item"]["id"] for line in spool.read(path)] == ["usage_b"]
