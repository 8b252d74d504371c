"""The edges' revocation keys, published again every few seconds from the database.

A revocation is recorded in the database, then told to the edges by a key in the
store (`shared.revocations.revoke`). That key can be lost while the record stands:
the store's write failed (a Redis blip; the route answers 503 "retry", and an admin
may not), or Redis failed over to a replica the key had not reached. The edges then
let the revoked user's, key's or session's already-minted stream tokens start, and
their running streams relay on, for up to a token's life and a stream's.

So each control-plane process, every `REPUBLISH_SECONDS`, reads what must still be
known at the edges and sets again those of the keys the store lost, each with the
life it has left (`shared.revocations.restore`: a key still standing is not
touched, since the life left is read on this process's clock from another's
`created_at`, and a clock running ahead, rewriting the TTL, cut it short):

* the revocations not lifted made within `revoking.revocation_ttl` (an admin's of a
  user, a company or a token; a sign-out), ``ix_revocations_in_force_created``;
* the API keys revoked within it (their `api_key_parent`), ``ix_api_keys_revoked_at``;
* the stream tokens revoked within it with no revocation row: a deleted chat
  session's and a silent stream's the sweeper settled (``reservations.revoked_at``,
  set in the deletion's and the settlement's transaction, `stream_revocations`),
  ``ix_reservations_revoked_at``. Without them a failover that lost those keys let
  the deleted session's URLs replay and its unused tokens stream its history, and
  a stalled edge relay a settled stream on, unbilled. Where such a key was lost,
  the request stashed for its token (a deleted session's history, which the
  deletion had removed) may be back too: it is removed again.

A pass also writes again the retired signing keys' entry the store lost
(`retired_announce.republish`, `republish_once`).

Three indexed reads in one transaction and the keys' writes, sent together on the
store's pipelined connection. Measured: 10,000 keys cost a pass 0.17 s of CPU (3 % of
a core every 5 s). What bounds them: revocations and API key revocations are admin
writes (`LLMGW_ADMIN_WRITE_RATE_PER_COMPANY`), a sign-out follows a sign-in (a
password hash each); in the ~16 minutes a key is kept, an owner at its company's
whole write allowance (600 a minute) makes ~9,600. The stream tokens are one per
silent stream and a few per deleted session (those of its turns still active or
ended within the resume grace): each was an init, a hold of credits and one of
`LLMGW_INIT_RATE_PER_COMPANY` (1,200 a minute, ~19,200 in the window at most).

A lift must win over a pass that read the revocation before the lift committed.
The lift commits, then deletes the key (`routes.admin_revocations`); a pass's write
landing after that delete would bring the key back for up to the whole TTL. So,
after writing, a pass reads again which of the liftable revocations it wrote are now
lifted: a lift whose delete came before the pass's write committed before it, so
this read sees it, and the pass deletes the key itself, then looks once more and
puts it back if another revocation of that target is in force, as the lift route
does. A lift whose delete came after the pass's write needs nothing. Sign-outs and
API keys cannot be lifted, nor a deleted session's or a silent stream's token.
"""

from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session
from sqlmodel import col

from control_plane import logout, retired_announce
from control_plane.db import Database
from control_plane.deps import Deps
from control_plane.retired_announce import max_token_life
from control_plane.revoking import in_force_besides, revocation_ttl
from control_plane.stream_revocations import revoked_since
from control_plane.tables import ApiKey, Revocation, User, utcnow
from shared.revocations import api_key_parent, restore, revocation_key, revoke
from shared.stash import stash_key
from shared.store import KeyValueStore

log = logging.getLogger("control_plane.revocation_republish")

# A lost key is back at the edges within this, plus their one-second check.
REPUBLISH_SECONDS = 5.0
# Writes sent together; a pass over more sends a few batches.
BATCH_KEYS = 1000


@dataclass(frozen=True, slots=True)
class Standing:
    """A key the edges must still hold, for `seconds` more. `revocation_id`: the
    revocation a lift may still end (None: a sign-out's or an API key's)."""

    kind: str
    value: str
    company_id: str
    seconds: int
    revocation_id: str | None
    # A deleted session's or a silent stream's token (`stream_revocations`): a store
    # that lost its key may have kept the request stashed for it, which goes too.
    stashed: bool = False


