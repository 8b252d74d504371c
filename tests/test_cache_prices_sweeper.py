"""The sweeper prices a dead edge's checkpoint as a webhook would (DESIGN §5, §11
"Prices"): cache reads and writes at their own rates, the split on the usage record.

The edge side is the real one — Anthropic's parser, the meter, the checkpointer —
writing into the control plane's own store; the edge then "dies": its report never
comes, and the sweeper settles from what it left. A twin reservation gets the report
that edge would have sent, and the two charges must agree.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml

from control_plane.sweeper import sweep_expired_holds
from control_plane.tables import utcnow
from shared.checkpoints import UsageCheckpoint, checkpoint_key
from shared.tokens import StreamGrant
from stream_edge.checkpoints import Checkpointer
from stream_edge.meter import Meter
from stream_edge.upstream.anthropic_messages import AnthropicStreamParser
from stream_edge.upstream.base import StreamParser
from stream_edge.upstream.gemini import GeminiStreamParser
from stream_edge.upstream.openai_chat import OpenAIStreamParser
from stream_edge.usage_report import usage_event
from tests.inproc import eventually
from tests.test_cache_prices import CATALOG
from tests.test_control_plane import CP, data_of, micro, start_cp
from tests.token_claims import claims_of

D = Decimal
# 10 fresh input tokens, 900 read from the cache (at a tenth of the input rate), 90
# written to it (at 1.25 times), as Anthropic's `message_start` reports them.
MESSAGE_START = (
    b'{"type":"message_start","message":{"usage":{"input_tokens":10,'
    b'"cache_read_input_tokens":900,"cache_creation_input_tokens":90,"output_tokens":1}}}'
)
TEXT = b'{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"word "}}'
MESSAGE_DELTA = (
    b'{"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":40}}'
)
ANTHROPIC = [MESSAGE_START, *[TEXT] * 30, MESSAGE_DELTA]
# OpenAI reports its usage in the last chunk only: 600 of 1000 input tokens cached, 40
# output tokens of which 25 reasoning.
OPENAI = [
    *[b'{"choices":[{"index":0,"delta":{"content":"word "}}]}'] * 30,
    b'{"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}',
    b'{"choices":[],"usage":{"prompt_tokens":1000,"completion_tokens":40,'
    b'"prompt_tokens_details":{"cached_tokens":600},'
    b'"completion_tokens_details":{"reasoning_tokens":25}}}',
]
GEMINI = [
    *[b'{"candidates":[{"content":{"parts":[{"text":"word "}]}}]}'] * 30,
    b'{"candidates":[{"content":{"parts":[{"text":"."}]},"finishReason":"STOP"}],'
    b'"usageMetadata":{"promptTokenCount":1000,"cachedContentTokenCount":700,'
    b'"candidatesTokenCount":15,"thoughtsTokenCount":25}}',
]
FIELDS = (
    "input_tokens",
    "output_tokens",
    "cached_input_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
)


@pytest.fixture(scope="module")
def cp(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CP]:
    tmp_path: Path = tmp_path_factory.mktemp("cache-sweeper")
    models = tmp_path / "models.yaml"
    models.write_text(yaml.safe_dump(CATALOG))
    with start_cp(request, tmp_path, "sqlite", {"LLMGW_MODELS_FILE": str(models)}) as handle:
        yield handle


def _grant(init: dict[str, Any]) -> StreamGrant:
    return StreamGrant.from_claims(claims_of(init["stream_token"]))


def _init(client: Any) -> dict[str, Any]:
    body = {"query": "x " * 999, "max_tokens": 500}
    return dict(data_of(client.post("/v1/chat/init", json=body), 201))


def _meter(frames: list[bytes], parser: StreamParser | None = None) -> Meter:
    """A stream's meter after `frames` (Anthropic's unless `parser` says), as the
    edge's relay feeds it."""
    openai = isinstance(parser, OpenAIStreamParser)
    meter = Meter(input_estimate=1000, keep_transcript=False, delta_is_token=openai)
    parser = parser or AnthropicStreamParser()
    for frame in frames:
        for event in parser.feed(b"data: " + frame + b"\n\n"):
            meter.record(event)
    return meter


def _checkpoint_then_die(cp: CP, init: dict[str, Any], meter: Meter, *, ended: bool) -> None:
    """The edge's checkpointer writes (the heartbeat's first beat, or the ended
    checkpoint), then the process is gone: no report."""
    store = cp.app.state.store

    async def write() -> None:
        checkpointer = Checkpointer(store, _grant(init), meter, ttl_seconds=600)
        if ended:
            await checkpointer.close()
            return
        checkpointer.start()
        await eventually(
            lambda: store.get(checkpoint_key(init["reservation_id"])), "the first beat is written"
        )
        await checkpointer.close()  # stops the beats; then "un-end" it, as a kill would
        raw = await store.get(checkpoint_key(init["reservation_id"]))
        assert raw is not None
        point = UsageCheckpoint.loads(raw)
        await store.set(
            checkpoint_key(init["reservation_id"]),
            UsageCheckpoint(**{**_fields(point), "ended": False}).dumps(),
            600,
        )

    cp.on_loop(write)


def _fields(point: UsageCheckpoint) -> dict[str, Any]:
    return {name: getattr(point, name) for name in UsageCheckpoint.__dataclass_fields__}


def _sweep(cp: CP) -> None:
    state = cp.app.state
    later = utcnow() + timedelta(days=1)  # past every hold's deadline
    cp.on_loop(lambda: sweep_expired_holds(state.db, state.store, state.metrics, now=later))


def _item(client: Any, reservation_id: str) -> dict[str, Any]:
    items = data_of(client.get("/v1/usage", params={"limit": 200}))["items"]
    found: dict[str, Any] = next(i for i in items if i["reservation_id"] == reservation_id)
    return found


