"""A revocation or a shutdown that lands after a stream has ended by itself — while
its last event is still on its way to the client, or its resume log is being closed
— changes nothing: the outcome stays the stream's own, and no `error` event follows
the `complete` (or the `error`) the client and the resume log already have.

Before the fix, such an abort still counted: a stream whose backend had failed was
reported `revoked` instead of `failed`, the resume log got a second last event (a
resuming client saw `complete`, then `error`), and an OpenAI-style client got an
error chunk after `[DONE]`.

The whole gateway runs in one process (tests/inproc.py); the edge is driven as an
ASGI app by a client that holds the send carrying the stream's last event until the
test has aborted the stream, as the revocation watcher's pass
(`revocation_watch.check_running`) or the shutdown's drain (`app.py`) would."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import orjson
import pytest
import pytest_asyncio

from shared.sse import ServerSentEvent, SSEDecoder
from stream_edge.resume import events_key
from tests.inproc import Gateway, events, gateway_env, opened

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def gw(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Gateway]:
    tmp = tmp_path_factory.mktemp("late-abort")
    env = gateway_env(
        str(tmp),
        LLMGW_WEBHOOK_RETRY_BASE_SECONDS="0.05",
        LLMGW_WEBHOOK_RETRY_CAP_SECONDS="0.5",
        LLMGW_RESUME_GRACE_SECONDS="1",
    )
    async with Gateway(env) as gateway:
        yield gateway


class HeldClient:
    """An ASGI client that reads the response as it comes, but holds the send that
    carries `hold_on` (the stream's last event) until the test lets it through."""

    def __init__(self, body: bytes, hold_on: bytes) -> None:
        self._request = [{"type": "http.request", "body": body, "more_body": False}]
        self._hold_on = hold_on
        self.status = 0
        self.bodies: list[bytes] = []
        self.held = asyncio.Event()
        self.release = asyncio.Event()
        self._never = asyncio.Event()

    async def receive(self) -> dict[str, Any]:
        if self._request:
            return self._request.pop()
        await self._never.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            return
        body: bytes = message.get("body", b"")
        if self._hold_on in body and not self.held.is_set():
            self.held.set()
            await self.release.wait()
        self.bodies.append(body)

    def events(self) -> list[ServerSentEvent]:
        return list(SSEDecoder().feed(b"".join(self.bodies)))


def _scope(method: str, url: str, headers: dict[str, str], body: bytes) -> dict[str, Any]:
    parts = urlsplit(url)
    raw = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    raw += [(b"host", b"edge.test"), (b"content-length", str(len(body)).encode())]
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": parts.path,
        "raw_path": parts.path.encode(),
        "query_string": parts.query.encode(),
        "root_path": "",
        "headers": raw,
        "client": ("127.0.0.1", 50000),
        "server": ("edge.test", 80),
        "state": {},
    }


async def abort_during_the_last_send(
    gw: Gateway,
    request: tuple[str, str, dict[str, str], bytes],
    hold_on: bytes,
    action: str,
    follower: bool = False,
) -> tuple[HeldClient, str]:
    """Serve `request`; while its last event waits on the client, `action` ("revoke"
    or "shut_down") the stream (`follower`: the resuming connection, not its
    producer). Returns the client and the jti."""
    method, url, headers, body = request
    state = gw.edge_state()
    client = HeldClient(body, hold_on)
    app = gw.edges["edge"]
    task = asyncio.create_task(app(_scope(method, url, headers, body), client.receive, client.send))
    async with asyncio.timeout(30):  # a bound on a broken test, not a timing check
        await client.held.wait()
        (stream,) = [s for s in state.active if follower == bool(s.live and s.live[1])]
        assert stream.grant is not None
        getattr(stream, action)()
        client.release.set()
        await task
    assert client.status == 200
    return client, stream.grant.jti


def _names(frames: list[bytes]) -> list[str]:
    return [e.event for frame in frames for e in SSEDecoder().feed(frame)]


@pytest.mark.parametrize(
    ("directive", "last", "action", "status"),
    [
        ("[[mock tokens=3]]", "complete", "revoke", "completed"),
        ("[[mock tokens=3]]", "complete", "shut_down", "completed"),
        ("[[mock tokens=20 drop_after=5]]", "error", "revoke", "failed"),
    ],
    ids=["complete-revoked", "complete-shutdown", "failed-revoked"],
)
async def test_an_abort_after_the_last_event_changes_neither_the_outcome_nor_the_log(
    gw: Gateway, directive: str, last: str, action: str, status: str
) -> None:
    token = await gw.new_user()
    grant = await gw.init_ok(token, {"query": f"late {directive}"})
    client, jti = await abort_during_the_last_send(
        gw, ("GET", grant["stream_url"], {}, b""), f"event: {last}".encode(), action
    )
    got = client.events()
    assert got[-1].event == last, [e.event for e in got[-3:]]
    assert sum(e.event in ("complete", "error") for e in got) == 1
    # What a resuming client would replay: the same one last event, nothing after it.
    logged = _names(await gw.store.log_range(events_key(jti), 0, 1000))
    assert logged[-1] == last and logged.count("error") + logged.count("complete") == 1
    record = await gw.wait_usage(token, grant["reservation_id"])
    assert record["status"] == status


async def test_a_shutdown_during_the_done_marker_adds_no_error_chunk_after_it(
    gw: Gateway,
) -> None:
    token = await gw.new_user()
    messages = [{"role": "user", "content": "late [[mock tokens=3]]"}]
    grant = await gw.init_ok(token, {"messages": messages})
    body = orjson.dumps({"model": "mock-fast", "messages": messages, "stream": True})
    headers = {
        "authorization": f"Bearer {grant['stream_token']}",
        "content-type": "application/json",
    }
    client, _ = await abort_during_the_last_send(
        gw,
        ("POST", "http://edge.test/v1/chat/completions", headers, body),
        b"[DONE]",
        "shut_down",
    )
    got = client.events()
    assert got[-1].data == "[DONE]"
    assert not any("error" in orjson.loads(e.data) for e in got[:-1])
    record = await gw.wait_usage(token, grant["reservation_id"])
    assert record["status"] == "completed"


async def test_a_revocation_after_a_follower_relayed_the_last_event_lets_it_arrive(
    gw: Gateway,
) -> None:
    """A resuming client's follower has the stream's `complete` on its way: a
    revocation then once cancelled that send, and the client lost the end of an
    answer that had ended (and was billed) before the revocation."""
    token = await gw.new_user()
    grant = await gw.init_ok(token, {"query": "late [[mock tokens=6 delay_ms=20]]"})
    async with opened(await gw.get(grant["stream_url"])) as first:
        seen = await events(first, stop_after=2)
    client, _ = await abort_during_the_last_send(
        gw,
        ("GET", grant["stream_url"], {"last-event-id": seen[-1].id}, b""),
        b"event: complete",
        "revoke",
        follower=True,
    )
    got = client.events()
    assert got and got[-1].event == "complete", [e.event for e in got]
