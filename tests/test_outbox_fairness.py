"""The edge posts its reports as many at once as `max_direct` allows, the companies in
turn (`stream_edge/outbox.py`): one company's streams ending together cannot keep
another company's report waiting behind all of theirs. In process: a memory store,
the control plane's webhook route as a recording Starlette app that holds each post
until the test lets it answer."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import replace

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from shared.store_memory import MemoryStore
from stream_edge.memory_transport import InMemoryTransport
from stream_edge.metrics import EdgeMetrics
from stream_edge.outbox import Outbox
from tests.test_outbox_linger import SECRET, URL, event


class HeldReceiver:
    """Records each post's jti as it arrives and answers only once let go."""

    def __init__(self) -> None:
        self.arrived: list[str] = []
        self.go = asyncio.Semaphore(0)

    async def hook(self, request: Request) -> Response:
        self.arrived.append(orjson.loads(await request.body())["data"]["jti"])
        await self.go.acquire()
        return JSONResponse({"success": True, "data": {"settled": True}})


async def _until(condition: Callable[[], bool], what: str) -> None:
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError(what)


async def test_another_companys_report_is_posted_at_the_next_free_turn() -> None:
    """Company a's six reports fill the two direct posts and queue; company b's one
    report comes last. Before: b's post waited for every one of a's (posted 7th of
    7), as the control plane settled a's burst (measured through the route: 200
    reports of 900 K characters, the other company's settlement after 11.5 s). Now
    the first post to finish hands its turn to b."""
    receiver, store = HeldReceiver(), MemoryStore()
    app = Starlette(routes=[Route("/v1/webhooks/usage", receiver.hook, methods=["POST"])])
    box = Outbox(
        store, InMemoryTransport({URL: app}), URL, SECRET, EdgeMetrics(), linger=0, max_direct=2
    )
    for i in range(6):
        await box.enqueue(replace(event(f"a{i}"), company_id="a"))
    await box.enqueue(replace(event("b0"), company_id="b"))
    await _until(lambda: len(receiver.arrived) == 2, "two posts in flight")
    for finished in range(1, 6):  # each post let go frees a turn for the next
        receiver.go.release()
        await _until(lambda n=2 + finished: len(receiver.arrived) == n, "the next post")
    receiver.go.release()
    receiver.go.release()
    await box.flush(timeout=30)
    assert receiver.arrived[:2] == ["a0", "a1"]
    assert receiver.arrived.index("b0") == 2, receiver.arrived
    assert sorted(receiver.arrived) == [*(f"a{i}" for i in range(6)), "b0"]
