"""Money is conserved while services die: seeded chaos rounds on real processes.

mock-llm, the control plane and the edge run as `llm-gateway` processes on
PostgreSQL + Redis. In each round (one seed) clients play concurrent chat turns
(init, then EventSource or `/v1/chat/completions`; some hang up mid-way, some
resume with `Last-Event-ID`, some replay the usage webhook, some never stream)
while the edge and the control plane are SIGKILLed and restarted at seeded-random
moments (`tests/chaos_schedule.py`). Once the rounds are over and every hold has
ended (waited on, never slept on: a dead edge's streams are settled by the sweeper
once their checkpoints fall silent, so the rounds share that wait), the books must
be straight (`tests/chaos_books.py`): each hold settled or released exactly once,
each company's balance the sum of its ledger, no charge above its hold, a usage
record for every charge, no available credit below zero, what each client
received billed, and the control plane's credit counters equal to the ledger's
entries since its process started. A failure prints each round's seed and
schedule; `LLMGW_CHAOS_SEEDS=2,13` plans the same rounds again (the timing of a
busy machine may still differ)."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator

import pytest

from tests.chaos_books import ChaosBooks, describe
from tests.chaos_run import ChaosRound, RunLog, Started, close_the_books
from tests.conftest import fresh_pg_database, fresh_redis_prefix
from tests.ops_processes import ProcessStack, scrape
from tests.polling import wait_until

SEEDS = [int(s) for s in os.environ.get("LLMGW_CHAOS_SEEDS", "2,1,13").split(",")]
WINDOW_SECONDS = 4.0  # of load per round, its faults' restarts not counted

CHAOS_ENV = {
    "LLMGW_LOG_LEVEL": "WARNING",
    "LLMGW_AUTO_MIGRATE": "0",  # a clone of the migrated template: restarts start sooner
    "LLMGW_SWEEP_INTERVAL_SECONDS": "0.5",
    # A client that left is let go (and its stream billed) 2 s later.
    "LLMGW_RESUME_GRACE_SECONDS": "2",
    # A reconnect that follows a dead edge's stream gives up after this.
    "LLMGW_IDLE_TIMEOUT_SECONDS": "5",
    "LLMGW_FIRST_TOKEN_TIMEOUT_SECONDS": "5",
}


@pytest.fixture
def chaos(
    pg_server: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ProcessStack, ChaosBooks]]:
    with (
        fresh_pg_database(pg_server, migrated=True) as url,
        fresh_redis_prefix() as prefix,
        ProcessStack(tmp_path_factory.mktemp("chaos"), url, prefix, **CHAOS_ENV) as stack,
    ):
        books = ChaosBooks(url, prefix)
        try:
            yield stack, books
        finally:
            books.close()


def summary(log: RunLog) -> str:
    outcomes = Counter(t.outcome for t in log.turns)
    return (
        f"seed {log.seed}: {len(log.turns)} turns, {len(log.done)} kills "
        f"({len(log.edge_kills)} of the edge), "
        f"{sum(t.reconnects for t in log.turns)} reconnects, "
        f"{sum(t.lost_inits for t in log.turns)} inits retried, "
        f"{len(log.never_streamed)} holds never streamed; outcomes {dict(outcomes)}"
    )


def test_money_is_conserved_while_services_are_killed(
    chaos: tuple[ProcessStack, ChaosBooks],
) -> None:
    stack, books = chaos
    cp_started = Started()
    logs: list[RunLog] = []

    def story() -> str:
        return "\n".join(describe(log.seed, log.plan, log.done, log.turns) for log in logs)

    try:
        for seed in SEEDS:
            chaos_round = ChaosRound(stack, books, seed, WINDOW_SECONDS, cp_started)
            logs.append(chaos_round.log)
            chaos_round.run()
        close_the_books(books, logs)
        problems = [
            p for log in logs for p in books.problems(log.companies, log.turns, log.edge_kills)
        ]

        def counters() -> list[str]:
            return books.counter_problems(scrape(stack.urls["cp"]), cp_started.at)

        try:
            wait_until(lambda: not counters(), "the counters to agree with the ledger", within=15)
        except AssertionError:
            problems += counters()
    except AssertionError as exc:
        pytest.fail(f"{exc}\n{story()}")
    print("\n".join(summary(log) for log in logs))
    assert not problems, "\n".join([*problems, story()])
