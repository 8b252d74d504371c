"""The retired signing keys the edges and control planes must still refuse, told to
them through the store (`shared.revocations.RETIRED_SIGNING_KEYS`, read once a second
by `control_plane.retired_keys` and `stream_edge.revocation_watch`): by the rotation
that retires them, and again by every republishing pass
(`revocation_republish.republish_once`).

The database is the record (``signing_keys.retired_at``); the store's entry only
tells. It can be lost while the keys' tokens still live: Redis restarted empty or
failed over to a replica that missed the rotation's write, or the rotation ran while
Redis was down (503). An edge whose JWKS cache still held a leaked key (up to 5
minutes) then streamed the thief's tokens again, a sibling control plane accepted its
access tokens until its ring's next read (up to a minute), and nothing wrote the
entry again. So each pass adds back the keys the store lost.

A key is told until the longest token life (`max_token_life`) after it was retired,
however long ago a newer key superseded it. Its honest tokens expired a token life
after it stopped signing, but a key retired because it leaked signs whatever the
thief likes, any `exp` included, and it was in the JWKS (and every sibling's ring)
until its retirement: counted from its supersession instead, a key superseded long
ago and leaked was never told, and for up to a minute a sibling answered the thief's
access token 200 and for up to 5 minutes an edge whose JWKS cache held it streamed
the thief's stream tokens (review: both measured 200).
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session
from sqlmodel import col

from control_plane.auth import ACCESS_TOKEN_TTL_SECONDS
from control_plane.db import Database
from control_plane.settings import ControlPlaneSettings
from control_plane.tables import SigningKey, utcnow
from shared.revocations import announce_retired_signing_keys, retired_signing_keys
from shared.store import BoundedSetStore


def max_token_life(settings: ControlPlaneSettings) -> int:
    """The longest a token a key signed lives (access tokens, stream tokens), plus a
    minute: a sibling's ring signs on with a superseded key until its next read."""
    return max(ACCESS_TOKEN_TTL_SECONDS, settings.token_ttl_seconds) + 60


def retired_lives(session: Session, now: datetime, max_life: int) -> list[tuple[str, datetime]]:
    """(kid, until) of each key retired less than `max_life` ago, told until `max_life`
    after its retirement (the module's docstring says why not after its supersession)."""
    rows = session.execute(
        select(col(SigningKey.kid), col(SigningKey.retired_at)).where(
            col(SigningKey.retired_at) > now - timedelta(seconds=max_life)
        )
    ).all()
    lives: list[tuple[str, datetime]] = []
    for kid, retired_at in rows:
        assert retired_at is not None  # the statement's own condition
        lives.append((kid, retired_at + timedelta(seconds=max_life)))
    return lives


async def announce(db: Database, store: BoundedSetStore, max_life: int) -> None:
    """The rotation's: every retired key whose tokens may live on, each for that
    long. Each rotation tells them all, so a retry completes the one before."""
    now = utcnow()
    for kid, until in await db.transaction(lambda s: retired_lives(s, now, max_life)):
        await announce_retired_signing_keys(store, [kid], until.timestamp(), now.timestamp())


async def republish(db: Database, store: BoundedSetStore, max_life: int) -> int:
    """A pass's: those of them the store lost, each for the life it has left; how
    many. One the store holds is not touched: its life left is read here on this
    host's clock from the rotating host's `retired_at`, and a clock running ahead
    would cut it short (as `shared.revocations.restore` leaves a standing key)."""
    now = utcnow()
    lives = await db.transaction(lambda s: retired_lives(s, now, max_life))
    if not lives:
        return 0
    held = await retired_signing_keys(store)
    lost = [(kid, until) for kid, until in lives if kid not in held]
    for kid, until in lost:
        await announce_retired_signing_keys(store, [kid], until.timestamp(), now.timestamp())
    return len(lost)
