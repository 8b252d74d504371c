"""Money, as the platform admin moves it, and the audit log that records it.

* ``POST /v1/admin/companies/{id}/credits`` ``{"amount": "10.5", "reason"?}``: a
  grant (amount > 0).
* ``POST /v1/admin/companies/{id}/adjustments`` ``{"amount": "-1.25", "reason"}``:
  a correction either way; the reason is required; a debit may not exceed what is
  available (409 ``available_credits_exceeded``).
* ``GET /v1/admin/audit?company_id=&kind=&actor=&target=&request_id=&from=&to=``:
  the audit log, newest first (the platform admin: any company or all; an owner:
  its own company).

Both money routes honour ``Idempotency-Key`` (`grants`) and answer 201 with the
ledger entry, ``meta.replayed`` telling a replay from a new entry.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from control_plane import accounts, audit, billing, policy
from control_plane.auth import authenticate, caller_and_json
from control_plane.deps import get_deps, path_id
from control_plane.errors import Forbidden, ValidationFailed
from control_plane.grants import MoveKind, move
from control_plane.heavy_reads import caller_key
from control_plane.middleware import request_id
from control_plane.pagination import page_request
from control_plane.policy import Principal
from control_plane.responses import ok
from control_plane.validation import (
    credits_amount,
    optional_str,
    parse_day,
    required_str,
)
from shared.pricing import format_credits

REASON_MAX = 500
_IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,200}")  # printable ASCII, no spaces


def _amount(doc: dict[str, Any]) -> int:
    value = doc.get("amount")
    if value is None:
        raise ValidationFailed("amount", "is required")
    micro = credits_amount(value, "amount")
    if micro == 0:
        raise ValidationFailed("amount", "must not be zero")
    return micro


def _idempotency_key(request: Request) -> str | None:
    key = request.headers.get("idempotency-key")
    if key is not None and not _IDEMPOTENCY_KEY.fullmatch(key):
        raise ValidationFailed("Idempotency-Key", "must be 1-200 printable ASCII characters")
    return key


@dataclass(frozen=True)
class _Movement:
    """What tells a grant from an adjustment; everything else is one handler."""

    kind: MoveKind
    allowed: Callable[[Principal, str], bool]
    verb: str  # for the 403: "Only a platform admin can {verb} credits."


_GRANT = _Movement("grant", policy.can_grant_credits, "grant")
_ADJUST = _Movement("adjustment", policy.can_adjust_credits, "adjust")


async def _move_credits(request: Request, how: _Movement) -> Response:
    principal, doc = await caller_and_json(request)
    company_id = path_id(request, "company_id")
    if not how.allowed(principal, company_id):
        raise Forbidden(f"Only a platform admin can {how.verb} credits.")
    micro = _amount(doc)
    if micro < 0 and how.kind == "grant":
        raise ValidationFailed(
            "amount", "must be positive; debit with POST …/adjustments and a reason"
        )
    # A grant may say why; a correction must.
    reason_of = required_str if how.kind == "adjustment" else optional_str
    reason = reason_of(doc, "reason", max_len=REASON_MAX)
    key = _idempotency_key(request)
    rid, actor = request_id(request), accounts.actor_of(principal)

    def run(session: Session) -> tuple[dict[str, Any], bool]:
        entry, created = move(
            session,
            company_id,
            micro,
            kind=how.kind,
            reason=reason,
            actor=actor,
            request_id=rid,
            idempotency_key=key,
        )
        if created:
            # An admin action like any other (DESIGN §11: `admin.*`), beside the
            # ledger's own `grant` / `adjustment` event; a replay adds neither.
            audit.record_admin(
                session,
                actor=actor,
                action=f"admin.credits.{how.kind}",
                company_id=company_id,
                target=f"ledger_entry:{entry.id}",
                request_id=rid,
                after={"amount": format_credits(micro), "reason": reason},
            )
        return {**billing.entry_public(entry), "company_id": company_id}, created

    db = get_deps(request).db
    try:
        data, created = await db.transaction(run)
    except IntegrityError:
        if key is None:
            raise
        data, created = await db.transaction(run)  # a concurrent twin won: replay it
    return ok(data, 201, meta={"replayed": not created})


async def grant_credits(request: Request) -> Response:
    """Grant credits to a company (platform admin)."""
    return await _move_credits(request, _GRANT)


async def adjust_credits(request: Request) -> Response:
    """Adjust a company's credits either way, with a reason (platform admin)."""
    return await _move_credits(request, _ADJUST)


def _audit_filters(query: dict[str, str]) -> dict[str, str]:
    filters = {}
    for name in audit.FILTERS:
        value = optional_str(query, name, max_len=200)
        if value is not None:
            filters[name] = value
    return filters


async def list_audit(request: Request) -> Response:
    """The audit log (money movements and ``admin.*`` actions), newest first;
    filters ``kind`` (``admin.*`` for a prefix), ``actor``, ``target``,
    ``request_id``, ``reservation_id``, ``from`` / ``to`` (UTC days, inclusive)."""
    principal = await authenticate(request)
    query = dict(request.query_params)
    company_id = optional_str(query, "company_id", max_len=64)
    if company_id is None and not policy.is_platform_admin(principal):
        company_id = principal.company_id  # an owner's default: its own company
    if not policy.can_read_audit(principal, company_id):
        raise Forbidden("Only a platform admin, or an owner for its own company, reads the audit.")
    filters = _audit_filters(query)
    start = parse_day(query.get("from"), "from")
    end = parse_day(query.get("to"), "to")
    if start is not None and end is not None and start > end:
        # As the aggregates answer it: an empty page would read as "nothing happened".
        raise ValidationFailed("from", "must not be after to")
    since = None if start is None else datetime.combine(start, time(), tzinfo=UTC)
    until = None if end is None else datetime.combine(end + timedelta(days=1), time(), tzinfo=UTC)
    req = page_request(query)
    # A filter nothing matches reads the company's whole audit (two events a stream: a
    # second of a database thread for a million streams): a heavy read, as the
    # aggregates are (`heavy_reads`).
    page = await get_deps(request).heavy_reads.run(
        caller_key(principal), lambda s: audit.page(s, company_id, req, filters, since, until)
    )
    return ok(page.public(audit.event_public))


routes: list[BaseRoute] = [
    Route("/v1/admin/companies/{company_id}/credits", grant_credits, methods=["POST"]),
    Route("/v1/admin/companies/{company_id}/adjustments", adjust_credits, methods=["POST"]),
    Route("/v1/admin/audit", list_audit, methods=["GET"]),
]
