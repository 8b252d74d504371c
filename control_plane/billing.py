"""What a company's users read of its books: the usage records its streams left
and its ledger entries with the balance, newest first. Data functions that take a
DB session and do not commit; nothing here writes."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session
from sqlmodel import col

from control_plane import policy
from control_plane.pagination import Page, PageRequest, read_merged_page, read_page
from control_plane.policy import Principal
from control_plane.tables import Company, LedgerEntry, UsageRecord, iso
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
    usage"); who sees the whole company sees every entry. Either way a page reads
    index ranges of about its own size, however large the company's ledger."""
    created, entry_id = col(LedgerEntry.created_at), col(LedgerEntry.id)
    company = select(LedgerEntry).where(col(LedgerEntry.company_id) == company_id)
    if policy.sees_whole_company(p):
        page = read_page(session, company, created, entry_id, req)
    else:
        # Two ranges of `ix_ledger_entries_company_user_created`: the company's own
        # entries (no reservation, so no user: `ck_ledger_entries_user`) and the
        # caller's streams' (each row carries its reservation's user).
        own = company.where(col(LedgerEntry.user_id) == p.user_id)
        unreserved = company.where(
            col(LedgerEntry.user_id).is_(None), col(LedgerEntry.reservation_id).is_(None)
        )
        page = read_merged_page(session, LedgerEntry, [unreserved, own], created, entry_id, req)
    return session.get(Company, company_id), page
