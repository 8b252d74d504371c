"""The outbox posts finished streams' reports together: each waits up to `linger` for
others, so the control plane settles them in one batch. In process: a memory store,
the control plane's webhook route as a recording Starlette app. No assertion waits on
the wall clock: a long linger is never reached, a short one is awaited until posted."""

from __future__ import annotations

import asyncio

import orjson
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from shared.store_memory import MemoryStore
from shared.webhooks import UsageEvent, generate_secret, verify
from stream_edge import outbox as outbox_module
from stream_edge.memory_transport import InMemoryTransport
from stream_edge.metrics import EdgeMetrics
from stream_edge.outbox import Outbox

URL = "http://cp.test/v1/webhooks/usage"
SECRET = generate_secret()
NEVER = 3600.0  # a linger no test reaches


class Receiver:
    def __init__(self) -> None:
        self.jtis: list[str] = []
        self.arrived = asyncio.Event()

    async def hook(self, request: Request) -> Response:
        body = await request.body()
        verify([SECRET], body, dict(request.headers))
        self.jtis.append(orjson.loads(body)["data"]["jti"])
        self.arrived.set()
        return JSONResponse({"ok": True})


def event(jti: str) -> UsageEvent:
    return UsageEvent(
        jti=jti, reservation_id=f"r-{jti}", company_id="c", user_id="u", session_id="s",
        request_id="q", model="m", provider="p", status="completed", finish_reason="stop",
        input_tokens=1, output_tokens=2, usage_source="upstream",
        started_at="2026-01-01T00:00:00Z", first_token_at=None,
        ended_at="2026-01-01T00:00:01Z",
    )  # fmt: skip


def receiver_app(receiver: Receiver) -> Starlette:
    return Starlette(routes=[Route("/v1/webhooks/usage", receiver.hook, methods=["POST"])])


def outbox(linger: float, max_direct: int = 64) -> tuple[Outbox, MemoryStore, Receiver]:
    receiver, store = Receiver(), MemoryStore()
    app = receiver_app(receiver)
    box = Outbox(
        store, InMemoryTransport({URL: app}), URL, SECRET, EdgeMetrics(),
        linger=linger, max_direct=max_direct,
    )  # fmt: skip
    return box, store, receiver


async def settle_loop() -> None:
    for _ in range(20):  # every task the posts started runs to its end
        await asyncio.sleep(0)


async def test_reports_wait_in_the_store_and_are_posted_together_at_flush() -> None:
    box, store, receiver = outbox(NEVER)
    for jti in ("a", "b", "c"):
        await box.enqueue(event(jti))
    await settle_loop()
    assert receiver.jtis == []  # waiting for the others (and durable meanwhile)
    assert await store.outbox_size() == 3
    # Shutdown does not wait out the linger: everything goes at once.
    assert await box.flush(timeout=30) == 0
    assert sorted(receiver.jtis) == ["a", "b", "c"]


async def test_a_short_linger_posts_the_reports_of_its_window_on_its_own() -> None:
    box, _, receiver = outbox(0.01)
    await box.enqueue(event("a"))
    await box.enqueue(event("b"))
    while len(receiver.jtis) < 2:
        receiver.arrived.clear()
        await receiver.arrived.wait()
    assert sorted(receiver.jtis) == ["a", "b"]
    assert await box.flush(timeout=30) == 0  # acknowledged: nothing left to deliver
    # A report after the window opens a window of its own.
    await box.enqueue(event("c"))
    while len(receiver.jtis) < 3:
        receiver.arrived.clear()
        await receiver.arrived.wait()
    assert await box.flush(timeout=30) == 0


async def test_a_full_batch_does_not_wait_for_the_linger() -> None:
    box, _, receiver = outbox(NEVER, max_direct=3)
    for jti in ("a", "b"):
        await box.enqueue(event(jti))
    await settle_loop()
    assert receiver.jtis == []
    await box.enqueue(event("c"))  # the third fills the batch: all three go now
    await settle_loop()
    assert sorted(receiver.jtis) == ["a", "b", "c"]
    await box.enqueue(event("d"))  # and the next waits again
    await settle_loop()
    assert sorted(receiver.jtis) == ["a", "b", "c"]
    assert await box.flush(timeout=30) == 0
    assert sorted(receiver.jtis) == ["a", "b", "c", "d"]


async def test_no_linger_posts_each_report_at_once() -> None:
    box, _, receiver = outbox(0)
    await box.enqueue(event("a"))
    await settle_loop()
    assert receiver.jtis == ["a"]
    assert await box.flush(timeout=30) == 0


async def test_a_report_left_waiting_by_a_dead_process_is_delivered_by_another() -> None:
    """The event is in the store before it waits: a process that dies during the linger
    leaves it for the deliverer loop of any edge once its lease runs out (here at once)."""
    receiver, store = Receiver(), MemoryStore()
    app = receiver_app(receiver)

    def process() -> Outbox:
        return Outbox(
            store, InMemoryTransport({URL: app}), URL, SECRET, EdgeMetrics(),
            linger=NEVER, lease_seconds=0.0,
        )  # fmt: skip

    await process().enqueue(event("a"))  # that process dies here, its timer with it
    assert receiver.jtis == []
    assert await process().deliver_due() == 1
    assert receiver.jtis == ["a"]


async def test_a_direct_post_that_waited_past_its_lease_is_left_to_the_loop() -> None:
    """A slow control plane: by the time a direct post gets its turn the lease is over
    and the deliverer loop owns the report. It is posted once, by the loop."""
    receiver, store = Receiver(), MemoryStore()
    box = Outbox(
        store, InMemoryTransport({URL: receiver_app(receiver)}), URL, SECRET, EdgeMetrics(),
        linger=0, lease_seconds=0.0,
    )  # fmt: skip
    await box.enqueue(event("a"))
    await settle_loop()
    assert receiver.jtis == []  # the direct post stood down
    assert await box.deliver_due() == 1
    assert receiver.jtis == ["a"]
    assert await box.flush(timeout=30) == 0


async def test_past_the_direct_queue_reports_wait_for_the_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(outbox_module, "MAX_DIRECT_QUEUE", 1)
    receiver, store = Receiver(), MemoryStore()
    box = Outbox(
        store, InMemoryTransport({URL: receiver_app(receiver)}), URL, SECRET, EdgeMetrics(),
        linger=NEVER, lease_seconds=0.0,
    )  # fmt: skip
    await box.enqueue(event("a"))  # waits to be posted directly
    await box.enqueue(event("b"))  # over the bound: left in the store
    assert await store.outbox_size() == 2
    assert await box.deliver_due() == 2  # the loop takes both (a's lease is over too)
    assert sorted(receiver.jtis) == ["a", "b"]
