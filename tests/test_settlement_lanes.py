"""One company's locked row against everyone's usage webhooks (`settlement_batch`).

Webhooks that arrive together settle together, one batch at a time. A company whose
row stays busy (its own long transactions: a team of 1,000 members swapped, ~1 s
under the row lock, thirty at once, with its admin writes queued behind) made every
webhook of its that reached the shared queue wait for the row, and every other
company's webhooks queued behind it. Here the company's transaction is stood in for
by a connection of the test holding the row, as in `test_db_shares`. PostgreSQL only.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.polling import wait_until
from tests.test_control_plane import CP, data_of, start_cp, usage_event
from tests.test_db_shares import TIMEOUT_S, _init, _lock_waiters, _row_held


@pytest.fixture
def pg_cp(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[CP]:
    with start_cp(
        request, tmp_path, "postgres", {"LLMGW_DATABASE_TIMEOUT_SECONDS": TIMEOUT_S}
    ) as h:
        yield h


def test_a_company_whose_row_stalled_a_settlement_settles_apart_from_the_others(
    pg_cp: CP,
) -> None:
    """A's row is held while A's usage webhooks arrive. The first waits for the row
    to the database's bound (a 503 the edge retries), and B's webhook, arriving
    meanwhile, waits its turn. Before, every later webhook of A's went into the shared
    queue too, each holding up B's again for as long. Now a company whose settlement
    met a held row settles on a lane of its own for a while: A's next webhook waits
    for its row alone, B's settles at once, and A's settles once the row is free."""
    a, a_id = pg_cp.owner_client("1000")
    b, b_id = pg_cp.owner_client("1000")
    a_events = [usage_event(data_of(_init(a), 201), a_id) for _ in range(2)]
    b_events = [usage_event(data_of(_init(b), 201), b_id) for _ in range(2)]
    with ThreadPoolExecutor(2) as pool, _row_held(pg_cp, a_id) as watcher:
        first = pool.submit(pg_cp.webhook, a_events[0])
        wait_until(lambda: _lock_waiters(watcher) == 1, "A's settlement never reached its row")
        assert pg_cp.webhook(b_events[0]).status_code == 200
        # Past the bound: a 503 the edge retries (its statement waits on in PostgreSQL).
        assert first.result().status_code == 503
        # The row still held: A's next webhook waits for it, B's does not wait for A's.
        second = pool.submit(pg_cp.webhook, a_events[1])
        wait_until(lambda: _lock_waiters(watcher) == 2, "A's next settlement never waited")
        r = pg_cp.webhook(b_events[1])
        assert r.status_code == 200, r.text
        assert not second.done()
    assert second.result().status_code == 200
    assert pg_cp.webhook(a_events[0]).status_code == 200  # the edge's retry
    for client in (a, b):
        assert data_of(client.get("/v1/me"))["credits"]["held"] == "0.000000"
