"""The stream job's pieces in process: the relay against a recording `RelaySink`, the
webhook status table, and the reporter's store retries on the memory store and a real
outbox, which posts through the in-process transport (no network, no sockets)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import orjson
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route as HttpRoute

from shared.catalog import load_catalog
from shared.retry import Backoff
from shared.store import Admission, SlotRelease
from shared.store_memory import MemoryStore
from shared.tokens import StreamGrant
from shared.webhooks import generate_secret, verify
from stream_edge.admission import Route
from stream_edge.attempts import Attempt, Backend
from stream_edge.limits import slot_keys
from stream_edge.memory_transport import InMemoryTransport
from stream_edge.meter import Meter
from stream_edge.metrics import EdgeMetrics
from stream_edge.outbox import Outbox
from stream_edge.relay import Deadlines, relay
from stream_edge.reporter import ENQUEUE_ATTEMPTS, Reporter
from stream_edge.spool import Spool
from stream_edge.upstream.base import Delta, UpstreamEvent
from stream_edge.upstream.openai_chat import OpenAIStreamParser
from stream_edge.usage_report import webhook_status
from tests.inproc import eventually


def chunk(doc: str) -> bytes:
    return b"data: " + doc.encode() + b"\n\n"


ROLE = chunk('{"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}')
HEL = chunk('{"choices":[{"index":0,"delta":{"content":"Hel"}}]}')
LO = chunk('{"choices":[{"index":0,"delta":{"content":"lo"}}]}')
STOP = chunk('{"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}')
USAGE = chunk('{"choices":[],"usage":{"prompt_tokens":9,"completion_tokens":2}}')
ERROR = chunk('{"error":{"message":"overloaded"}}')
DONE = b"data: [DONE]\n\n"
LONG = Deadlines(first_token=60.0, idle=60.0, max_life=600.0)


class ScriptedResponse:
    """The backend's body as `relay` reads it: these chunks, then the end (or, with
    `hang`, no end: it waits forever after them)."""

    def __init__(self, *chunks: bytes, hang: bool = False) -> None:
        self._chunks = chunks
        self._hang = hang

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        for data in self._chunks:
            yield data
        if self._hang:
            await asyncio.Event().wait()


@dataclass
class RecordingSink:
    """A `RelaySink` that writes `<kind>:<text>;` frames and records every call."""

    calls: list[tuple[str, bytes]] = field(default_factory=list)

    def write(self, event: UpstreamEvent) -> bytes:
        if isinstance(event, Delta):
            return f"delta:{event.text};".encode()
        return b"" if type(event).__name__ == "Passthrough" else type(event).__name__.encode()

    async def emit(self, data: bytes) -> None:
        self.calls.append(("emit", data))

    def first_token(self) -> None:
        self.calls.append(("first_token", b""))

    def chunk_sent(self) -> None:
        self.calls.append(("chunk_sent", b""))


async def run_relay(response: ScriptedResponse, deadlines: Deadlines = LONG) -> Any:
    sink = RecordingSink()
    meter = Meter(input_estimate=5, keep_transcript=False)
    parser = OpenAIStreamParser()
    result = await relay(response, parser, meter, sink, EdgeMetrics(), deadlines)  # type: ignore[arg-type]
    return result, sink.calls, meter


async def test_a_whole_stream_goes_to_the_sink_chunk_by_chunk() -> None:
    result, calls, meter = await run_relay(ScriptedResponse(ROLE + HEL, LO + STOP, USAGE + DONE))
    assert result.status == "completed"
    assert calls == [
        ("emit", b"delta:Hel;"),
        ("chunk_sent", b""),
        ("first_token", b""),  # after the client has the token
        ("emit", b"delta:lo;Finish"),
        ("chunk_sent", b""),
        ("emit", b"Usage"),
        ("chunk_sent", b""),
    ]
    assert (meter.deltas, meter.finish_reason) == (2, "stop")


async def test_a_chunk_with_nothing_to_send_emits_nothing() -> None:
    _, calls, _ = await run_relay(ScriptedResponse(ROLE, HEL, STOP + DONE))
    assert [name for name, _ in calls] == [
        "emit", "chunk_sent", "first_token", "emit", "chunk_sent",
    ]  # fmt: skip
    assert calls[0] == ("emit", b"delta:Hel;")


async def test_a_failure_event_sends_what_came_before_it_then_fails() -> None:
    result, calls, _ = await run_relay(ScriptedResponse(HEL + ERROR + LO))
    assert (result.status, result.error_code) == ("failed", "upstream_error")
    assert calls == [("emit", b"delta:Hel;"), ("first_token", b"")]


async def test_a_stream_that_ends_without_its_end_fails() -> None:
    result, calls, _ = await run_relay(ScriptedResponse(HEL))
    assert (result.status, result.error_message) == (
        "failed",
        "the backend's stream ended early",
    )
    assert ("first_token", b"") in calls


async def test_no_first_token_within_its_deadline_fails_without_calling_the_sink() -> None:
    expired = Deadlines(first_token=0.0, idle=60.0, max_life=600.0)
    result, calls, _ = await run_relay(ScriptedResponse(ROLE, hang=True), expired)
    assert (result.status, result.error_code) == ("failed", "upstream_timeout")
    assert result.error_message == "the backend sent no first token in time"
    assert calls == []


@pytest.mark.parametrize(
    ("completed", "outcome", "status"),
    [
        (True, "finished", "completed"),
        (True, "client_gone", "completed"),  # the answer was whole before the client left
        (False, "finished", "failed"),
        (False, "aborted", "failed"),
        (False, "client_gone", "cancelled"),
        (False, "slow_client", "cancelled"),
        (False, "revoked", "revoked"),
    ],
)
def test_webhook_status(completed: bool, outcome: str, status: str) -> None:
    assert webhook_status(completed, outcome) == status


GRANT = StreamGrant(
    jti="j", user_id="u", company_id="c", role="member", scopes=("llm:chat:send",),
    session_id="s", model="mock-fast", max_tokens=50, max_input_tokens=30,
    reservation_id="r", request_id="q", issued_at=0, expires_at=0,
)  # fmt: skip
SECRET = generate_secret()
WEBHOOK_URL = "http://cp.test/v1/webhooks/usage"


def backend() -> Backend:
    catalog = load_catalog(None)
    model = catalog.models["mock-fast"]
    route = Route(model, catalog.providers[model.provider], None, max_tokens=50)
    attempt = Attempt(route, [], {}, 50, 5)
    return Backend(attempt, None, Meter(input_estimate=5, keep_transcript=False), "m", "p")


class FlakyStore(MemoryStore):
    """The real memory store, refusing its first `failures` outbox writes, as a store
    that is briefly down (every other command works)."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    async def outbox_put(
        self, item_id: str, payload: bytes, due_at: float, release: SlotRelease | None = None
    ) -> None:
        if self.failures > 0:
            self.failures -= 1
            raise ConnectionError("store down")
        await super().outbox_put(item_id, payload, due_at, release)


