"""Signing keys retired on any instance, refused by this one within about a second.

A platform admin retires every key but a new one when a key may have leaked
(`POST /v1/admin/signing-keys/rotate` with `retire_others`). The instance that
rotated reloads its key ring at once; a sibling (`--workers N`, replicas) trusted
the leaked key until its ring's next read, up to a minute on, and whoever held the
key could sign access tokens it accepted for anyone, the platform admin included.
The rotation announces the retired keys in the store
(`shared.revocations.RETIRED_SIGNING_KEYS`); each control-plane process reads that
set once a second and stops trusting them, and reads its ring again at once if it
was signing with one. While the store cannot answer, it reads the database's record
instead (`retired_announce.retired_lives`); a store that lost the set has it back
from the republishing pass (`retired_announce.republish`).
"""

from __future__ import annotations

import asyncio
import logging

from control_plane.deps import Deps
from control_plane.retired_announce import max_token_life, retired_lives
from control_plane.tables import utcnow
from shared.revocations import retired_signing_keys

log = logging.getLogger("control_plane.retired_keys")

CHECK_SECONDS = 1.0
# How long a pass waits on the store before it reads the database instead.
STORE_READ_SECONDS = 1.0


async def watch_retired_keys(deps: Deps, interval: float = CHECK_SECONDS) -> None:
    """Check forever; cancelled by the app's lifespan at shutdown."""
    while True:
        await asyncio.sleep(interval)
        try:
            await check_retired_keys(deps)
        except Exception as exc:  # the store or the database is briefly down: next pass
            log.warning("retired signing keys check failed: %s", type(exc).__name__)


async def check_retired_keys(deps: Deps) -> None:
    try:
        # A silent store (a partition, a frozen Redis) answers nothing for its
        # 20 s reply timeout, every pass: not waited for past a pass.
        async with asyncio.timeout(STORE_READ_SECONDS):
            kids = await retired_signing_keys(deps.store)
    except Exception:
        # The store is down (a rotation made now answers 503 and cannot announce):
        # the database's record, so the keys it retired are not trusted for up to a
        # minute more (the ring's next read). One small read a second, only then.
        kids = await _recorded(deps)
        log.warning("retired signing keys read from the database: the store is down")
    if deps.keyring.retire(kids):
        # Another instance retired the key this one signs with: read the new one.
        await deps.fresh_keyring(unknown_kid=True)


async def _recorded(deps: Deps) -> frozenset[str]:
    now, life = utcnow(), max_token_life(deps.settings)
    lives = await deps.db.transaction(lambda s: retired_lives(s, now, life))
    return frozenset(kid for kid, _ in lives)
