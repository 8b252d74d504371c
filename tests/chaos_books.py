"""The books of a chaos run, read from PostgreSQL and Redis once the load has
stopped: every hold ends settled or released exactly once, each company's books
balance (`control_plane.books.check_books`), every charged stream has its usage
record, what each client received was billed, and the control plane's counters move
by the ledger's entries (docs/operations.md, the credit counters)."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

import redis
from sqlalchemy import bindparam, text
from sqlalchemy.orm import Session, sessionmaker

from control_plane.books import check_books
from control_plane.db import create_sync_engine
from shared.checkpoints import CHECKPOINT_EVERY_TOKENS, checkpoint_key
from stream_edge.grants import used_key
from tests.chaos_clients import TurnLog
from tests.chaos_schedule import Fault
from tests.conftest import REDIS_URL
from tests.ops_processes import Scrape

MICRO = 1_000_000
# Turns whose client never streamed: their holds wait for their deadline.
UNSTREAMED = ("abandoned",)


class ChaosBooks:
    def __init__(self, database_url: str, redis_prefix: str) -> None:
        self.engine = create_sync_engine(database_url)
        self.sessions = sessionmaker(self.engine)
        self.prefix = redis_prefix
        self.redis = redis.Redis.from_url(REDIS_URL)

    def close(self) -> None:
        self.redis.close()
        self.engine.dispose()

    def _rows(self, sql: str, **params: Any) -> list[Any]:
        statement = text(sql)
        for name, value in params.items():
            if isinstance(value, list | tuple):
                statement = statement.bindparams(bindparam(name, expanding=True))
        with self.sessions() as s:
            return list(s.execute(statement, params))

    def is_settled(self, reservation_id: str) -> bool:
        rows = self._rows("SELECT status FROM reservations WHERE id = :r", r=reservation_id)
        return bool(rows) and rows[0].status != "active"

    def active(self, companies: list[str]) -> list[str]:
        rows = self._rows(
            "SELECT id FROM reservations WHERE company_id IN :c AND status = 'active'",
            c=companies,
        )
        return [row.id for row in rows]

    def has_checkpoint(self, reservation_id: str) -> bool:
        return bool(self.redis.exists(self.prefix + checkpoint_key(reservation_id)))

    def _used_mark(self, reservation_id: str) -> bytes | None:
        row = self._rows("SELECT jti, company_id FROM reservations WHERE id = :r", r=reservation_id)
        mark: bytes | None = self.redis.get(self.prefix + used_key(row[0].company_id, row[0].jti))
        return mark

    def never_streamed(self, companies: list[str], turns: list[TurnLog]) -> list[str]:
        """The active holds whose token no edge took (no used mark, no checkpoint) and
        no client streamed on: inits whose answer was lost with a dying control plane
        (no client holds their token), abandoned ones, and those whose client gave up
        while the edge was down. They wait for their deadline, by design."""
        received = {t.reservation_id for t in turns if t.chunks}
        return [
            r
            for r in self.active(companies)
            if r not in received and not self.has_checkpoint(r) and self._used_mark(r) is None
        ]

    def stuck(self, companies: list[str], turns: list[TurnLog]) -> list[str]:
        """The holds still active that a stream started on, with their store keys:
        for a failure's message."""
        unstreamed = set(self.never_streamed(companies, turns))
        found = []
        for r in self.active(companies):
            if r not in unstreamed:
                checkpoint = self.redis.get(self.prefix + checkpoint_key(r))
                found.append(
                    f"still held: {r}, checkpoint {checkpoint!r}, used {self._used_mark(r)!r}"
                )
        return found

    def pass_the_deadline(self, reservation_ids: list[str]) -> None:
        """Time passes for holds nobody streams on: their deadline is now (the sweeper
        then releases them as it would ~20 minutes after init)."""
        if reservation_ids:
            with self.sessions.begin() as s:
                s.execute(
                    text(
                        "UPDATE reservations SET expires_at = now() - interval '1 second'"
                        " WHERE id IN :r AND status = 'active'"
                    ).bindparams(bindparam("r", expanding=True)),
                    {"r": reservation_ids},
                )

    # --- the invariants --------------------------------------------------------

    def problems(
        self, companies: list[str], turns: list[TurnLog], edge_kills: list[float]
    ) -> list[str]:
        found: list[str] = []
        with self.sessions() as s:
            for company in companies:
                found += [f"company {company}: {p}" for p in check_books(s, company)]
            reservations = {r.id: r for r in _reservations(s, companies)}
            records = {u.reservation_id: u for u in _usage(s, companies)}
        for rid, r in reservations.items():
            record = records.get(rid)
            if r.status == "settled" and (record is None or record.cost_micro != r.charged_micro):
                found.append(f"reservation {rid} settled {r.charged_micro} with record {record}")
            if r.status == "released" and record is not None:
                found.append(f"reservation {rid} released whole but has a usage record")
            if r.status == "active":
                found.append(f"reservation {rid} still held")
        for turn in turns:
            found += [f"worker {turn.worker}: {u}" for u in turn.unexpected]
            if turn.reservation_id is None:
                continue
            r, record = reservations[turn.reservation_id], records.get(turn.reservation_id)
            found += _billed_as_seen(turn, r, record, _cut_by_a_kill(turn, edge_kills))
        return found

    def counter_problems(self, scrape: Scrape, since: datetime) -> list[str]:
        """The control plane's counters against the ledger's entries made since its
        process started (a killed one's counts died with it)."""
        rows = self._rows(
            "SELECT kind, actor, count(*) AS n, coalesce(sum(amount_micro), 0) AS total"
            " FROM ledger_entries WHERE created_at >= :since AND reservation_id IS NOT NULL"
            " GROUP BY kind, actor",
            since=since,
        )
        total = {kind: 0 for kind in ("hold", "charge", "release")}
        webhook_settlements = 0
        for row in rows:
            total[row.kind] += abs(int(row.total))
            if row.kind == "charge" and row.actor == "edge-webhook":
                webhook_settlements += int(row.n)
        seen = {
            "hold": scrape.value("llmgw_cp_credits_reserved_total"),
            "charge": scrape.value("llmgw_cp_credits_charged_total"),
            "release": scrape.value("llmgw_cp_credits_released_total"),
        }
        found = [
            f"counter of {kind}s says {seen[kind]} credits, the ledger {total[kind] / MICRO}"
            for kind in total
            if round(seen[kind] * MICRO) != total[kind]
        ]
        settled = scrape.value("llmgw_cp_webhooks_total", outcome="settled")
        if settled != webhook_settlements:
            found.append(f"webhooks settled {settled}, the ledger {webhook_settlements}")
        return found