class SilentStore(MemoryStore):
    """A store that takes outbox writes and never answers them (a partition, a
    failover to an address gone silent); every other command works."""

    async def outbox_put(
        self, item_id: str, payload: bytes, due_at: float, release: SlotRelease | None = None
    ) -> None:
        await asyncio.Event().wait()


@dataclass
class Receiver:
    """The control plane's usage webhook, in process: records what is posted."""

    posted: list[tuple[dict[str, str], bytes]] = field(default_factory=list)

    async def hook(self, request: Request) -> Response:
        self.posted.append((dict(request.headers), await request.body()))
        return JSONResponse({"ok": True})

    def statuses(self) -> list[str]:
        for headers, body in self.posted:  # signed with the webhook secret
            verify([SECRET], body, headers)
        return [orjson.loads(body)["data"]["status"] for _, body in self.posted]


@dataclass(frozen=True)
class RecordingBackoff(Backoff):
    """No waiting, and a note of each attempt the reporter waited after."""

    asked: list[int] = field(default_factory=list)

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        self.asked.append(attempt)
        return 0.0


@dataclass
class Edge:
    """A reporter's surroundings: the store, a real outbox posting through the
    in-process transport to `receiver`, its spool, and a stream holding its slots."""

    store: MemoryStore
    outbox: Outbox
    spool: Spool
    receiver: Receiver

    async def admit(self) -> None:
        now = time.time()
        admitted = await self.store.admit(
            Admission(
                revocation_keys=[], used_key="used:j", path="stream", used_ttl_seconds=60,
                slot_keys=slot_keys(GRANT), limits=[10, 10], member=GRANT.jti, now=now,
                slots_expire_at=now + 60,
            )
        )  # fmt: skip
        assert admitted.verdict == "ok"

    async def slots_held(self) -> list[list[str]]:
        return [await self.store.bounded_members(key) for key in slot_keys(GRANT)]

    def reporter(self, backoff: Backoff) -> Reporter:
        state = SimpleNamespace(
            metrics=EdgeMetrics(),
            outbox=self.outbox,
            store=self.store,
            reports_owed=0,
            store_clock=time.time,  # `EdgeState`'s default
        )
        return Reporter(state, GRANT, accepted_at=0.0, backoff=backoff)  # type: ignore[arg-type]

    def spooled(self) -> list[dict[str, Any]]:
        return [orjson.loads(line) for path in self.spool.claim() for line in self.spool.read(path)]


