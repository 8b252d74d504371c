"""``GET /v1/usage`` and ``GET /v1/credits``: newest first, keyset-paginated."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session
from sqlmodel import col
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from control_plane import policy
from control_plane.auth import authenticate
from control_plane.deps import get_deps
from control_plane.errors import Forbidden
from control_plane.policy import Principal
from control_plane.responses import ok
from control_plane.tables import Company, LedgerEntry, UsageRecord, iso
from control_plane.validation import decode_cursor, encode_cursor, page_limit
from shared.pricing import format_credits

Cursor = tuple[datetime, str] | None


def usage_public(r: UsageRecord) -> dict[str, Any]:
    return {
        "id": r.id,
        "reservation_id": r.reservation_id,
        "jti": r.jti,
        "session_id": r.session_id,
        "model": r.model,
        "provider": r.provider,
        "status": r.status,
        "finish_reason": r.finish_reason,
        "input_tokens": r.input_tokens,
        "output_tokens": r.output_tokens,
        "cached_input_tokens": r.cached_input_tokens,
        "cache_write_tokens": r.cache_write_tokens,
        "reasoning_tokens": r.reasoning_tokens,
        "usage_source": r.usage_source,
        "cost": format_credits(r.cost_micro),
        "created_at": iso(r.created_at),
    }


def entry_public(e: LedgerEntry) -> dict[str, Any]:
    return {
        "id": e.id,
        "kind": e.kind,
        "amount": format_credits(e.amount_micro),
        "reservation_id": e.reservation_id,
        "reason": e.reason,
        "created_at": iso(e.created_at),
    }


def _usage_page(session: Session, p: Principal, limit: int, after: Cursor) -> list[UsageRecord]:
    stmt = select(UsageRecord).where(col(UsageRecord.company_id) == p.company_id)
    if not policy.sees_whole_company(p):
        stmt = stmt.where(col(UsageRecord.user_id) == p.user_id)
    if after is not None:
        moment, last_id = after
        stmt = stmt.where(
            or_(
                col(UsageRecord.created_at) < moment,
                and_(col(UsageRecord.created_at) == moment, col(UsageRecord.id) < last_id),
            )
        )
    stmt = stmt.order_by(col(UsageRecord.created_at).desc(), col(UsageRecord.id).desc())
    return list(session.scalars(stmt.limit(limit + 1)))


def _credits_page(
    session: Session, company_id: str, limit: int, after: Cursor
) -> tuple[Company | None, list[LedgerEntry]]:
    stmt = select(LedgerEntry).where(col(LedgerEntry.company_id) == company_id)
    if after is not None:
        moment, last_id = after
        stmt = stmt.where(
            or_(
                col(LedgerEntry.created_at) < moment,
                and_(col(LedgerEntry.created_at) == moment, col(LedgerEntry.id) < last_id),
            )
        )
    stmt = stmt.order_by(col(LedgerEntry.created_at).desc(), col(LedgerEntry.id).desc())
    return session.get(Company, company_id), list(session.scalars(stmt.limit(limit + 1)))


def _reader(principal: Principal) -> str:
    if not policy.can_read_own_data(principal) or principal.company_id is None:
        raise Forbidden("This needs a user with the llm:chat:read scope.")
    return principal.company_id


async def usage(request: Request) -> Response:
    principal = await authenticate(request)
    _reader(principal)
    limit = page_limit(request.query_params.get("limit"))
    after = decode_cursor(request.query_params.get("cursor"))
    rows = await get_deps(request).db.transaction(lambda s: _usage_page(s, principal, limit, after))
    page = rows[:limit]
    next_cursor = encode_cursor(page[-1].created_at, page[-1].id) if len(rows) > limit else None
    return ok({"items": [usage_public(r) for r in page], "next_cursor": next_cursor})


async def credits(request: Request) -> Response:
    principal = await authenticate(request)
    company_id = _reader(principal)
    limit = page_limit(request.query_params.get("limit"))
    after = decode_cursor(request.query_params.get("cursor"))
    company, rows = await get_deps(request).db.transaction(
        lambda s: _credits_page(s, company_id, limit, after)
    )
    if company is None:
        raise Forbidden("Your company no longer exists.")
    page = rows[:limit]
    next_cursor = encode_cursor(page[-1].created_at, page[-1].id) if len(rows) > limit else None
    return ok(
        {
            "balance": format_credits(company.balance_micro),
            "held": format_credits(company.held_micro),
            "available": format_credits(company.balance_micro - company.held_micro),
            "entries": [entry_public(e) for e in page],
            "next_cursor": next_cursor,
        }
    )


routes: list[BaseRoute] = [
    Route("/v1/usage", usage, methods=["GET"]),
    Route("/v1/credits", credits, methods=["GET"]),
]
