"""Malformed resumes and unexpected exceptions at the edge, in one process (no
sockets): a bad `Last-Event-ID` is a 400 that burns nothing, and an exception nobody
foresaw while opening or relaying still ends the stream OpenAI-shaped, reported and
with its slots back; a stream cut off before its first frame closes the
backend's answer. Moved from test_edge_stream_lifecycle.py, whose remaining
tests need a real socket (bodies too large to read, many reconnecting clients)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import asdict
from typing import Any
from urllib.parse import quote

import orjson
import pytest
import pytest_asyncio

from shared.route_claim import UpstreamRoute
from shared.tokens import sign_token
from stream_edge.transport import RemoteProtocolError
from tests.inproc import Gateway, events, eventually, gateway_env, opened
from tests.token_claims import claims_of

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def gw(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Gateway]:
    tmp = tmp_path_factory.mktemp("edge-errors")
    env = gateway_env(
        str(tmp),
        LLMGW_MAX_STREAMS_PER_USER="2",
        LLMGW_WEBHOOK_RETRY_BASE_SECONDS="0.05",
        LLMGW_WEBHOOK_RETRY_CAP_SECONDS="0.5",
    )
    async with Gateway(env) as gateway:
        yield gateway


async def status_and_body(gw: Gateway, url: str, headers: dict[str, str] | None = None) -> Any:
    async with opened(await gw.get(url, headers)) as response:
        return response.status_code, await response.aread()


@pytest.mark.parametrize(
    ("where", "value"),
    [
        ("header", "\xb2"),  # '²' in Latin-1: a digit to str.isdigit, not to int()
        ("query", "²"),
        ("header", "1" + "0" * 23),  # 10^23: beyond any store index
        ("header", "9" * 5000),  # beyond Python's int() digit limit
        ("header", "-1"),
    ],
    ids=["superscript-header", "superscript-query", "1e23", "5000-digits", "negative"],
)
async def test_a_malformed_last_event_id_is_a_400_and_burns_nothing(
    gw: Gateway, where: str, value: str
) -> None:
    grant = await gw.init_ok(await gw.new_user(), {"query": "resume me [[mock tokens=2]]"})
    if where == "header":
        status, body = await status_and_body(gw, grant["stream_url"], {"Last-Event-ID": value})
    else:
        url = f"{grant['stream_url']}&last_event_id={quote(value)}"
        status, body = await status_and_body(gw, url)
    assert status == 400, body
    assert orjson.loads(body)["error"]["code"] == "invalid_last_event_id"
    status, body = await status_and_body(gw, grant["stream_url"])
    assert status == 200 and b"event: complete" in body


@pytest.mark.parametrize("path", ["completions", "eventsource"])
async def test_an_unexpected_failure_while_opening_is_openai_shaped_reported_and_frees_slots(
    gw: Gateway, path: str
) -> None:
    access = await gw.new_user()
    kid, key = gw.cp.state.keyring.active()
    route = UpstreamRoute(
        provider="acme",
        api_type="openai_chat",
        base_url=gw.settings().catalog.providers["mock"].base_url,
        upstream_model="mock-fast",
        api_key="sk-ключ",  # not Latin-1: cannot go into an HTTP header
    )
    cipher = gw.edge_state().route_cipher
    sealed = cipher.encrypt(orjson.dumps(asdict(route))).decode()
    for _ in range(3):  # one more than the user's 2 slots: a leak would show as 429
        grant = await gw.init_ok(access, {"query": "my key [[mock tokens=2]]"})
        claims = claims_of(grant["stream_token"])
        token = sign_token({**claims, "upr": sealed}, key, kid)
        if path == "completions":
            body = {"stream": True, "messages": [{"role": "user", "content": "hi"}]}
            response = await gw.post(
                "/v1/chat/completions", orjson.dumps(body), {"Authorization": f"Bearer {token}"}
            )
            async with opened(response):
                status, text = response.status_code, await response.aread()
        else:
            status, text = await status_and_body(gw, f"http://edge.test/v1/stream?token={token}")
        assert 500 <= status < 600, text
        error = orjson.loads(text)["error"]
        assert set(error) == {"message", "type", "code"}
        assert "ключ" not in text.decode()
        record = await gw.wait_usage(access, grant["reservation_id"])
        assert (record["status"], record["cost"]) == ("failed", "0.000000")
    assert (await gw.credits(access))["held"] == "0.000000"
    fine = await gw.init_ok(access, {"query": "after [[mock tokens=2]]"})
    assert (await status_and_body(gw, fine["stream_url"]))[0] == 200


def on_the_fourth_read(monkeypatch: pytest.MonkeyPatch, change: Callable[[bytes], bytes]) -> None:
    """What the edge's OpenAI parser reads fourth in each stream goes through `change`
    (per parser: other streams may still run on this edge)."""
    from stream_edge.upstream.openai_chat import OpenAIStreamParser

    feed = OpenAIStreamParser.feed
    reads: dict[int, int] = {}

    def fourth_changed(self: OpenAIStreamParser, chunk: bytes) -> Any:
        reads[id(self)] = reads.get(id(self), 0) + 1
        return feed(self, change(chunk) if reads[id(self)] == 4 else chunk)

    monkeypatch.setattr(OpenAIStreamParser, "feed", fourth_changed)


async def test_an_unexpected_failure_while_relaying_ends_with_an_error_event_and_a_report(
    gw: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    def breaks(chunk: bytes) -> bytes:
        raise RuntimeError("a parser bug")

    on_the_fourth_read(monkeypatch, breaks)
    access = await gw.new_user()
    grant = await gw.init_ok(access, {"query": "breaks [[mock tokens=20]]"})
    async with opened(await gw.get(grant["stream_url"])) as response:
        assert response.status_code == 200
        got = await events(response)
    assert got[-1].event == "error"
    assert orjson.loads(got[-1].data)["code"] == "upstream_error"
    record = await gw.wait_usage(access, grant["reservation_id"])
    assert record["status"] == "failed"
    monkeypatch.undo()
    for _ in range(2):  # both of the user's slots are free again
        fine = await gw.init_ok(access, {"query": "after [[mock tokens=2]]"})
        assert (await status_and_body(gw, fine["stream_url"]))[0] == 200


async def test_an_endless_line_from_the_backend_ends_with_an_error_event_and_a_report(
    gw: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    from shared.sse import MAX_LINE

    on_the_fourth_read(monkeypatch, lambda chunk: b"data: " + b"x" * MAX_LINE)
    access = await gw.new_user()
    grant = await gw.init_ok(access, {"query": "endless [[mock tokens=20]]"})
    async with opened(await gw.get(grant["stream_url"])) as response:
        assert response.status_code == 200
        got = await events(response)
    assert got[-1].event == "error"
    error = orjson.loads(got[-1].data)
    assert (error["code"], error["message"]) == (
        "upstream_error",
        "the backend sent an event or line over 1 MiB",
    )
    record = await gw.wait_usage(access, grant["reservation_id"])
    assert record["status"] == "failed"


async def test_an_event_stream_cut_off_before_its_first_frame_closes_the_backend_answer(
    gw: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client is gone at the very first write (the retry hint), before the pump
    took the backend's answer: the answer is closed there, else its connection stays
    taken until the backend ends it; the stream is still reported and its slots
    freed."""
    from stream_edge import eventsource
    from stream_edge.jobs import StreamJob
    from stream_edge.streaming import Emit, EventStreamResponse

    closed: list[str] = []
    open_backend = StreamJob.open

    async def spied_open(self: StreamJob, stream: bool) -> Any:
        response = await open_backend(self, stream)
        close = response.aclose

        async def aclose() -> None:
            closed.append(self.grant.reservation_id)
            await close()

        monkeypatch.setattr(response, "aclose", aclose)
        return response

    def gone_at_first_write(produce: Any, *args: Any, **kwargs: Any) -> EventStreamResponse:
        async def cut(emit: Emit) -> None:
            async def gone(frame: bytes) -> None:
                raise OSError("the client disconnected")

            await produce(gone)

        return EventStreamResponse(cut, *args, **kwargs)

    monkeypatch.setattr(StreamJob, "open", spied_open)
    monkeypatch.setattr(eventsource, "EventStreamResponse", gone_at_first_write)
    access = await gw.new_user()
    grant = await gw.init_ok(access, {"query": "cut off [[mock tokens=20]]"})
    async with opened(await gw.get(grant["stream_url"])) as response:
        await response.aread()
    record = await gw.wait_usage(access, grant["reservation_id"])
    assert closed == [grant["reservation_id"]]
    assert record["status"] == "cancelled"  # the client left
    monkeypatch.undo()
    for _ in range(2):  # both of the user's slots are free again
        fine = await gw.init_ok(access, {"query": "after [[mock tokens=2]]"})
        assert (await status_and_body(gw, fine["stream_url"]))[0] == 200