def _of_companies(s: Session, sql: str, companies: Iterable[str]) -> list[Any]:
    statement = text(sql).bindparams(bindparam("c", expanding=True))
    return list(s.execute(statement, {"c": list(companies)}))


def _reservations(s: Session, companies: Iterable[str]) -> list[Any]:
    sql = "SELECT id, status, hold_micro, charged_micro FROM reservations WHERE company_id IN :c"
    return _of_companies(s, sql, companies)


def _usage(s: Session, companies: Iterable[str]) -> list[Any]:
    sql = (
        "SELECT reservation_id, status, output_tokens, cost_micro, usage_source"
        " FROM usage_records WHERE company_id IN :c"
    )
    return _of_companies(s, sql, companies)


# How long a stream may run on at its edge after its client's turn is over: the
# resume grace a client that left is given (2 s in the test), and a margin.
RUNS_ON_SECONDS = 5.0


def _cut_by_a_kill(turn: TurnLog, edge_kills: list[float]) -> bool:
    return any(turn.started <= at <= turn.ended + RUNS_ON_SECONDS for at in edge_kills)


def _billed_as_seen(turn: TurnLog, r: Any, record: Any, edge_killed: bool) -> list[str]:
    """What the client received against what its stream was billed."""
    where = f"turn {turn.plan.behaviour} ({turn.reservation_id})"
    if turn.outcome in UNSTREAMED:
        return [] if r.status == "released" else [f"{where}: never streamed, yet {r.status}"]
    if not turn.chunks and r.status == "released":
        return []  # refused before its first byte (e.g. the edge's 429)
    if record is None:
        return [f"{where}: received {len(turn.chunks)} chunks, no usage record"]
    found = []
    # A killed edge's stream is billed from its last checkpoint, at most this behind.
    slack = CHECKPOINT_EVERY_TOKENS if edge_killed else 0
    if record.output_tokens < len(turn.chunks) - slack and r.charged_micro < r.hold_micro:
        found.append(f"{where}: received {len(turn.chunks)} chunks, billed {record.output_tokens}")
    if (
        turn.output is not None
        and not edge_killed
        and (record.status != "completed" or record.output_tokens != turn.output)
    ):
        found.append(
            f"{where}: completed with {turn.output} tokens, billed {record.status} "
            f"{record.output_tokens}"
        )
    return found


def describe(seed: int, plan: list[Fault], done: list[str], turns: list[TurnLog]) -> str:
    """The run, for a failure's message: its seed, its faults as planned and as done,
    and each turn."""
    lines = [f"seed {seed}", *(f"  planned: {f}" for f in plan), *(f"  done: {d}" for d in done)]
    for t in turns:
        lines.append(
            f"  w{t.worker} {t.started:6.2f}-{t.ended:6.2f}s {t.plan.behaviour:17} "
            f"{t.outcome:10} res={t.reservation_id} chunks={len(t.chunks)} out={t.output} "
            f"err={t.error_code} reconnects={t.reconnects} lost_inits={t.lost_inits}"
        )
    return "\n".join(lines)
