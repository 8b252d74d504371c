"""Revocations of a user, a company or one stream token (`jti`): the admin use case.

A revocation does two things:

* **the record** (`revocations` table, for audit and listing) and, for a user or a
  company, the durable switch: ``disabled_at`` is set, so `auth` refuses that user
  (or every user of that company) with 403 ``revoked`` from then on: access tokens,
  API keys, trusted external JWTs and logins alike, and therefore new chat inits;
* **the signal to the edges**: ``shared.revocations.revoke(store, kind, value, ttl)``
  with ttl = token TTL + longest stream + 60 s, long enough to outlive every stream
  token that could concern it. Edges refuse new streams at once and end running
  ones with an ``error`` event ``revoked``.

A user's sign-out of its own token (`logout`) is listed here too, and cannot be lifted.

Lifting a revocation (``DELETE /v1/admin/revocations/{id}``) clears ``disabled_at``
and deletes the store's key, unless another revocation of the same target is still
in force. The store's key is deleted after the lift commits; a revocation of the
same target committed in between publishes its key before or after that delete, so
the route looks again once the key is gone and publishes it back when another
revocation is then in force (`in_force_besides`).

Who may: the platform admin anything; an owner its own company's users and tokens
(not the company itself), of users ranked at or below it, and lift only revocations
made by someone not ranked above it (`policy`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session
from sqlmodel import col

from control_plane import logout, owners, policy
from control_plane.accounts import actor_of
from control_plane.audit import ADMIN_TOKEN_ACTOR
from control_plane.errors import Conflict, NotFound, ValidationFailed
from control_plane.pagination import Page, PageRequest, read_page
from control_plane.policy import Principal
from control_plane.settings import ControlPlaneSettings
from control_plane.stream_revocations import stream_revoked
from control_plane.tables import Company, Reservation, Revocation, User, iso, new_id, utcnow

TARGETS = (("user_id", "user"), ("company_id", "company"), ("jti", "jti"))


@dataclass(frozen=True, slots=True)
class Target:
    kind: str
    value: str


def parse_target(doc: dict[str, Any]) -> Target:
    """Exactly one of ``user_id``, ``company_id``, ``jti`` (a non-empty string)."""
    given = [(field, kind) for field, kind in TARGETS if doc.get(field) is not None]
    if len(given) != 1:
        raise ValidationFailed("body", "send exactly one of user_id, company_id or jti")
    field, kind = given[0]
    value = doc[field]
    if not isinstance(value, str) or not value.strip() or len(value) > 200:
        raise ValidationFailed(field, "must be a non-empty string of at most 200 characters")
    return Target(kind, value)


def revocation_ttl(settings: ControlPlaneSettings) -> int:
    return settings.token_ttl_seconds + math.ceil(settings.max_stream_seconds) + 60


def revocation_public(row: Revocation) -> dict[str, Any]:
    return {
        "id": row.id,
        "kind": row.kind,
        "value": row.value,
        "company_id": row.company_id,
        "reason": row.reason,
        "actor": row.actor,
        "created_at": iso(row.created_at),
        "expires_at": iso(row.expires_at),
        "lifted_at": iso(row.lifted_at) if row.lifted_at else None,
    }


def _owner_of(session: Session, target: Target) -> tuple[str, str | None] | None:
    """The company the target belongs to and the role of the user it concerns (None
    for a company); None when there is no such target."""
    if target.kind == "company":
        return (target.value, None) if session.get(Company, target.value) is not None else None
    if target.kind == "user":
        user = session.get(User, target.value)
        return (user.company_id, user.role) if user is not None else None
    found = session.execute(
        select(col(Reservation.company_id), col(User.role))
        .join(User, col(User.id) == col(Reservation.user_id))
        .where(col(Reservation.jti) == target.value)
    ).first()
    return (str(found[0]), str(found[1])) if found is not None else None


def _revoker_role(session: Session, row: Revocation) -> str:
    """The rank a revocation's lift needs: the higher of the role its maker acted
    with (`Revocation.actor_role`; None for one made before it was recorded) and the
    maker's role now. A platform admin demoted since keeps its decisions out of the
    company owners' reach. The admin token is the platform admin; a user that no
    longer exists counts as the highest rank (deny by default)."""
    if row.actor == ADMIN_TOKEN_ACTOR:
        return "admin"
    user = session.get(User, row.actor)
    now = user.role if user is not None else "admin"
    made = row.actor_role if row.actor_role is not None else now
    return max(made, now, key=lambda role: policy.ROLE_RANK.get(role, len(policy.ROLE_RANK)))


def _set_disabled(session: Session, kind: str, value: str, moment: datetime | None) -> None:
    table: type[User] | type[Company] = User if kind == "user" else Company
    session.execute(update(table).where(col(table.id) == value).values(disabled_at=moment))


def _takes_an_owner(session: Session, user_id: str) -> bool:
    """The user is an active owner, read after the company's lock is taken."""
    found = session.execute(
        select(col(User.role), col(User.disabled_at)).where(col(User.id) == user_id)
    ).first()
    return found is not None and found[0] == "owner" and found[1] is None


