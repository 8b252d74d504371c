"""A company keeps an owner: its own owners cannot take the last one away.

Nobody changes its own role, so one owner acting alone always leaves itself. But two
owners demoting (or revoking) each other at the same moment each passed
authentication as an owner before either change landed, and both would commit: the
company is left with no owner, and only the platform admin can give it one back.
So a company user's change that takes an owner away runs under the company's row
lock (``SELECT … FOR UPDATE``; on SQLite every write transaction is already
``BEGIN IMMEDIATE``, one at a time) and counts the company's other active owners
after it has the lock: the second of the two then sees the first's change and is
refused (409 ``last_owner``).

The platform admin is not held to the rule: it is the way back for a company with
no owner, and its revocation of a compromised owner must never be refused.
"""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session
from sqlmodel import col

from control_plane import policy
from control_plane.errors import LastOwner
from control_plane.policy import Principal
from control_plane.tables import Company, User


def lock_company(session: Session, company_id: str) -> None:
    """Take the company's row lock for the rest of the transaction (PostgreSQL)."""
    session.execute(select(col(Company.id)).where(col(Company.id) == company_id).with_for_update())


def queue_behind_company_lock(session: Session, company_id: str) -> None:
    """Wait for a transaction holding the company's row lock (`lock_company`: a role
    change, a user's revocation), and keep the next from taking it until this one
    ends, before locking any user row: theirs lock the company, then the user. A key
    share (``FOR KEY SHARE``): inits and settlements, which update the row, go on."""
    session.execute(
        select(col(Company.id))
        .where(col(Company.id) == company_id)
        .with_for_update(read=True, key_share=True)
    )


def active_owners_besides(session: Session, company_id: str, user_id: str) -> int:
    """The company's owners that can still act (not revoked), `user_id` left out."""
    found = session.scalar(
        select(func.count())
        .select_from(User)
        .where(col(User.company_id) == company_id)
        .where(col(User.role) == "owner")
        .where(col(User.disabled_at).is_(None))
        .where(col(User.id) != user_id)
    )
    return int(found or 0)


def keep_an_owner(session: Session, p: Principal, company_id: str, user_id: str) -> None:
    """Refuse a company user's change that takes owner `user_id` away when no other
    active owner would remain. Call it under `lock_company`, before the change."""
    if policy.is_platform_admin(p):
        return
    if active_owners_besides(session, company_id, user_id) == 0:
        raise LastOwner()
