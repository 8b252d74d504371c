"""The ``/v1/admin/…`` use cases on companies, users, API keys, signing keys and
revocations: each one transaction that makes the change (`accounts`,
`signing_keys`, `revoking`, which check
the policy against the rows they touch) and records it in the audit log, never a
secret (a key's prefix, a user's `has_password`, a signing key's kid)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from cryptography.fernet import MultiFernet
from sqlalchemy.orm import Session

from control_plane import accounts, audit, revoking
from control_plane.policy import Principal
from control_plane.signing_keys import (
    create_signing_key,
    retire_all_but,
    retire_superseded_keys,
)
from control_plane.tables import ApiKey, Company, Revocation, User


@dataclass(frozen=True)
class Actor:
    """Who acts, and the request the audit ties the change to."""

    principal: Principal
    request_id: str

    @property
    def name(self) -> str:
        return accounts.actor_of(self.principal)


def _record(
    session: Session,
    a: Actor,
    action: str,
    company_id: str | None,
    target: str,
    *,
    before: Mapping[str, Any] | None = None,
    after: Mapping[str, Any] | None = None,
) -> None:
    audit.record_admin(
        session,
        actor=a.name,
        action=action,
        company_id=company_id,
        target=target,
        request_id=a.request_id,
        before=before,
        after=after,
    )


def _if_changed(
    session: Session,
    a: Actor,
    action: str,
    company_id: str | None,
    target: str,
    before: Mapping[str, Any] | None,
    after: Mapping[str, Any],
) -> None:
    """Audit an idempotent action only when it changed something (revoking a
    revoked key, lifting a lifted revocation does not)."""
    if before != after:
        _record(session, a, action, company_id, target, before=before, after=after)


def create_company(session: Session, a: Actor, name: str, credits_micro: int) -> Company:
    company = accounts.create_company(session, a.principal, name, credits_micro, a.request_id)
    _record(
        session,
        a,
        audit.COMPANY_CREATE,
        company.id,
        f"company:{company.id}",
        after=accounts.company_public(company),
    )
    return company


def create_user(
    session: Session,
    a: Actor,
    *,
    company_id: str,
    email: str,
    password_hash: str | None,
    role: str,
) -> User:
    user = accounts.create_user(
        session,
        a.principal,
        company_id=company_id,
        email=email,
        password_hash=password_hash,
        role=role,
    )
    _record(
        session,
        a,
        audit.USER_CREATE,
        user.company_id,
        f"user:{user.id}",
        after={**accounts.user_public(user), "has_password": password_hash is not None},
    )
    return user


def set_role(
    session: Session, a: Actor, user_id: str, role: str, password_hash: str | None = None
) -> accounts.RoleChange:
    """`accounts.set_role`, audited when the role did change (with whether the user
    had a password, and has one, when the change ended its credentials), and each
    API key the change revoked."""
    change = accounts.set_role(session, a.principal, user_id, role, password_hash)
    user, previous = change.user, change.previous
    if previous != role:
        before: dict[str, Any] = {"role": previous}
        after: dict[str, Any] = {"role": role}
        if change.credentials_ended:
            before["has_password"] = change.had_password
            after["has_password"] = user.password_hash is not None
            after["sign_ins_ended"] = True
        _record(
            session,
            a,
            audit.USER_ROLE,
            user.company_id,
            f"user:{user.id}",
            before=before,
            after=after,
        )
    for row, before in change.voided:
        after = accounts.api_key_public(row)
        target = f"api_key:{row.id}"
        _record(
            session, a, audit.API_KEY_REVOKE, user.company_id, target, before=before, after=after
        )
    return change


def create_api_key(session: Session, a: Actor, user_id: str, scopes: Any) -> accounts.CreatedKey:
    created = accounts.create_api_key(session, a.principal, user_id, scopes)
    row = session.get(ApiKey, created.id)
    user = session.get(User, user_id)
    assert row is not None and user is not None
    shown = accounts.api_key_public(row)  # the prefix only, never the key
    _record(session, a, audit.API_KEY_CREATE, user.company_id, f"api_key:{row.id}", after=shown)
    return created


def revoke_api_key(session: Session, a: Actor, key_id: str) -> tuple[str, list[str]]:
    """`accounts.revoke_api_key` (404 unless the caller may), audited when it
    changed something; the key's company and the ids of the stream tokens it minted
    that still hold credits (unused, or streaming): the caller revokes them at the
    edges, which know nothing of API keys."""
    row = session.get(ApiKey, key_id)
    before = None if row is None else accounts.api_key_public(row)
    accounts.revoke_api_key(session, a.principal, key_id)
    user = None if row is None else session.get(User, row.user_id)
    assert row is not None and user is not None
    session.refresh(row)
    after = accounts.api_key_public(row)
    _if_changed(
        session, a, audit.API_KEY_REVOKE, user.company_id, f"api_key:{key_id}", before, after
    )
    return user.company_id, accounts.open_stream_ids(session, user.company_id, key_id)


def rotate_signing_key(
    session: Session,
    a: Actor,
    fernet: MultiFernet,
    now: datetime,
    max_life: int,
    *,
    retire_others: bool = False,
) -> tuple[str, list[str]]:
    """A new signing key, and the kids of the keys retired: superseded more than
    `max_life` seconds ago (they signed only expired tokens), or with
    `retire_others` every other key at once (one leaked: its tokens stop verifying,
    and everyone signs in again)."""
    retired = retire_superseded_keys(session, now, max_life)
    kid, _ = create_signing_key(session, fernet)
    if retire_others:
        retired += retire_all_but(session, kid, now)
    done = {"kid": kid, "retired": retired}
    _record(session, a, audit.SIGNING_KEY_ROTATE, None, f"signing_key:{kid}", after=done)
    return kid, retired


def create_revocation(
    session: Session, a: Actor, target: revoking.Target, reason: str | None, ttl: int
) -> Revocation:
    row = revoking.create_revocation(session, a.principal, target, reason, ttl)
    shown, subject = revoking.revocation_public(row), f"{row.kind}:{row.value}"
    _record(session, a, audit.REVOCATION_CREATE, row.company_id, subject, after=shown)
    return row


def lift_revocation(session: Session, a: Actor, revocation_id: str) -> revoking.Lifted:
    """`revoking.lift_revocation` (404 unless the caller may), audited when it
    changed something."""
    found = session.get(Revocation, revocation_id)
    before = None if found is None else revoking.revocation_public(found)
    lifted = revoking.lift_revocation(session, a.principal, revocation_id)
    row = lifted.row
    after = revoking.revocation_public(row)
    subject = f"{row.kind}:{row.value}"
    _if_changed(session, a, audit.REVOCATION_LIFT, row.company_id, subject, before, after)
    return lifted
