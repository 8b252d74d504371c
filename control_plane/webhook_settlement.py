"""Usage webhooks → settlement (DESIGN §7), exactly once, through `settlement`.

`settle_webhooks` checks a batch of deliveries against their reservations, records
their webhook ids (primary key), then settles. A second delivery finds its id
taken (same id: recorded earlier, in this batch, or by a concurrent twin that
committed first, which ON CONFLICT waits for) or finds the reservation no longer
active (another id, a cancelled-after-completed event, a webhook after the sweeper
settled or released the hold) and changes nothing. One delivery alone
(`settle_delivery`) takes the same checks and statements; on PostgreSQL it runs on
the unit's psycopg connection (`settle_alone`), in autocommit when it stores no
reply (its one write statement is atomic by itself), else in one transaction.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session
from sqlmodel import col

from control_plane import chat_sessions, lost_settlements, raw_pg, settle_statements
from control_plane.audit import WEBHOOK_ACTOR
from control_plane.db import Database, Unit, lost_backend, outcome_unknown
from control_plane.errors import (
    AppError,
    Conflict,
    ReservationMismatch,
    ReservationNotFound,
    ValidationFailed,
    WebhookProviderMismatch,
)
from control_plane.fallbacks import served_price
from control_plane.ledger import settle_claimed
from control_plane.settlement import (
    DUPLICATE,
    HeldRow,
    Outcome,
    Settling,
    Usage,
    held_rows,
    outcome_of,
    settle_usages,
    to_settle,
    usage_rows,
)
from control_plane.tables import Reservation, WebhookEvent, utcnow
from control_plane.usage_events import ttft_ms
from shared.catalog import Price
from shared.webhooks import UsageEvent

log = logging.getLogger("control_plane.webhook_settlement")
# The statuses whose assistant reply is kept in the session.
TRANSCRIPT_STATUSES = ("completed", "cancelled")


@dataclass(frozen=True, slots=True)
class Delivery:
    """One verified usage webhook to settle (DESIGN §7).

    `signer_provider`: the backend whose own secret signed (None: the platform's).
    It settles only reservations routed to it, so one backend's secret cannot settle
    (say, at 0 as `stream.failed`) another provider's streams (DESIGN §11)."""

    webhook_id: str
    event: UsageEvent
    transcripts: bool
    http_request_id: str | None = None
    signer_provider: str | None = None
    session_limits: chat_sessions.SessionLimits | None = None
    # The transaction that settles it (`lost_settlements.marked`), on its audit
    # events: what a commit whose answer was lost settled is read back by it.
    attempt: str | None = None


def settle_webhooks(
    session: Session, deliveries: Sequence[Delivery], *, lock_wait: float | None = None
) -> list[Outcome | AppError]:
    """The webhooks' use case, for a batch in the caller's transaction: each
    delivery's Outcome, or the AppError that refuses it (and wrote nothing for it).

    Each delivery is checked against its reservation (all read in one SELECT). The
    webhook ids are recorded in one statement (primary key): the first delivery of
    an id in the batch claims it; a later one, or one whose id an earlier batch
    recorded, gets what a redelivery gets: DUPLICATE for the same reservation, 409
    for another. Of the deliveries that claimed an id, the first for each
    reservation settles (`settle_usages`; DUPLICATE if it is no longer active), the
    others are DUPLICATE. Then the replies of those settled are appended to their
    sessions. A batch of one checked delivery on PostgreSQL records its id in the
    statement that settles it (`_claim_and_settle`): same answers, fewer round
    trips. `lock_wait`: how long it may wait for each row lock (`held_rows`), at most:
    a settlement batch's (`settlement_batch.LOCK_WAIT_SECONDS`)."""
    now = utcnow()
    ids = sorted({d.event.reservation_id for d in deliveries})
    reservations = held_rows(session, ids, lock_wait=lock_wait)
    results: list[Outcome | AppError | None] = [None] * len(deliveries)
    checked: list[tuple[int, HeldRow, tuple[str, str, Price] | None]] = []
    for i, delivery in enumerate(deliveries):
        try:
            reservation, served = _check(reservations, delivery)
        except AppError as refused:
            results[i] = refused
            continue
        checked.append((i, reservation, served))
    if len(checked) == 1 and settle_statements.can_claim_and_settle(session):
        [(i, reservation, served)] = checked
        results[i] = _claim_and_settle(session, deliveries[i], reservation, served)
        return _settle_replies(
            session, deliveries, results, [(i, results[i], reservation.session_id)]
        )
    claims: dict[str, str] = {}
    for i, reservation, _ in checked:
        claims.setdefault(deliveries[i].webhook_id, reservation.id)
    owners = settle_statements.claim_webhook_ids(session, list(claims.items()), now)
    settling: list[tuple[int, Settling]] = []
    # The webhook ids and the reservations a delivery of this batch settles.
    taken_ids: set[str] = set()
    taken_reservations: set[str] = set()
    for i, reservation, served in checked:
        delivery = deliveries[i]
        owner, recorded_now = owners[delivery.webhook_id]
        if owner != reservation.id:
            results[i] = Conflict("This webhook id was already used for another reservation.")
        elif (
            not recorded_now
            or delivery.webhook_id in taken_ids
            or reservation.id in taken_reservations
        ):
            results[i] = DUPLICATE
        else:
            taken_ids.add(delivery.webhook_id)
            taken_reservations.add(reservation.id)
            settling.append((i, _settling(delivery, reservation, served)))
    outcomes = settle_usages(session, [item for _, item in settling])
    for (i, _), outcome in zip(settling, outcomes, strict=True):
        results[i] = outcome
    return _settle_replies(
        session,
        deliveries,
        results,
        [
            (i, outcome, item.reservation.session_id)
            for (i, item), outcome in zip(settling, outcomes, strict=True)
        ],
    )


def _claim_and_settle(
    session: Session,
    delivery: Delivery,
    reservation: HeldRow,
    served: tuple[str, str, Price] | None,
) -> Outcome | AppError:
    """A batch's one checked delivery: its id recorded and its reservation settled in
    one statement (`settle_statements.settle_held`), the answers those of
    `settle_webhooks`. When nothing settled, the id's row says why: taken for
    another reservation (409), else a redelivery or a reservation no longer active
    (DUPLICATE)."""
    item = _settling(delivery, reservation, served)
    [outcome] = settle_usages(session, [item], claim=delivery.webhook_id)
    if outcome.duplicate:
        return _unsettled(session, delivery, reservation)
    return outcome


def _unsettled(
    on: settle_statements.On, delivery: Delivery, reservation: HeldRow
) -> Outcome | AppError:
    """The answer of a lone delivery whose claim-and-settle settled nothing: its id
    taken for another reservation (409), else a redelivery or a reservation no
    longer active (DUPLICATE)."""
    owner = settle_statements.webhook_owner(on, delivery.webhook_id)
    if owner is not None and owner != reservation.id:
        return Conflict("This webhook id was already used for another reservation.")
    return DUPLICATE


def _settle_replies(
    session: Session,
    deliveries: Sequence[Delivery],
    results: list[Outcome | AppError | None],
    settled: Sequence[tuple[int, Outcome | AppError | None, str]],
) -> list[Outcome | AppError]:
    """The replies of the deliveries settled appended to their sessions; the answers."""
    replies: list[tuple[str, dict[str, Any], chat_sessions.SessionLimits]] = []
    for i, outcome, session_id in settled:
        reply = (
            _reply(deliveries[i])
            if isinstance(outcome, Outcome) and not outcome.duplicate
            else None
        )
        if reply is not None:
            limits = deliveries[i].session_limits or chat_sessions.SessionLimits()
            replies.append((session_id, reply, limits))
    append_transcripts(session, replies)
    answered = [r for r in results if r is not None]
    assert len(answered) == len(deliveries)  # each refused, duplicate or settled above
    return answered


def _check(
    reservations: dict[str, HeldRow], delivery: Delivery
) -> tuple[HeldRow, tuple[str, str, Price] | None]:
    """The delivery's reservation and the model that served, or the refusal."""
    event = delivery.event
    signer = delivery.signer_provider
    if signer is not None and delivery.webhook_id != event.webhook_id:
        # Webhook ids are one namespace shared by every signer, and the edge's id for
        # a stream is `usage_<jti>` (DESIGN §7). A backend free to pick its ids could
        # record another stream's id for its own reservation, and the edge's report
        # of that stream would then be refused as a conflict (dead-lettered, released
        # unbilled). Bound to its event's jti, checked below to be a reservation
        # routed to it, a backend can only ever take the ids of its own streams.
        raise ValidationFailed(
            "webhook-id", "a backend's event must carry its stream's id, usage_<jti>"
        )
    reservation = reservations.get(event.reservation_id)
    if reservation is None:
        raise ReservationNotFound(f"No reservation {event.reservation_id!r}.")
    if reservation.jti != event.jti or reservation.company_id != event.company_id:
        raise ReservationMismatch("The event's jti or company_id does not match the reservation.")
    if signer is not None:
        _check_backend(reservation, signer)
    # A served model other than the reservation's must be one of its chain (422
    # otherwise): a forged event cannot pick a cheaper model to be billed at.
    fallback = served_price(reservation, event.model)
    return reservation, (event.model, *fallback) if fallback is not None else None


def _check_backend(reservation: HeldRow, signer: str) -> None:
    """Refuse a backend's event for a reservation it may not settle: one routed to
    another provider, or one whose fallback chain reaches another provider. A
    backend speaks only for streams that nobody but itself can have served: when a
    fallback may have served, only the edge (the platform's secret) knows which did,
    and a backend's "failed" report of its own attempt, settled first, would bill
    nothing for the fallback's whole answer and make the edge's report a duplicate."""
    if reservation.provider != signer:
        raise WebhookProviderMismatch(
            f"This reservation is routed to {reservation.provider!r}, "
            f"not to {signer!r} whose secret signed the event."
        )
    for entry in reservation.fallbacks or []:
        if entry.get("provider") != signer:
            raise WebhookProviderMismatch(
                f"This reservation may fall back to {entry.get('model')!r} at "
                f"{entry.get('provider')!r}: only the edge reports it."
            )


def _settling(
    delivery: Delivery, reservation: HeldRow, served: tuple[str, str, Price] | None
) -> Settling:
    event = delivery.event
    details: dict[str, Any] = {"source": "webhook", "webhook_id": delivery.webhook_id}
    if delivery.http_request_id is not None:
        details["http_request_id"] = delivery.http_request_id
    if delivery.attempt is not None:
        details["attempt"] = delivery.attempt
    usage = Usage(
        status=event.status,
        input_tokens=event.input_tokens,
        output_tokens=event.output_tokens,
        usage_source=event.usage_source,
        finish_reason=event.finish_reason,
        ttft_ms=ttft_ms(event.started_at, event.first_token_at),
        cached_input_tokens=event.cached_input_tokens,
        cache_write_tokens=event.cache_write_tokens,
        reasoning_tokens=event.reasoning_tokens,
    )
    request_id = event.request_id or reservation.request_id
    return Settling(reservation, usage, WEBHOOK_ACTOR, request_id, details, served)


def _reply(delivery: Delivery) -> dict[str, Any] | None:
    """The assistant's message a settled delivery adds to its session, if any."""
    event = delivery.event
    if not delivery.transcripts or event.status not in TRANSCRIPT_STATUSES:
        return None
    reply: dict[str, Any] = {"role": "assistant", "content": event.content or ""}
    if event.tool_calls and event.status == "completed":
        # Only a finished call can be run and answered (`tool_results` at init).
        reply["tool_calls"] = event.tool_calls
    return reply if reply["content"] or "tool_calls" in reply else None


def transcript_weight(delivery: Delivery) -> int:
    """What a settled `delivery` writes into its session (its reply's text and tool
    calls, as `chat_sessions.stored_bytes` counts them): a settlement batch's share."""
    reply = _reply(delivery)
    return 0 if reply is None else chat_sessions.stored_bytes([reply])


def append_transcripts(
    session: Session, replies: Sequence[tuple[str, dict[str, Any], chat_sessions.SessionLimits]]
) -> None:
    """The assistants' replies, best effort: in a savepoint, so that a failed write
    (whatever the models sent) rolls back only itself and never the charges, which
    commit with the rest of the transaction. Before this, a NUL in a reply failed
    the whole webhook on PostgreSQL, the sweeper released the hold, and a completed
    stream was charged nothing. If the batch's replies fail together, each is tried
    alone, so that one bad reply costs only itself. A session at its caps keeps no
    more replies."""
    if not replies:
        return
    try:
        with raw_pg.savepoint(session):
            appended = chat_sessions.append_replies(session, replies)
    except SQLAlchemyError:
        if len(replies) == 1:
            log.exception(
                "transcript of session %s not stored; the usage is settled", replies[0][0]
            )
            return
        log.warning("the batch's transcripts failed together; one by one", exc_info=True)
        for reply in replies:
            append_transcripts(session, [reply])
        return
    for (session_id, _, _), result in zip(replies, appended, strict=True):
        if result == "full":
            log.warning("session %s is full; this reply is not kept", session_id)


def settle_alone(unit: Unit, delivery: Delivery) -> Outcome | AppError:
    """`settle_webhooks` of one delivery on PostgreSQL, on the unit's psycopg
    connection, with no ORM session (issue 14): the same checks, statements and
    answers. Its one write statement (`ledger.settle_claimed`: the id recorded, the
    flip, the money, the rows) is atomic by itself, so a delivery that adds no
    reply to its session runs in a unit begun lazily (`Database.unit(begin=False)`):
    the reservation's read and that statement each stand alone, with no BEGIN or
    COMMIT round trip. A reply must commit with the charge: its unit is begun (the
    checkout's BEGIN), the reply is written in a savepoint after the charge, and
    the unit commits both. A reservation counted against a budget settles through
    the ORM session (`_claim_and_settle`, its budgets' statements), on the same
    connection and in one transaction."""
    # The first read of a lazily begun unit is its connection's ping (`Unit.read`).
    reservations = unit.read(lambda on: held_rows(on, [delivery.event.reservation_id]))
    try:
        reservation, served = _check(reservations, delivery)
    except AppError as refused:
        return refused
    if reservation.budgeted:
        session = unit.session()  # begins the transaction if the unit has not
        result = _claim_and_settle(session, delivery, reservation, served)
        return _settle_replies(
            session, [delivery], [result], [(0, result, reservation.session_id)]
        )[0]
    item = _settling(delivery, reservation, served)
    reply = _reply(delivery)
    # Asked for only when it is used: `driver` begins a lazily begun unit.
    on = unit.last_on if reply is None else _driver(unit)
    outcome = outcome_of(
        item, settle_claimed(on, to_settle(item), delivery.webhook_id, usage_rows([item]))
    )
    if outcome.duplicate:  # the read may follow the last write
        return _unsettled(unit.read_on, delivery, reservation)
    if reply is not None:
        limits = delivery.session_limits or chat_sessions.SessionLimits()
        _append_reply(_driver(unit), reservation.session_id, reply, limits)
    return outcome


def _driver(unit: Unit) -> psycopg.Connection[Any]:
    driver = unit.driver  # a pooled PostgreSQL unit's (`settle_delivery`)
    assert driver is not None
    return driver


def _append_reply(
    driver: psycopg.Connection[Any],
    session_id: str,
    reply: dict[str, Any],
    limits: chat_sessions.SessionLimits,
) -> None:
    """`append_transcripts` of one reply on the driver: in a savepoint, so that a
    failed write rolls back only itself and never the charge before it."""
    try:
        with raw_pg.savepoint(driver):
            appended = chat_sessions.append_reply(driver, session_id, reply, limits)
    except SQLAlchemyError:
        log.exception("transcript of session %s not stored; the usage is settled", session_id)
        return
    if appended == "full":
        log.warning("session %s is full; this reply is not kept", session_id)


def already_settled(session: Session, webhook_id: str, reservation_id: str) -> bool:
    if session.get(WebhookEvent, webhook_id) is not None:
        return True
    status = session.scalar(
        select(col(Reservation.status)).where(col(Reservation.id) == reservation_id)
    )
    return status is not None and status != "active"


# What a settlement's commit implies outside the database (its counters, the
# tokens-per-minute correction: `late_settlements`), for a delivery whose caller was
# answered 503 before its transaction committed. Called on the loop, at most once,
# and only with an Outcome that settled (never a duplicate): the redelivery the 503
# asks for finds it settled and counts nothing.
Late = Callable[[Outcome], None]


def settled_late(late: Late, result: Outcome | AppError) -> None:
    """A lone delivery's `late` (`Database.unit`'s), given what its unit returned."""
    if isinstance(result, Outcome) and not result.duplicate:
        late(result)


async def settle_delivery(
    db: Database, delivery: Delivery, late: Late | None = None, *, lock_wait: float | None = None
) -> Outcome:
    """One delivery in its own transaction, on the database threads (the webhook
    route's without a batcher, and the batcher's when a batch rolled back); raises
    its refusal. ``late`` gets its Outcome if it settles after its caller was told
    503 (`DatabaseTimeout`). `lock_wait`: how long it may wait for a row lock
    (`held_rows`; the batcher's, on the session path, which `settle_alone` saves a
    round trip or two of)."""
    on_late = None if late is None else functools.partial(settled_late, late)
    attempt = lost_settlements.marked([delivery])
    [delivery] = attempt.deliveries
    try:
        result: Outcome | AppError
        if lock_wait is not None:
            wait = lock_wait
            result = await db.transaction(
                lambda s: settle_webhooks(s, [delivery], lock_wait=wait)[0], late=on_late
            )
        # SQLite takes the session path: the same answers.
        elif db.postgres:
            begin = _reply(delivery) is not None  # a reply commits with the charge
            result = await db.unit(lambda u: settle_alone(u, delivery), begin=begin, late=on_late)
        else:
            result = await db.transaction(lambda s: settle_webhooks(s, [delivery])[0], late=on_late)
    except IntegrityError:
        # Lost a race on a unique key with a concurrent delivery of the same
        # stream: its transaction committed the settlement, ours rolled back.
        if await db.transaction(
            lambda s: already_settled(s, delivery.webhook_id, delivery.event.reservation_id)
        ):
            return DUPLICATE
        raise
    except Exception as exc:
        if outcome_unknown(exc):
            # It may have committed, its answer lost: the redelivery is then a
            # duplicate, so what it settled goes to `late` once read back.
            lost_settlements.read_back(db, attempt, [late], lost_backend(exc))
        raise
    if isinstance(result, AppError):
        raise result
    return result