def standing(session: Session, now: datetime, ttl: int) -> list[Standing]:
    """What the edges must know now: revocations, revoked API keys and stream tokens
    (`stream_revocations`) younger than `ttl` (`revoking.revocation_ttl`), each with
    the life its key has left."""
    since = now - timedelta(seconds=ttl)
    found: list[Standing] = []
    rows = session.execute(
        select(
            col(Revocation.id),
            col(Revocation.kind),
            col(Revocation.value),
            col(Revocation.company_id),
            col(Revocation.reason),
            col(Revocation.created_at),
            col(Revocation.expires_at),
        ).where(col(Revocation.lifted_at).is_(None), col(Revocation.created_at) > since)
    ).all()
    for rid, kind, value, company_id, reason, created_at, expires_at in rows:
        # A sign-out's row outlives its key: the key's life is the stream's, from the
        # sign-out (`routes.account.sign_out`).
        seconds = _left(min(expires_at, created_at + timedelta(seconds=ttl)), now)
        if company_id is None or seconds <= 0:
            continue
        signed_out = kind == "jti" and reason == logout.LOGOUT_REASON  # `logout.is_logout`
        found.append(Standing(kind, value, company_id, seconds, None if signed_out else rid))
    keys = session.execute(
        select(col(ApiKey.id), col(User.company_id), col(ApiKey.revoked_at))
        .join(User, col(User.id) == col(ApiKey.user_id))
        .where(col(ApiKey.revoked_at).is_not(None), col(ApiKey.revoked_at) > since)
    ).all()
    for key_id, company_id, revoked_at in keys:
        assert revoked_at is not None  # the statement's own condition
        seconds = _left(revoked_at + timedelta(seconds=ttl), now)
        if seconds > 0:
            found.append(Standing("jti", api_key_parent(key_id), company_id, seconds, None))
    for jti, company_id, revoked_at in revoked_since(session, since):
        seconds = _left(revoked_at + timedelta(seconds=ttl), now)
        if seconds > 0:
            found.append(Standing("jti", jti, company_id, seconds, None, stashed=True))
    return found


def _left(until: datetime, now: datetime) -> int:
    return math.ceil((until - now).total_seconds())


def lifted_among(session: Session, ids: list[str]) -> list[Revocation]:
    """Those of `ids` lifted by now whose target no other revocation keeps revoked:
    their keys must go (`in_force_besides`)."""
    rows = session.scalars(
        select(Revocation).where(
            col(Revocation.id).in_(ids), col(Revocation.lifted_at).is_not(None)
        )
    ).all()
    return [row for row in rows if not in_force_besides(session, row)]


def still_revoked(session: Session, rows: list[Revocation]) -> list[Revocation]:
    return [row for row in rows if in_force_besides(session, row)]


async def _publish(store: KeyValueStore, keys: list[Standing]) -> BaseException | None:
    """Every write is made, whichever fail (a gather stopping at the first left the
    others landing unwatched, past the lift check); the first failure, if any."""
    failure: BaseException | None = None
    for start in range(0, len(keys), BATCH_KEYS):
        results = await asyncio.gather(
            *(_restore(store, k) for k in keys[start : start + BATCH_KEYS]),
            return_exceptions=True,
        )
        failure = failure or next((r for r in results if isinstance(r, BaseException)), None)
    return failure


async def _restore(store: KeyValueStore, key: Standing) -> None:
    if await restore(store, key.kind, key.value, key.company_id, key.seconds) and key.stashed:
        # The key was lost, so the stash's removal may have been too (a failover to a
        # replica without the deletion's writes): a deleted session's history left
        # in the store for the token's life plus 10 minutes.
        await store.delete(stash_key(key.company_id, key.value))


async def republish_pass(db: Database, store: KeyValueStore, ttl: int) -> int:
    """One pass; how many keys it set."""
    now = utcnow()
    keys = await db.transaction(lambda s: standing(s, now, ttl))
    await publish(db, store, ttl, keys)
    return len(keys)


async def publish(db: Database, store: KeyValueStore, ttl: int, keys: list[Standing]) -> None:
    """Set `keys` (read by `standing`), then undo those of revocations lifted since;
    raises the first write's failure once that is done (a write that landed after a
    lift's delete must still be undone)."""
    failure = await _publish(store, keys)
    ids = [k.revocation_id for k in keys if k.revocation_id is not None]
    if ids:
        await _undo_lifted(db, store, ttl, ids)
    if failure is not None:
        raise failure


async def _undo_lifted(db: Database, store: KeyValueStore, ttl: int, ids: list[str]) -> None:
    # A lift committed since the read above whose delete our write may have undone.
    lifted = await db.transaction(lambda s: lifted_among(s, ids))
    if lifted:
        await withdraw(db, store, lifted, ttl)


async def withdraw(db: Database, store: KeyValueStore, rows: list[Revocation], ttl: int) -> None:
    """Take lifted revocations' keys from the edges (a lift, or a pass undoing its own
    write after one). A revocation of the same target committed after the lift looked
    may have published its key before the delete: looked for again once the keys are
    gone, and put back. (One published after the delete needs nothing.)"""
    for row in rows:
        assert row.company_id is not None  # a lifted revocation is of a company's subject
        await store.delete(revocation_key(row.kind, row.value, row.company_id))
    back = await db.transaction(lambda s: still_revoked(s, rows))
    for row in back:
        assert row.company_id is not None
        await revoke(store, row.kind, row.value, row.company_id, ttl)


async def republish_once(deps: Deps) -> None:
    """One pass: the revocations' keys, then the retired signing keys' entry
    (`retired_announce`)."""
    await republish_pass(deps.db, deps.store, revocation_ttl(deps.settings))
    await retired_announce.republish(deps.db, deps.store, max_token_life(deps.settings))


async def republish_revocations(deps: Deps, interval: float = REPUBLISH_SECONDS) -> None:
    """Republish forever; cancelled by the app's lifespan at shutdown."""
    while True:
        await asyncio.sleep(interval)
        try:
            await republish_once(deps)
        except Exception as exc:  # the store or the database is briefly down: next pass
            log.warning("revocations republish failed: %s", type(exc).__name__)
