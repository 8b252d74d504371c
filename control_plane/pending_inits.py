"""Outstanding stream grants per user and per company
(``LLMGW_MAX_PENDING_INITS_PER_USER`` / ``_PER_COMPANY``, issue 12.6): an init whose
stream has not started yet keeps a hold, a stashed request in the store and (often)
a session row, so abandoned inits must count against a limit, not only against the
per-minute rate. The user's limit alone did not bound a company: its owner creates
members at will, and their stashed requests (up to ``LLMGW_MAX_REQUEST_BYTES`` each)
filled the Redis every tenant shares.

Each init is a member (its `jti`) of two bounded sets in the store, ``pending:init:
<user>`` and ``pending:company:<company>``, until its hold's deadline, added by
`init_gate` with init's other store work (to both, or to neither). It leaves them
when its stream starts (the edge marks the token used at admission; looked at only
in a set that is full, so the edge needs no extra write and an init below the limits
reads no member), when its hold is settled (`forget`), or at the deadline. Over a
limit, init answers 429 ``too_many_pending_inits`` with ``Retry-After`` — the time
until the full set's oldest grant's hold ends — and changes nothing.
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


def company_pending_key(company_id: str) -> str:
    """Not under ``pending:init:`` (a user id could look like ``company:x``). No hash
    tag: on a Redis Cluster `init_gate` goes step by step, one key at a time."""
    return f"pending:company:{company_id}"


def keys(user_id: str, company_id: str) -> list[str]:
    """The sets an init joins, in the order `init_gate` checks them (`SCOPES`)."""
    return [pending_key(user_id), company_pending_key(company_id)]


SCOPES = ("user", "company")


def used_key(company_id: str, jti: str) -> str:
    """The key the edge sets when a token is first used (`stream_edge.grants.used_key`;
    tests/test_abuse_storage.py checks the two agree)."""
    return f"jti:{company_tag(company_id)}:{jti}"


def refusal(scope: str, limit: int, frees_at: float, now: float) -> TooManyPendingInits:
    """The user (`scope` "user") or its company already has `limit` pending grants
    (counted by `init_gate`); the earliest one's hold ends at `frees_at`."""
    retry_after = max(1, math.ceil(frees_at - now))
    who = "You have" if scope == "user" else "Your company has"
    return TooManyPendingInits(
        f"{who} {limit} chat inits whose streams have not started; start or "
        f"let them expire (retry in {retry_after} s).",
        retry_after,
    )


async def forget(store: BoundedSetStore, user_id: str, company_id: str, jti: str) -> None:
    """`jti` no longer pending (its init failed, or its hold ended): out of the user's
    and the company's sets in one round trip. Best effort: a member left behind only
    waits for its deadline."""
    try:
        await store.bounded_remove(keys(user_id, company_id), jti)
    except Exception:
        log.warning("could not forget pending init %s", jti, exc_info=True)
