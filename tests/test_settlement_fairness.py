"""One company's settlements cannot hold another's up for long (`settlement_batch`).

Every company's usage webhooks settle in one shared lane, a batch of up to
`MAX_BATCH` at a time. A company whose streams end together (up to its
`LLMGW_MAX_STREAMS_PER_COMPANY`, 200) with long answers (a report carries up to
1 MiB of transcript, each written into the session) queued batches of 64 large
transcripts, each seconds of the database, and another company's webhook arriving
behind them waited for all of them. On PostgreSQL + Redis, in process.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import orjson

from control_plane.settlement import Outcome
from control_plane.settlement_batch import MAX_BATCH_CHARS, SettlementBatcher
from control_plane.webhook_settlement import Delivery
from shared.webhooks import UsageEvent
from tests.test_control_plane import pg_settings, usage_event
from tests.test_credits_batch import _inits, _owner, _served

A_STREAMS = 96
# Answers of ~900 K characters that do not compress (TOAST would shrink repeats).
ANSWER = os.urandom(450_000).hex()


A_BATCH_LIMIT = MAX_BATCH_CHARS  # what a batch of A's transcripts may weigh
B_CONTENT = "Hello there!"


def _answer_weight(event: UsageEvent) -> int:
    """What `event` writes into its session: its text and its tool calls' JSON."""
    calls = len(orjson.dumps(event.tool_calls)) if event.tool_calls else 0
    return len(event.content or "") + calls


async def _batches_behind_a_burst(
    pg_server: str, **answer: Any
) -> tuple[list[list[tuple[str, int]]], str, str, float]:
    """Company A's `A_STREAMS` streams report `answer` at once, company B's one report
    queued behind them: the batches (each event's company and weight), A, B and how
    long B's webhook took."""
    with pg_settings(pg_server) as settings:
        async with _served(settings) as (app, client):
            a_auth, a = await _owner(client)
            b_auth, b = await _owner(client)
            a_inits = await _inits(client, a_auth, A_STREAMS)
            [b_init] = await _inits(client, b_auth, 1)
            events = [usage_event(i, a, **answer) for i in a_inits]
            events.append(usage_event(b_init, b, content=B_CONTENT))
            deliveries = [Delivery(e.webhook_id, e, transcripts=True) for e in events]

            batcher = SettlementBatcher(app.state.db)
            batches: list[list[tuple[str, int]]] = []
            settle_batch = batcher._settle

            async def seen(batch: list[Any]) -> None:
                batches.append([(d.event.company_id, _answer_weight(d.event)) for d, _, _ in batch])
                await settle_batch(batch)

            batcher._settle = seen  # type: ignore[method-assign]
            b_answered: list[float] = []
            started = time.monotonic()

            async def settle(delivery: Delivery) -> Outcome:
                outcome = await batcher.settle(delivery)
                if delivery.event.company_id == b:
                    b_answered.append(time.monotonic() - started)
                return outcome

            # All queued before the lane's drain takes its first batch.
            results = await asyncio.gather(*(settle(d) for d in deliveries))
            await batcher.close()
    assert all(isinstance(r, Outcome) and not r.duplicate for r in results)
    assert sum(len(batch) for batch in batches) == len(deliveries)
    return batches, a, b, b_answered[0]


async def test_another_companys_settlement_waits_for_no_more_than_one_batchs_transcripts(
    pg_server: str,
) -> None:
    """Company A's 96 streams report 900 K-character answers at once; company B's
    one report is queued behind them. Before: B's event went in the second batch,
    behind 64 of A's (measured on 2 loaded CPUs with 200 of A's: batches of 64 took
    3.1-4.3 s each, B's webhook answered after 11.5 s, 0.02 s alone). Now a batch
    takes the queue's companies in turn and holds at most `MAX_BATCH_CHARS` of
    transcripts: B settles in the first batch, beside at most that much of A's."""
    batches, a, b, b_took = await _batches_behind_a_burst(pg_server, content=ANSWER)
    b_batch = next(i for i, batch in enumerate(batches) if (b, len(B_CONTENT)) in batch)
    a_chars_first = sum(n for batch in batches[: b_batch + 1] for c, n in batch if c == a)
    assert a_chars_first <= MAX_BATCH_CHARS, (
        f"B settled in batch {b_batch} after {a_chars_first:,} characters of A's"
        f" transcripts ({b_took:.2f} s)"
    )
    assert all(sum(n for _, n in batch) <= MAX_BATCH_CHARS or len(batch) == 1 for batch in batches)


async def test_answers_of_tool_calls_weigh_in_a_batch_as_text_does(pg_server: str) -> None:
    """A's 96 streams answer with tool calls alone (900 K characters of arguments,
    no text): the calls are written into the sessions as text is, so they count
    against `MAX_BATCH_CHARS` too. Before: a batch weighed only the text, so A's
    answers went 64 to a batch, ~58 M characters each, the burst the bound was for
    (measured: 57.6 M characters in the first batch)."""
    calls = [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": ANSWER}}]
    batches, _, _, b_took = await _batches_behind_a_burst(pg_server, content="", tool_calls=calls)
    heaviest = max(sum(n for _, n in batch) for batch in batches)
    assert heaviest <= MAX_BATCH_CHARS, (
        f"a batch of {heaviest:,} characters of tool calls (B answered after {b_took:.2f} s)"
    )
