"""Seeded chaos rounds on a `ProcessStack`: in each, clients play turns for
`window` seconds while a chaos thread SIGKILLs and restarts the edge and the
control plane at the planned moments; after the rounds, `close_the_books` waits
until every hold is settled or released."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

from tests.chaos_books import ChaosBooks
from tests.chaos_clients import TURN_SECONDS, Player, TurnLog
from tests.chaos_schedule import Fault, faults, turns
from tests.ops_processes import ProcessStack
from tests.polling import wait_until

# Clients per company: a well-funded one, and one whose credits cover a few holds
# at a time (inits refused 402 while its holds are out).
FUNDED = [("50", 4), ("0.02", 2)]


@dataclass
class RunLog:
    seed: int
    plan: list[Fault]
    companies: list[str] = field(default_factory=list)
    turns: list[TurnLog] = field(default_factory=list)
    done: list[str] = field(default_factory=list)  # the faults as they happened
    edge_kills: list[float] = field(default_factory=list)  # seconds after the start
    never_streamed: list[str] = field(default_factory=list)


class ChaosRound:
    """One seed's round: its own companies and clients, its own faults."""

    def __init__(
        self, stack: ProcessStack, books: ChaosBooks, seed: int, window: float, cp_started: Started
    ) -> None:
        self.stack = stack
        self.books = books
        self.window = window
        self.log = RunLog(seed, faults(seed, window))
        self.cp_started = cp_started
        self._lock = threading.Lock()

    def run(self) -> RunLog:
        c = self.stack.client
        players = []
        for credits, users in FUNDED:
            company = c.new_company(credits)
            self.log.companies.append(company)
            for _ in range(users):
                players.append(
                    Player(
                        len(players),
                        c.cp_url,
                        c.new_user(company),
                        c.webhook_secret,
                        self.books.is_settled,
                    )
                )
        t0 = time.monotonic()
        threads = [threading.Thread(target=self._play, args=(p, t0)) for p in players]
        threads.append(threading.Thread(target=self._chaos, args=(t0,)))
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=self.window + TURN_SECONDS + 60)
            assert not thread.is_alive(), "a client or the chaos thread hangs"
        for p in players:
            p.close()
        self.log.turns.sort(key=lambda t: t.started)
        return self.log

    def _play(self, player: Player, t0: float) -> None:
        for plan in turns(self.log.seed, player.worker, 500):
            if time.monotonic() - t0 > self.window:
                return
            turn = player.play(plan, t0)
            with self._lock:
                self.log.turns.append(turn)

    def _chaos(self, t0: float) -> None:
        for fault in self.log.plan:
            time.sleep(max(0.0, t0 + fault.at - time.monotonic()))
            services = ["edge", "cp"] if fault.service == "both" else [fault.service]
            killed_at = time.monotonic() - t0
            for name in services:
                self.stack.kill(name)
            if "edge" in services:
                self.log.edge_kills.append(killed_at)
            time.sleep(fault.down_for)
            for name in services:
                if name == "cp":  # its counters start again from here
                    self.cp_started.at = datetime.now(UTC)
                self.stack.restart(name)
            self.log.done.append(
                f"t={killed_at:.2f}s SIGKILL {fault.service}, "
                f"healthy again at t={time.monotonic() - t0:.2f}s"
            )


@dataclass
class Started:
    """When the running control plane process was started (its counters' zero)."""

    at: datetime = field(default_factory=lambda: datetime.now(UTC))


def close_the_books(books: ChaosBooks, logs: list[RunLog]) -> None:
    """Every streamed turn's hold ends on its own (its report, or the sweeper once
    its dead edge's checkpoint falls silent); the holds nobody streams on are then
    aged past their deadline and must be released."""
    companies = [c for log in logs for c in log.companies]
    turns_ = [t for log in logs for t in log.turns]

    def only_unstreamed_held() -> bool:
        return not set(books.active(companies)) - set(books.never_streamed(companies, turns_))

    try:
        wait_until(only_unstreamed_held, "every streamed turn's hold to end", within=120)
    except AssertionError as exc:
        stuck = books.stuck(companies, turns_)
        raise AssertionError("\n".join([str(exc), *stuck])) from None
    for log in logs:
        log.never_streamed = books.never_streamed(log.companies, log.turns)
        books.pass_the_deadline(log.never_streamed)
    wait_until(lambda: not books.active(companies), "the unstreamed holds released")
