"""A per-company rate limit on admin writes: every state-changing request under
``/v1/admin/`` (users, roles, API keys, budgets, teams, the webhook, agents,
providers, revocations...), each of which writes an audit row kept for good.

Without it an owner's script looping any admin write (a member's role back and
forth) filled the database as fast as the server answered: ~70-90 writes a second
from one client, an audit row each. Counted in the store's fixed one-minute windows
(`rate_limits`, another key), so every control-plane process shares one counter per
company; checked once the caller is known (`auth.authenticate`) and before any
handler reads its input or writes, so a refused write changes nothing and is
audited nowhere. A request refused by the rate still counts, as for inits; one
from a caller without the admin scope does not (the handler can only refuse it).

The platform admin (the operator's token, or a user with the admin role) is not
counted: it is the operator, provisioning companies and credits by script, whose
storage it pays for; the limit is on what a tenant may make the operator store.

With the store down the write is let through, uncounted (logged): the limit bounds
storage over hours, which an outage's minutes do not change, while an owner demoting
or deleting a rogue member in those minutes must not be refused.
"""

from __future__ import annotations

import logging

from control_plane.errors import RateLimited
from control_plane.rate_limits import WINDOW_SECONDS, Window, window_at
from shared.store import CounterStore

log = logging.getLogger("control_plane.admin_writes")

ADMIN_PATH = "/v1/admin/"
READS = frozenset({"GET", "HEAD", "OPTIONS"})


def is_admin_write(method: str, path: str) -> bool:
    """A request that may change state under ``/v1/admin/`` (and so write an audit row)."""
    return path.startswith(ADMIN_PATH) and method.upper() not in READS


def limit_key(company_id: str, window: Window) -> str:
    return f"rl:admin:company:{company_id}:{window.start}"


async def check_admin_write_rate(
    store: CounterStore, *, company_id: str, per_minute: int, now: float
) -> None:
    """Count this admin write for its company; RateLimited (429) past `per_minute`.
    The store failing lets it through, uncounted."""
    window = window_at(now)
    try:
        count = await store.hit(limit_key(company_id, window), WINDOW_SECONDS)
    except Exception as exc:
        log.warning("admin write of company %s not counted: %s", company_id, type(exc).__name__)
        return
    if count > per_minute:
        raise RateLimited(
            f"Too many admin writes for this company ({per_minute} per minute); "
            f"retry in {window.retry_after} s.",
            window.retry_after,
        )