def _swept_and_reported(cp: CP, meter: Meter, *, ended: bool, status: str) -> tuple[Any, Any]:
    """The usage items of a swept reservation and of its twin settled by the report
    the edge would have sent from the same meter."""
    client, _ = cp.owner_client()
    swept, reported = _init(client), _init(client)
    _checkpoint_then_die(cp, swept, meter, ended=ended)
    event = usage_event(_grant(reported), "anthropic", meter, status)
    assert cp.webhook(event).status_code == 200
    _sweep(cp)
    return _item(client, swept["reservation_id"]), _item(client, reported["reservation_id"])


@pytest.mark.parametrize(
    ("parser", "frames", "usage", "cost"),
    [
        # 10 fresh + 900 cache reads at 0.1 + 90 cache writes at 1.25, 40 out at 2.
        (AnthropicStreamParser, ANTHROPIC, [1000, 40, 900, 90, 0], 293),
        # 400 fresh + 600 cached at 0.1, 40 out (25 of them reasoning) at 2.
        (OpenAIStreamParser, OPENAI, [1000, 40, 600, 0, 25], 540),
        # 300 fresh + 700 cached at 0.1, 15 + 25 thinking out at 2.
        (GeminiStreamParser, GEMINI, [1000, 40, 700, 0, 25], 450),
    ],
)  # fmt: skip
def test_a_lost_report_is_swept_at_the_cache_rates_it_would_have_paid(
    cp: CP, parser: Any, frames: list[bytes], usage: list[int], cost: int
) -> None:
    """The stream ended with the vendor's usage (most of the input a cache read), the
    ended checkpoint was written, and the edge died before its report reached the
    outbox: the sweeper bills what the report would have (each part at its rate, the
    vendor's output count), and the usage record shows the same split. It billed
    every input token at the full input rate, and the relayed estimate of the
    output: 1132 micro-credits for Anthropic's 293."""
    meter = _meter(frames, parser())
    swept, reported = _swept_and_reported(cp, meter, ended=True, status="completed")
    assert micro(reported["cost"]) == cost
    assert [reported[f] for f in FIELDS] == usage
    assert micro(swept["cost"]) == cost
    assert [swept[f] for f in FIELDS] == usage
    assert (swept["status"], swept["usage_source"]) == ("failed", "estimated")


def test_a_stream_cut_mid_way_is_billed_the_input_anthropic_counted(cp: CP) -> None:
    """Killed (or left by its client) mid-stream, before the vendor's final usage:
    `message_start` already gave the input and its cache parts, and both the sweeper
    and the cancelled report bill those at their rates, plus the relayed output. They
    billed the hold's input estimate at the full input rate: 1132 against 345."""
    meter = _meter([MESSAGE_START, *[TEXT] * 30])
    swept, reported = _swept_and_reported(cp, meter, ended=False, status="cancelled")
    output = swept["output_tokens"]
    assert output == meter.relayed_tokens > 0
    assert [swept[f] for f in FIELDS] == [reported[f] for f in FIELDS] == [1000, output, 900, 90, 0]
    cost = 10 * 1 + 900 * D("0.1") + 90 * D("1.25") + output * 2
    assert micro(swept["cost"]) == micro(reported["cost"]) == math.ceil(cost)


def test_a_checkpoint_whose_split_exceeds_its_whole_still_settles(cp: CP) -> None:
    """A checkpoint claiming more cached tokens than input (a broken or tampered
    store entry) would price tokens never used, or make the pricing refuse it on
    every sweep, holding up the holds behind it: its split is dropped and its totals
    are billed at the plain rates, as the sweeper billed every checkpoint before."""
    client, _ = cp.owner_client()
    init = _init(client)
    grant = _grant(init)
    point = UsageCheckpoint(grant.jti, grant.reservation_id, 100, 50, "t", beat=3,
                            cached_input_tokens=10**6, reasoning_tokens=51)  # fmt: skip
    store = cp.app.state.store
    cp.on_loop(lambda: store.set(checkpoint_key(grant.reservation_id), point.dumps(), 600))
    _sweep(cp)
    item = _item(client, grant.reservation_id)
    assert [item[f] for f in FIELDS] == [100, 50, 0, 0, 0]
    assert micro(item["cost"]) == 100 * 1 + 50 * 2
    assert data_of(client.get("/v1/me"))["credits"]["held"] == "0.000000"


@pytest.mark.parametrize(
    ("extra", "parts"),
    [
        (b"", (0, 0, 0)),  # an older edge's checkpoint, in a rolling deploy
        (b',"cached_input_tokens":60,"cache_write_tokens":40,"reasoning_tokens":2', (60, 40, 2)),
        (b',"cached_input_tokens":61,"cache_write_tokens":40,"reasoning_tokens":2', (0, 0, 2)),
        (b',"cached_input_tokens":-5,"cache_write_tokens":true,"reasoning_tokens":3', (0, 0, 0)),
        (b',"cached_input_tokens":"9","cache_write_tokens":1.5,"reasoning_tokens":null', (0, 0, 0)),
    ],
)  # fmt: skip
def test_checkpoint_parts_load_within_their_wholes(extra: bytes, parts: tuple[int, ...]) -> None:
    raw = b'{"jti":"j","reservation_id":"r","input_tokens":100,"output_tokens":2,"updated_at":"t"'
    point = UsageCheckpoint.loads(raw + extra + b"}")
    assert (point.input_tokens, point.output_tokens) == (100, 2)
    assert (point.cached_input_tokens, point.cache_write_tokens, point.reasoning_tokens) == parts
    assert UsageCheckpoint.loads(point.dumps()) == point