def create_revocation(
    session: Session,
    p: Principal,
    target: Target,
    reason: str | None,
    ttl_seconds: int,
) -> Revocation:
    owner = _owner_of(session, target)
    if owner is None or not policy.can_revoke(p, target.kind, *owner):
        raise NotFound(f"No such {target.kind.replace('jti', 'token')}.")
    company_id = owner[0]
    if target.kind == "user":
        # Two owners revoking each other at once would leave the company none.
        owners.lock_company(session, company_id)
        # A role changes under that lock too (`accounts.set_role`): read as it is now,
        # a user promoted while this waited is not revoked with the rank it had.
        role = session.execute(select(col(User.role)).where(col(User.id) == target.value)).scalar()
        if role is None or not policy.can_revoke(p, target.kind, company_id, role):
            raise NotFound("No such user.")
        if _takes_an_owner(session, target.value):
            owners.keep_an_owner(session, p, company_id, target.value)
    now = utcnow()
    row = Revocation(
        id=new_id(),
        kind=target.kind,
        value=target.value,
        company_id=company_id,
        reason=reason,
        actor=actor_of(p),
        actor_role=p.role,
        created_at=now,
        expires_at=now + timedelta(seconds=ttl_seconds),
        lifted_at=None,
    )
    session.add(row)
    if target.kind in ("user", "company"):
        _set_disabled(session, target.kind, target.value, now)
    session.flush()
    return row


@dataclass(frozen=True, slots=True)
class Lifted:
    """A lifted revocation, and whether its target is still revoked by another one
    (then the target stays disabled and the edges' key stays)."""

    row: Revocation
    still_revoked: bool


def _lock_target(session: Session, kind: str, value: str) -> None:
    """Lock the user's or company's row, as `create_revocation`'s UPDATE does: a lift
    and a new revocation of the same target then run one after the other, so the
    lift sees the other's row before deciding to re-enable."""
    if kind in ("user", "company"):
        table: type[User] | type[Company] = User if kind == "user" else Company
        session.execute(select(col(table.id)).where(col(table.id) == value).with_for_update())


def in_force_besides(session: Session, row: Revocation) -> bool:
    """Another revocation of the same target still in force: not lifted and, for a
    token (whose only effect is the edges' expiring key), not expired either; a
    user's or company's holds until lifted (`disabled_at`). A token is also revoked
    for good when its chat session was deleted or the sweeper settled it as silent
    (`stream_revocations`): before, a lift withdrew that key too, and the deleted
    answer's URL replayed until the next republishing pass."""
    if row.kind == "jti" and row.company_id is not None:
        if stream_revoked(session, row.company_id, row.value):
            return True
    stmt = select(col(Revocation.id)).where(
        col(Revocation.kind) == row.kind,
        col(Revocation.value) == row.value,
        col(Revocation.id) != row.id,
        col(Revocation.lifted_at).is_(None),
    )
    if row.kind == "jti":
        stmt = stmt.where(col(Revocation.expires_at) > utcnow())
    return session.execute(stmt.limit(1)).first() is not None


def lift_revocation(session: Session, p: Principal, revocation_id: str) -> Lifted:
    """Lift one revocation. Its target comes back only when no other revocation of
    it is still in force: an owner lifting its own revocation of a member must not
    undo the platform admin's revocation of the same member."""
    row = session.get(Revocation, revocation_id)
    if row is None or row.company_id is None:
        raise NotFound("No such revocation.")
    owner = _owner_of(session, Target(row.kind, row.value))
    target_role = owner[1] if owner is not None else None
    revoker_role = _revoker_role(session, row)
    if not policy.can_lift_revocation(p, row.kind, row.company_id, target_role, revoker_role):
        raise NotFound("No such revocation.")
    if logout.is_logout(row):
        # Only the token's holder asked; lifting would revive a token that may sit on
        # a lost laptop. Its user signs in again instead.
        raise Conflict("A sign-out cannot be lifted: the user signs in again.")
    _lock_target(session, row.kind, row.value)
    still_revoked = in_force_besides(session, row)
    if row.lifted_at is None:
        row.lifted_at = utcnow()
        if row.kind in ("user", "company") and not still_revoked:
            _set_disabled(session, row.kind, row.value, None)
        session.flush()
    return Lifted(row, still_revoked)


def list_revocations(
    session: Session,
    p: Principal,
    company_id: str | None,
    req: PageRequest,
) -> Page[Revocation]:
    """Newest first, keyset-paginated."""
    if not policy.can_read_audit(p, company_id):
        raise NotFound("No such company.")
    stmt = select(Revocation)
    if company_id is not None:
        stmt = stmt.where(col(Revocation.company_id) == company_id)
    return read_page(session, stmt, col(Revocation.created_at), col(Revocation.id), req)
