"""Failed logins, limited per email and per client address (DESIGN §11,
``LLMGW_LOGIN_FAILURES_PER_15MIN``, default 10): a brute-force and CPU door shut.

Each attempt is counted *before* the password is verified (`claim_attempt`), in
fixed 15-minute windows kept in the store, so every control-plane process shares the
counters through Redis (the in-memory store serves the single-process dev mode). An
attempt over the limit is refused with 429 and ``Retry-After`` without touching
argon2: that is the point, a refused guess must cost us nothing. Counting first also
holds under concurrency: a thousand parallel guesses cannot all slip in before the
first failure is recorded. A login that succeeds takes its count back (`forgive`),
so only failures add up.

The address is the connection's peer (uvicorn runs with ``proxy_headers``, so
behind a trusted proxy it is the forwarded client); IPv6 addresses are counted per
/64, the block one subscriber usually holds. The email is hashed in the key: no
addresses of people in Redis.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
from dataclasses import dataclass

from control_plane.errors import LoginThrottled, ServiceUnavailable
from control_plane.rate_limits import Window, window_at
from shared.store import CounterStore

log = logging.getLogger("control_plane.login_limits")

WINDOW_SECONDS = 15 * 60
IPV6_PREFIX = 64


def client_bucket(host: str | None) -> str:
    """Pure: who a client address counts as."""
    if not host:
        return "unknown"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host[:100]  # a unix socket path or the like: as given
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, IPV6_PREFIX), strict=False))
    return str(ip)


def attempt_keys(email: str, address: str, window: Window) -> list[str]:
    email_digest = hashlib.sha256(email.encode("utf-8")).hexdigest()[:32]
    return [
        f"rl:login:email:{email_digest}:{window.start}",
        f"rl:login:addr:{address}:{window.start}",
    ]


@dataclass(frozen=True, slots=True)
class Attempt:
    """A counted login attempt, to `forgive` if the password turns out right."""

    keys: list[str]


async def claim_attempt(
    store: CounterStore, *, email: str, address: str, limit: int, now: float
) -> Attempt:
    """Count one attempt for `email` and `address`; LoginThrottled (429) when either
    has already used its `limit` in this window. Call before verifying the password.

    The address is counted and checked first: an address over its limit is refused
    before its email is counted, or every made-up email it sends would still leave a
    counter in the store for the window."""
    window = window_at(now, WINDOW_SECONDS)
    email_key, address_key = keys = attempt_keys(email, address, window)
    for key in (address_key, email_key):
        try:
            count = await store.hit(key, WINDOW_SECONDS)
        except Exception:
            log.exception("login counter unavailable")
            raise ServiceUnavailable("The request store is unavailable; retry shortly.") from None
        if count > limit:
            raise LoginThrottled(
                f"Too many failed logins ({limit} per 15 minutes) for this account or "
                f"address; retry in {window.retry_after} s.",
                window.retry_after,
            )
    return Attempt(keys)


async def forgive(store: CounterStore, attempt: Attempt) -> None:
    """The password was right: this attempt was not a failure."""
    try:
        for key in attempt.keys:
            await store.unhit(key, WINDOW_SECONDS)
    except Exception:
        # The login itself succeeded; an attempt left counted only tightens the limit.
        log.exception("could not take back a login attempt")
