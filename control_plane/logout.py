"""Sign-out (``POST /v1/auth/logout``): a user ends the one token it presents.

The token is revoked by its revocable id (`Principal.token_id`: an access token's
jti, a trusted external JWT's hashed `jti`) through the same two halves as an
admin's revocation of a token (`revoking`):

* **the record**, a ``revocations`` row of kind ``jti`` with reason `LOGOUT_REASON`.
  Unlike a stream token's revocation it is also the durable switch: every request
  with an access token reads it in the same statement that reads the user
  (`auth.access_token_row`), so every control-plane process refuses the token at
  once (401 ``signed_out``), and a store that lost its data cannot bring it back;
* **the signal to the edges**, the store's ``jti`` key of that id: init signs the id
  into each stream token it mints (`shared.tokens.PARENT_CLAIM`) and the edge checks
  it with the token's own keys, so the session's unused stream tokens are refused
  and its running streams end with ``revoked`` within a second.

A sign-out cannot be lifted (`revoking.lift_revocation`): only the token's holder
asked for it, and lifting it would bring back a token that may sit on a lost laptop.
Once expired (the token and the stream tokens it minted are dead by then) the row
decides nothing more, and the sweeper deletes it (`purge_expired`): successful
logins are not limited, so a member looping login and logout would otherwise grow
the table, and its company's revocations list, for good.
API keys (revoked with ``DELETE /v1/admin/api-keys/{id}``), the admin token and an
external JWT without a ``jti`` are not sessions: 400 ``not_signed_in``.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import bindparam, delete, exists, select
from sqlalchemy.orm import Session
from sqlmodel import col

from control_plane import hot_statements
from control_plane.errors import NotSignedIn
from control_plane.policy import Principal
from control_plane.tables import Revocation, new_id, utcnow
from shared.tokens import LEEWAY_SECONDS

LOGOUT_REASON = "logout"
_KIND = "jti"

_REVOCATIONS = hot_statements.table_of(Revocation)
# One EXISTS on ``ix_revocations_kind_value``; `auth` adds it to the user's lookup.
# Not limited to unexpired rows: a signed-out token expires before its row does.
SIGNED_OUT = (
    exists()
    .where(_REVOCATIONS.c.kind == bindparam("p_revoked_kind"))
    .where(_REVOCATIONS.c.value == bindparam("p_token_id"))
    .where(_REVOCATIONS.c.lifted_at.is_(None))
)


def signed_out_params(token_id: str) -> dict[str, str]:
    return {"p_revoked_kind": _KIND, "p_token_id": token_id}


def is_signed_out(session: Session, token_id: str) -> bool:
    return bool(session.execute(select(SIGNED_OUT), signed_out_params(token_id)).scalar())


def session_of(p: Principal) -> tuple[str, str, int]:
    """The company, revocable id and expiry of the caller's token; 400
    ``not_signed_in`` for a credential that is not a signed-in session."""
    if p.via == "api_key":
        raise NotSignedIn(
            "An API key is not a sign-in: revoke it with DELETE /v1/admin/api-keys/{id}."
        )
    if p.via == "admin_token":
        raise NotSignedIn("The admin token is not a sign-in: change LLMGW_ADMIN_TOKEN instead.")
    if p.token_id is None or p.token_expires_at is None or p.company_id is None:
        raise NotSignedIn("This token carries no jti, so it cannot be signed out on its own.")
    return p.company_id, p.token_id, p.token_expires_at


def revocation_seconds(expires_at: int, now: float, stream_seconds: int) -> int:
    """How long the sign-out's row must last: the token's remaining life (with the
    verifier's leeway), then `stream_seconds` (`revoking.revocation_ttl`: a stream
    token minted at its last second, and that token's stream)."""
    remaining = max(0, int(expires_at - now) + 1) + LEEWAY_SECONDS
    return remaining + stream_seconds


def record_logout(
    session: Session, p: Principal, company_id: str, token_id: str, ttl_seconds: int
) -> None:
    """The durable record, once: a repeated sign-out (a retry whose answer was lost)
    finds it and changes nothing."""
    if is_signed_out(session, token_id):
        return
    assert p.user_id is not None  # `session_of` passed: a user's token
    now = utcnow()
    session.add(
        Revocation(
            id=new_id(),
            kind=_KIND,
            value=token_id,
            company_id=company_id,
            reason=LOGOUT_REASON,
            actor=p.user_id,
            created_at=now,
            expires_at=_after(now, ttl_seconds),
            lifted_at=None,
        )
    )
    session.flush()


def _after(now: datetime, seconds: int) -> datetime:
    """`seconds` after `now`, or the last datetime there is: a trusted external app's
    "never expires" token (``exp`` at 9999-12-31 or later) is then signed out until
    the end of time, never swept while it lives (`purge_expired`)."""
    try:
        return now + timedelta(seconds=seconds)
    except OverflowError:
        return datetime.max.replace(tzinfo=now.tzinfo)


def is_logout(row: Revocation) -> bool:
    return row.kind == _KIND and row.reason == LOGOUT_REASON


def purge_expired(session: Session, now: datetime, limit: int) -> int:
    """Delete up to `limit` sign-outs past their expiry (``ix_revocations_reason_expires``);
    how many went. Their token, with the verifier's leeway, and every stream token it
    minted ended before the row's expiry (`revocation_seconds`)."""
    ids = (
        session.execute(
            select(col(Revocation.id))
            .where(col(Revocation.reason) == LOGOUT_REASON)
            .where(col(Revocation.expires_at) < now)
            .where(col(Revocation.kind) == _KIND)
            .limit(limit)
        )
        .scalars()
        .all()
    )
    if ids:
        session.execute(delete(Revocation).where(col(Revocation.id).in_(ids)))
    return len(ids)
