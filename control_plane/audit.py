"""The audit log: who moved money, on whose request, and why.

`record` adds one `AuditEvent` to the caller's session, so it commits or rolls back
with the money movement it describes; `ledger.add_entry` calls it for every ledger
row, which makes "every money movement is audited" a property of the one function
that moves money rather than a rule each use case must remember. The ledger holds
the amounts (the source of truth); the audit row adds the actor, the request id
and free-form `details` (the webhook id, token counts, the checkpoint used …).

Actors: a user id (the user's own request, e.g. a hold at init), ``admin-token``
(the platform admin token), ``edge-webhook`` (a signed usage webhook), ``sweeper``
(the reconciliation sweeper), ``seed`` (``llm-gateway dev``'s demo data).

Administration is audited too (issue 17): every admin action writes one
``admin.*`` event (`record_admin`) in the transaction of the change itself, with
its target (``api_key:<id>``, ``user:<id>``, ``provider:<name>`` …) and what the
target looked like before and after, secrets redacted (`redact`): a provider key
appears only as ``has_key``, a minted API key only by its prefix.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session
from sqlmodel import col

from control_plane.pagination import Page, PageRequest, read_page
from control_plane.tables import AuditEvent, iso, new_id, utcnow
from shared.pricing import format_credits

ADMIN_TOKEN_ACTOR = "admin-token"
WEBHOOK_ACTOR = "edge-webhook"
SWEEPER_ACTOR = "sweeper"
SEED_ACTOR = "seed"

ADMIN_PREFIX = "admin."
# Admin actions (`kind` in the API); at most 32 characters (the column).
API_KEY_CREATE = "admin.api_key.create"
API_KEY_REVOKE = "admin.api_key.revoke"
USER_CREATE = "admin.user.create"
USER_ROLE = "admin.user.role"
COMPANY_CREATE = "admin.company.create"
PROVIDER_SET = "admin.provider.set"
PROVIDER_DELETE = "admin.provider.delete"
REVOCATION_CREATE = "admin.revocation.create"
REVOCATION_LIFT = "admin.revocation.lift"
SIGNING_KEY_ROTATE = "admin.signing_key.rotate"
ENCRYPTION_ROTATE = "admin.encryption.rotate"

REDACTED = "[redacted]"
# Field names whose values are secrets wherever they appear in a before/after.
SECRET_FIELDS = frozenset(
    {"api_key", "api_keys", "key", "key_hash", "password", "password_hash", "secret", "token"}
)
FILTERS = ("kind", "actor", "target", "request_id", "reservation_id")


def redact(value: Any) -> Any:
    """`value` with every secret field's value replaced by ``[redacted]``, at any
    depth: an audit row is read by more people than the secret's owner."""
    if isinstance(value, Mapping):
        return {
            str(k): REDACTED if str(k).lower() in SECRET_FIELDS else redact(v)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [redact(v) for v in value]
    return value


def record(
    session: Session,
    *,
    actor: str,
    action: str,
    company_id: str | None,
    amount_micro: int | None = None,
    reservation_id: str | None = None,
    request_id: str | None = None,
    details: dict[str, Any] | None = None,
    now: datetime | None = None,
) -> AuditEvent:
    event = AuditEvent(
        id=new_id(),
        actor=actor,
        action=action,
        company_id=company_id,
        amount_micro=amount_micro,
        reservation_id=reservation_id,
        request_id=request_id,
        details=dict(details or {}),
        created_at=now or utcnow(),
    )
    session.add(event)
    return event


def record_admin(
    session: Session,
    *,
    actor: str,
    action: str,
    company_id: str | None,
    target: str,
    request_id: str | None,
    before: Mapping[str, Any] | None = None,
    after: Mapping[str, Any] | None = None,
) -> AuditEvent:
    """One admin action: who (`actor`), what (`action`, an ``admin.*`` kind) on what
    (`target`), before and after with secrets redacted."""
    assert action.startswith(ADMIN_PREFIX) and len(action) <= 32, action
    event = record(
        session,
        actor=actor,
        action=action,
        company_id=company_id,
        request_id=request_id,
        details={"before": redact(before), "after": redact(after)},
    )
    event.target = target[:200]
    return event


def page(
    session: Session,
    company_id: str | None,
    req: PageRequest,
    filters: Mapping[str, str] | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> Page[AuditEvent]:
    """Newest first, keyset-paginated.
    `company_id` None lists every company (platform admin only). `filters`: exact
    `actor`, `target`, `request_id`, `reservation_id`; `kind` exact, or a prefix
    when it ends in ``*`` (``admin.*``). `since` inclusive, `until` exclusive."""
    stmt = select(AuditEvent)
    if company_id is not None:
        stmt = stmt.where(col(AuditEvent.company_id) == company_id)
    for name, value in (filters or {}).items():
        if name == "kind":
            if value.endswith("*"):
                # A prefix match, the LIKE wildcards in it escaped.
                prefix = value[:-1].replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
                stmt = stmt.where(col(AuditEvent.action).like(prefix + "%", escape="\\"))
            else:
                stmt = stmt.where(col(AuditEvent.action) == value)
        elif name == "actor":
            stmt = stmt.where(col(AuditEvent.actor) == value)
        elif name == "target":
            stmt = stmt.where(col(AuditEvent.target) == value)
        elif name == "request_id":
            stmt = stmt.where(col(AuditEvent.request_id) == value)
        elif name == "reservation_id":
            stmt = stmt.where(col(AuditEvent.reservation_id) == value)
    if since is not None:
        stmt = stmt.where(col(AuditEvent.created_at) >= since)
    if until is not None:
        stmt = stmt.where(col(AuditEvent.created_at) < until)
    return read_page(session, stmt, col(AuditEvent.created_at), col(AuditEvent.id), req)


def event_public(e: AuditEvent) -> dict[str, Any]:
    return {
        "id": e.id,
        "actor": e.actor,
        "action": e.action,
        "kind": e.action,
        "target": e.target,
        "company_id": e.company_id,
        "amount": None if e.amount_micro is None else format_credits(e.amount_micro),
        "reservation_id": e.reservation_id,
        "request_id": e.request_id,
        "details": e.details,
        "created_at": iso(e.created_at),
    }
