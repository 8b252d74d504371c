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
/64, the block one subscriber usually holds. A /64 alone is not enough: one holder of
a /48 (a site's usual delegation, RFC 6177; free from tunnel brokers) has 65,536 of
them, 655,360 guesses per window at the default limit. So an IPv6 attempt also counts
in its /48, at `SITE_FACTOR` times the limit: room for a site's (or a carrier pool's)
many subscribers, still 4,096 times fewer guesses for one attacker. The email is
hashed in the key: no addresses of people in Redis.

An account's sign-ins also count in a one-minute window
(``LLMGW_LOGIN_RATE_PER_ACCOUNT``, default 300): past it, 429 `too_many_logins`
before argon2. Successes were not limited at all, so one member looping its own
login ran a ~200 ms, 64 MiB argon2 verify as fast as the server answered. The
attempt is counted in advance (per email as sent, before the user is looked up) and
taken back when the password turns out wrong (`not_a_login`): wrong passwords and
unknown emails are the failure limit's, so they meet the same limits with the same
answers and the failure limit keeps its meaning whatever it is set to. An attempt
this limit refuses is no failure: the failure counts it took are given back.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
from dataclasses import dataclass

from control_plane.errors import LoginThrottled, StoreUnavailable, TooManyLogins
from control_plane.rate_limits import Window, window_at
from shared.store import CounterStore

log = logging.getLogger("control_plane.login_limits")

WINDOW_SECONDS = 15 * 60
RATE_WINDOW_SECONDS = 60
IPV6_PREFIX = 64
IPV6_SITE_PREFIX = 48
SITE_FACTOR = 16


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


def site_bucket(host: str | None) -> str | None:
    """Pure: the /48 an IPv6 client address lies in (None for IPv4 and the rest)."""
    try:
        ip = ipaddress.ip_address(host or "")
    except ValueError:
        return None
    if not isinstance(ip, ipaddress.IPv6Address) or ip.ipv4_mapped is not None:
        return None
    return str(ipaddress.IPv6Network((ip, IPV6_SITE_PREFIX), strict=False))


def attempt_keys(email: str, address: str, window: Window, site: str | None = None) -> list[str]:
    """The email's key, the address's, then the site's when there is one."""
    email_digest = hashlib.sha256(email.encode("utf-8")).hexdigest()[:32]
    keys = [
        f"rl:login:email:{email_digest}:{window.start}",
        f"rl:login:addr:{address}:{window.start}",
    ]
    if site is not None:
        keys.append(f"rl:login:site:{site}:{window.start}")
    return keys


def rate_key(email: str, window: Window) -> str:
    """The email's key in the one-minute window of all its logins."""
    email_digest = hashlib.sha256(email.encode("utf-8")).hexdigest()[:32]
    return f"rl:login:rate:{email_digest}:{window.start}"


@dataclass(frozen=True, slots=True)
class Attempt:
    """A counted login attempt, to `forgive` if the password turns out right, or to
    `withdraw` if it was never checked."""

    keys: list[str]  # the failure counters
    rate_key: str | None = None  # the email's one-minute count of all logins


async def claim_attempt(
    store: CounterStore,
    *,
    email: str,
    address: str,
    limit: int,
    now: float,
    site: str | None = None,
    per_minute: int | None = None,
) -> Attempt:
    """Count one attempt for `email`, `address` and its IPv6 `site` (`site_bucket`);
    LoginThrottled (429) when any has already used its `limit` (the site
    `SITE_FACTOR` times it) in this window. Then, with `per_minute`, count it in the
    email's one-minute window of all logins: TooManyLogins (429) past it, the
    failure counts just taken given back. Call before verifying the password.

    The widest is counted and checked first: a site or an address over its limit is
    refused before the narrower counters are hit, or every made-up email (or /64) it
    sends would still leave a counter in the store for the window."""
    window = window_at(now, WINDOW_SECONDS)
    keys = attempt_keys(email, address, window, site)
    email_key, address_key = keys[0], keys[1]
    checks = [(address_key, limit), (email_key, limit)]
    if site is not None:
        checks.insert(0, (keys[2], limit * SITE_FACTOR))
    for key, allowed in checks:
        if await _hit(store, key, WINDOW_SECONDS) > allowed:
            raise LoginThrottled(
                f"Too many failed logins ({limit} per 15 minutes) for this account or "
                f"address; retry in {window.retry_after} s.",
                window.retry_after,
            )
    if per_minute is None:
        return Attempt(keys)
    minute = window_at(now, RATE_WINDOW_SECONDS)
    counted = rate_key(email, minute)
    if await _hit(store, counted, RATE_WINDOW_SECONDS) > per_minute:
        await forgive(store, Attempt(keys))
        raise TooManyLogins(
            f"Too many logins for this account ({per_minute} per minute); "
            f"retry in {minute.retry_after} s.",
            minute.retry_after,
        )
    return Attempt(keys, counted)


async def _hit(store: CounterStore, key: str, window_seconds: int) -> int:
    try:
        return await store.hit(key, window_seconds)
    except Exception:
        log.exception("login counter unavailable")
        raise StoreUnavailable() from None


async def forgive(store: CounterStore, attempt: Attempt) -> None:
    """The password was right: this attempt was not a failure."""
    try:
        for key in attempt.keys:
            await store.unhit(key, WINDOW_SECONDS)
    except Exception:
        # The login itself succeeded; an attempt left counted only tightens the limit.
        log.exception("could not take back a login attempt")


async def not_a_login(store: CounterStore, attempt: Attempt) -> None:
    """The password was wrong (or the email unknown): a failure, not a sign-in of the
    account, so its one-minute count is taken back."""
    if attempt.rate_key is not None:
        try:
            await store.unhit(attempt.rate_key, RATE_WINDOW_SECONDS)
        except Exception:
            # An attempt left counted only tightens the limit, for a minute.
            log.exception("could not take back a login attempt")


async def withdraw(store: CounterStore, attempt: Attempt) -> None:
    """The password was never checked (every place for a check was taken): the
    attempt counts nowhere, neither as a failure nor as a login of the account."""
    await forgive(store, attempt)
    await not_a_login(store, attempt)