async def test_a_completions_stream_refused_its_first_send_closes_the_backend_answer(
    gw: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client is gone when the response starts: the server's `send` raises
    (ASGI 2.4: an `OSError` on a closed connection), so the producer, which hands the
    backend's answer to the pump that closes it, never runs. Measured before the fix:
    the answer was never closed, the backend generated all of it for nobody (its
    request `completed`, 30 tokens, none billed: the report says `cancelled`, output
    0); on a pooled connection, the socket stays taken until the backend ends."""
    from stream_edge import routes
    from stream_edge.streaming import EventStreamResponse

    class RefusedStart(EventStreamResponse):
        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            async def closed(message: Any) -> None:
                raise OSError("the client disconnected")

            await super().__call__(scope, receive, closed)

    monkeypatch.setattr(routes, "EventStreamResponse", RefusedStart)
    access = await gw.new_user()
    messages = [{"role": "user", "content": "gone at once [[mock tokens=30 delay_ms=5]]"}]
    grant = await gw.init_ok(access, {"messages": messages})
    stats = gw.mock.state.mock.stats
    completed_before = stats.completed
    body = orjson.dumps({"model": "mock-fast", "messages": messages, "stream": True})
    headers = {"Authorization": f"Bearer {grant['stream_token']}"}
    with pytest.raises(RemoteProtocolError):  # no response ever started
        await gw.post("/v1/chat/completions", body, headers)
    record = await gw.wait_usage(access, grant["reservation_id"])
    assert record["status"] == "cancelled"
    await eventually(lambda: stats.active == 0, "the backend's answer ended")
    assert stats.completed == completed_before  # closed, not generated to its end
