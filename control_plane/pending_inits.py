"""Outstanding stream grants per user (``LLMGW_MAX_PENDING_INITS_PER_USER``, issue
12.6): an init whose stream has not started yet keeps a hold, a stashed request in
the store and (often) a session row, so abandoned inits must count against a limit,
not only against the per-minute rate.

Each init is a member (its `jti`) of a bounded set in the store, ``pending:<user>``,
until its hold's deadline, added by `init_gate` with init's other store work. It
leaves the set when its stream starts (the edge marks the token used at admission;
looked at only when the set is full, so the edge needs no extra write and an init
below the limit reads no member), when its hold is settled (`forget`), or at the
deadline. Over the limit, init answers 429 ``too_many_pending_inits`` with
``Retry-After`` — the time until the oldest grant's hold ends — and changes nothing.
"""

from __future__ import annotations

import logging
import math

from control_plane.errors import TooManyPendingInits
from shared.hash_tags import company_tag
from shared.store import BoundedSetStore

log = logging.getLogger("control_plane.pending_inits")


def pending_key(user_id: str) -> str:
    return f"pending:init:{user_id}"


def used_key(company_id: str, jti: str) -> str:
    """The key the edge sets when a token is first used (`stream_edge.grants.used_key`;
    tests/test_abuse_storage.py checks the two agree)."""
    return f"jti:{company_tag(company_id)}:{jti}"


def refusal(limit: int, frees_at: float, now: float) -> TooManyPendingInits:
    """The user already has `limit` pending grants (counted by `init_gate`); the
    earliest one's hold ends at `frees_at`."""
    retry_after = max(1, math.ceil(frees_at - now))
    return TooManyPendingInits(
        f"You have {limit} chat inits whose streams have not started; start or "
        f"let them expire (retry in {retry_after} s).",
        retry_after,
    )


async def forget(store: BoundedSetStore, user_id: str, jti: str) -> None:
    """`jti` no longer pending (its init failed, or its hold ended); best effort: a
    member left behind only waits for its deadline."""
    try:
        await store.bounded_remove(pending_key(user_id), jti)
    except Exception:
        log.warning("could not forget pending init %s", jti, exc_info=True)
