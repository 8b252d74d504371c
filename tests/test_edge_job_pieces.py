"""The stream job's pieces in process: the relay against a recording `RelaySink`, the
webhook status table, and the reporter's store retries (no network, no sockets)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest

from shared.catalog import load_catalog
from shared.retry import Backoff
from shared.store import SlotRelease
from shared.tokens import StreamGrant
from shared.webhooks import UsageEvent
from stream_edge.admission import Route
from stream_edge.attempts import Attempt, Backend
from stream_edge.limits import slot_keys
from stream_edge.meter import Meter
from stream_edge.metrics import EdgeMetrics
from stream_edge.relay import Deadlines, relay
from stream_edge.reporter import ENQUEUE_ATTEMPTS, Reporter
from stream_edge.upstream.base import Delta, UpstreamEvent
from stream_edge.upstream.openai_chat import OpenAIStreamParser
from stream_edge.usage_report import webhook_status


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


def backend() -> Backend:
    catalog = load_catalog(None)
    model = catalog.models["mock-fast"]
    route = Route(model, catalog.providers[model.provider], None, max_tokens=50)
    attempt = Attempt(route, [], {}, 50, 5)
    return Backend(attempt, None, Meter(input_estimate=5, keep_transcript=False), "m", "p")


@dataclass
class FlakyOutbox:
    """Refuses the first `failures` enqueues, as a store that is briefly down."""

    failures: int
    enqueued: list[UsageEvent] = field(default_factory=list)
    kept: list[UsageEvent] = field(default_factory=list)
    refused: int = 0

    async def enqueue(self, event: UsageEvent, release: SlotRelease) -> None:
        if self.refused < self.failures:
            self.refused += 1
            raise ConnectionError("store down")
        self.enqueued.append(event)

    async def keep(self, event: UsageEvent, release: SlotRelease) -> None:
        self.kept.append(event)


@dataclass
class RecordingStore:
    released: list[SlotRelease] = field(default_factory=list)

    async def release_slots(self, release: SlotRelease) -> None:
        self.released.append(release)


@dataclass(frozen=True)
class RecordingBackoff(Backoff):
    """No waiting, and a note of each attempt the reporter waited after."""

    asked: list[int] = field(default_factory=list)

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        self.asked.append(attempt)
        return 0.0


def reporter(outbox: FlakyOutbox, store: RecordingStore, backoff: Backoff) -> Reporter:
    state = SimpleNamespace(metrics=EdgeMetrics(), outbox=outbox, store=store)
    return Reporter(state, GRANT, accepted_at=0.0, backoff=backoff)  # type: ignore[arg-type]


async def test_the_report_retries_a_refused_enqueue_with_the_backoff() -> None:
    outbox, store, backoff = (
        FlakyOutbox(failures=ENQUEUE_ATTEMPTS - 1),
        RecordingStore(),
        RecordingBackoff(),
    )
    job = reporter(outbox, store, backoff)
    await job.report(backend(), "completed")
    await job.report(backend(), "failed")  # once only
    assert [e.status for e in outbox.enqueued] == ["completed"]
    assert backoff.asked == list(range(ENQUEUE_ATTEMPTS - 1))
    assert outbox.kept == [] and store.released == []


async def test_a_report_the_store_keeps_refusing_is_spooled_and_the_slots_freed() -> None:
    outbox, store = FlakyOutbox(failures=ENQUEUE_ATTEMPTS), RecordingStore()
    await reporter(outbox, store, RecordingBackoff()).report(backend(), "cancelled")
    assert outbox.enqueued == []
    assert [e.status for e in outbox.kept] == ["cancelled"]
    assert store.released == [SlotRelease(slot_keys(GRANT), "j")]
