"""EventStreamResponse when a write finds the client gone before the disconnect is
heard (an ASGI server may raise on `send` first): a resumable stream still lingers
for its reconnect; any other stream stops at once. Driven by events, no sockets."""

from __future__ import annotations

import asyncio
from typing import Any

from stream_edge.streaming import Emit, EventStreamResponse


class GoneClient:
    """An ASGI peer whose body writes fail (it left) until the test lets the server
    hear `http.disconnect`."""

    def __init__(self) -> None:
        self.disconnect = asyncio.Event()

    async def receive(self) -> dict[str, Any]:
        await self.disconnect.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body":
            raise OSError("the client disconnected")


async def run(resumable: bool) -> tuple[list[str], list[str]]:
    client = GoneClient()
    release = asyncio.Event()
    lingered = asyncio.Event()
    steps: list[str] = []
    outcomes: list[str] = []

    async def produce(emit: Emit) -> None:
        await emit(b"data: 1\n\n")  # fails: the client is gone
        steps.append("went on")
        await release.wait()  # e.g. the rest of the answer, for a reconnect
        steps.append("finished")

    async def linger() -> None:
        lingered.set()
        await release.wait()

    async def on_finish(outcome: str) -> None:
        outcomes.append(outcome)

    response = EventStreamResponse(
        produce, on_finish, ping_interval=60, linger=linger if resumable else None
    )
    task = asyncio.create_task(response({"type": "http"}, client.receive, client.send))
    async with asyncio.timeout(10):  # a bound on a broken test, not a timing check
        if resumable:
            while "went on" not in steps:
                await asyncio.sleep(0)
            client.disconnect.set()
            await lingered.wait()
            release.set()
        await task
    return steps, outcomes


async def test_a_failed_write_lets_a_resumable_stream_go_on_for_its_reconnect() -> None:
    steps, outcomes = await run(resumable=True)
    assert steps == ["went on", "finished"]
    assert outcomes == ["client_gone"]


async def test_a_failed_write_stops_a_stream_nobody_can_resume() -> None:
    steps, outcomes = await run(resumable=False)
    assert "finished" not in steps
    assert outcomes == ["client_gone"]
