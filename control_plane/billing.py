"""What a company's users read of its books: the usage records its streams left
and its ledger entries with the balance, newest first. Data functions that take a
DB session and do not commit; nothing here writes."""

from __future__ import annotations

from typing import Any

from sqlalchemy import exists, or_, select
from sqlalchemy.orm import Session
from sqlmodel import col

from control_plane import policy
from control_plane.pagination import Page, PageRequest, read_page
from control_plane.policy import Principal
from control_plane.tables import Company, LedgerEntry, Reservation, UsageRecord, iso
from shared.pricing import format_credits


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


def usage_page(session: Session, p: Principal, req: PageRequest) -> Page[UsageRecord]:
    """The caller's usage records, or its whole company's for those who see it all."""
    stmt = select(UsageRecord).where(col(UsageRecord.company_id) == p.company_id)
    if not policy.sees_whole_company(p):
        stmt = stmt.where(col(UsageRecord.user_id) == p.user_id)
    return read_page(session, stmt, col(UsageRecord.created_at), col(UsageRecord.id), req)


def credits_page(
    session: Session, p: Principal, company_id: str, req: PageRequest
) -> tuple[Company | None, Page[LedgerEntry]]:
    """The company (its balance and holds; None once it is gone) and a page of its
    ledger, read in one transaction so the balance matches the entries. A member
    sees the company's own entries (grants, adjustments) and its own streams' holds,
    charges and releases, not its colleagues' (DESIGN §9: "a member sees its own
    usage"); who sees the whole company sees every entry."""
    stmt = select(LedgerEntry).where(col(LedgerEntry.company_id) == company_id)
    if not policy.sees_whole_company(p):
        mine = exists().where(
            col(Reservation.id) == col(LedgerEntry.reservation_id),
            col(Reservation.user_id) == p.user_id,
        )
        stmt = stmt.where(or_(col(LedgerEntry.reservation_id).is_(None), mine))
    page = read_page(session, stmt, col(LedgerEntry.created_at), col(LedgerEntry.id), req)
    return session.get(Company, company_id), page
