"""`settlement_batch.next_batch` on random queues: companies' bursts, redeliveries of
one webhook id, transcripts past the batch's bound. Pure: the queue's futures are
never awaited."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from control_plane import settlement_batch
from control_plane.settlement_batch import next_batch
from control_plane.webhook_settlement import Delivery
from shared.webhooks import UsageEvent

BOUND = 100  # MAX_BATCH_CHARS for these queues: transcripts of 0-150 cross it


def _delivery(company: str, webhook: int, chars: int) -> Delivery:
    event = UsageEvent(
        jti=f"jti-{webhook}",
        reservation_id=f"r-{webhook}",
        company_id=company,
        user_id="u",
        session_id="s",
        request_id="q",
        model="m",
        provider="mock",
        status="completed",
        finish_reason="stop",
        input_tokens=1,
        output_tokens=1,
        usage_source="upstream",
        started_at="2026-12-02T00:00:00+00:00",
        first_token_at=None,
        ended_at="2026-12-02T00:00:01+00:00",
        content="x" * chars,
    )
    return Delivery(f"w-{webhook}", event, transcripts=True)


queues = st.lists(
    st.tuples(st.sampled_from("abcd"), st.integers(0, 12), st.integers(0, 150)),
    max_size=120,
)


@settings(max_examples=500, deadline=None)
@given(queue=queues, max_batch=st.integers(1, 8))
def test_batches_keep_each_companys_order_bound_and_lose_nothing(
    queue: list[tuple[str, int, int]], max_batch: int
) -> None:
    loop = asyncio.new_event_loop()
    try:
        # A webhook id is one company's (its signed event): a redelivery repeats it.
        owner: dict[int, str] = {}
        items = [(owner.setdefault(w, c), w, n) for c, w, n in queue]
        queued: list[Any] = [
            (_delivery(c, w, n), loop.create_future(), position)
            for position, (c, w, n) in enumerate(items)
        ]
        left = list(queued)
        batches: list[list[Any]] = []
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(settlement_batch, "MAX_BATCH_CHARS", BOUND)
            while left:
                got: list[Any] = next_batch(left, max_batch)
                assert got, "a queue with events gave an empty batch"
                batches.append(got)
                assert len(batches) <= len(queued)
    finally:
        loop.close()
    taken = [q for batch in batches for q in batch]
    # Conservation: every event in exactly one batch.
    assert sorted(position for _, _, position in taken) == list(range(len(queued)))
    for batch in batches:
        assert len(batch) <= max_batch
        weight = sum(len(d.event.content or "") for d, _, _ in batch)
        assert weight <= BOUND or len(batch) == 1
        positions = [position for _, _, position in batch]
        assert positions == sorted(positions)
    # Each company's events settle in their queue order, so a webhook's first
    # delivery is never after its redelivery.
    for company in "abcd":
        order = [p for _, _, p in taken if items[p][0] == company]
        assert order == sorted(order)
    batch_of = {position: n for n, batch in enumerate(batches) for _, _, position in batch}
    for webhook in {w for _, w, _ in items}:
        deliveries = [p for p, (_, w, _) in enumerate(items) if w == webhook]
        assert [batch_of[p] for p in deliveries] == sorted(batch_of[p] for p in deliveries)


@settings(max_examples=200, deadline=None)
@given(burst=st.integers(1, 200), others=st.lists(st.sampled_from("bcd"), max_size=5))
def test_a_company_queued_behind_a_burst_is_in_the_first_batch(
    burst: int, others: list[str]
) -> None:
    """However long A's burst before it, another company's first event goes in the
    next batch (the companies in turn), as long as the batch has room for one each."""
    loop = asyncio.new_event_loop()
    try:
        items = [("a", i, 10) for i in range(burst)] + [
            (c, burst + i, 10) for i, c in enumerate(others)
        ]
        left: list[Any] = [(_delivery(c, w, n), loop.create_future(), None) for c, w, n in items]
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(settlement_batch, "MAX_BATCH_CHARS", BOUND)
            batch = next_batch(left, 8)
    finally:
        loop.close()
    assert {d.event.company_id for d, _, _ in batch} == {"a", *others}