def edge(tmp_path: Path, failures: int, store: MemoryStore | None = None) -> Edge:
    receiver = Receiver()
    cp = Starlette(routes=[HttpRoute("/v1/webhooks/usage", receiver.hook, methods=["POST"])])
    transport = InMemoryTransport({WEBHOOK_URL: cp})
    store, spool = store or FlakyStore(failures), Spool(tmp_path / "spool")
    outbox = Outbox(store, transport, WEBHOOK_URL, SECRET, EdgeMetrics(), spool=spool)
    return Edge(store, outbox, spool, receiver)


async def test_the_report_retries_a_refused_enqueue_with_the_backoff(tmp_path: Path) -> None:
    e, backoff = edge(tmp_path, failures=ENQUEUE_ATTEMPTS - 1), RecordingBackoff()
    await e.admit()
    job = e.reporter(backoff)
    assert job.state.reports_owed == 1  # owed from admission: the shutdown waits for it
    await job.report(backend(), "completed")
    await job.report(backend(), "failed")  # once only
    assert job.state.reports_owed == 0
    assert backoff.asked == list(range(ENQUEUE_ATTEMPTS - 1))
    # Stored with the slots given back in the same write, then posted and acknowledged.
    assert await e.store.outbox_size() == 1
    assert await e.slots_held() == [[], []]
    assert await e.outbox.flush(timeout=30) == 0
    assert e.receiver.statuses() == ["completed"]
    assert not e.spool.has_pending()


async def test_a_store_that_never_answers_gets_the_report_spooled_within_the_budget(
    tmp_path: Path,
) -> None:
    """The stream's end is cut off after 10 s; a store that stays silent longer must not
    take the report down with it: past the enqueue budget it goes to the spool."""
    e = edge(tmp_path, failures=0, store=SilentStore())
    await e.admit()
    job = e.reporter(RecordingBackoff())
    job.enqueue_budget = 0.05
    await job.report(backend(), "completed")
    [record] = e.spooled()  # kept until the store takes it
    assert record["item"]["id"] == f"usage_{GRANT.jti}"
    await eventually(lambda: e.receiver.posted, "the direct post")
    assert e.receiver.statuses() == ["completed"]  # posted directly
    assert await e.slots_held() == [[], []]
    # The shutdown's flush tries the spool too, bounded: the silent store takes at
    # most half its time, and the report goes to the control plane directly (a
    # duplicate it recognises by its id) rather than with the pod's disk.
    await e.outbox.flush(timeout=1.0)
    assert e.receiver.statuses() == ["completed", "completed"]
    assert not e.spool.has_pending()


async def test_a_report_the_store_keeps_refusing_is_spooled_and_the_slots_freed(
    tmp_path: Path,
) -> None:
    e = edge(tmp_path, failures=ENQUEUE_ATTEMPTS)
    await e.admit()
    await e.reporter(RecordingBackoff()).report(backend(), "cancelled")
    assert await e.store.outbox_size() == 0
    assert await e.slots_held() == [[], []]  # freed on their own, not with the report
    [record] = e.spooled()  # kept until the store takes it
    assert orjson.loads(record["item"]["body"])["data"]["status"] == "cancelled"
    assert record["release"] == {"slot_keys": slot_keys(GRANT), "member": GRANT.jti}
    await eventually(lambda: e.receiver.posted, "the direct post")
    assert e.receiver.statuses() == ["cancelled"]  # posted directly
    # The store answers again: the shutdown's flush moves the spool into it and
    # delivers from there (a duplicate the control plane recognises by its id).
    assert await e.outbox.flush(timeout=30) == 0
    assert e.receiver.statuses() == ["cancelled", "cancelled"]
    assert not e.spool.has_pending()
