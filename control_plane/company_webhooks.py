"""A company's own webhook: its URL, its secret, and the delivery of its events.

``PUT /v1/admin/companies/{id}/webhook`` ``{"url"}`` sets where the company's events
go (today ``budget.threshold``). The first PUT generates the company's Standard
Webhooks secret and answers it once; it is stored Fernet-encrypted under
``LLMGW_ENCRYPTION_KEY`` (as provider keys are) and never shown again. Events are
signed with it exactly as our usage webhooks are signed with the platform's
(`shared.webhooks.sign`: ``webhook-id``, ``webhook-timestamp``,
``webhook-signature``), the event id being the ``webhook-id``: a receiver
deduplicates retries by it.

Delivery never blocks init or settlement: settlement writes an outbox row
(`budgets`, same transaction), and `run_deliveries` posts due rows in the
background, at least once, with backoff (`shared.retry.Backoff`). Several control
plane processes (``--workers``, replicas) share the outbox: a row is claimed by
moving its due time forward by a lease with a conditional UPDATE. The lease outlasts
the longest pass, and a pass never starts a post once its claim could have run out,
so two live processes never post the same event; one that died leaves its claims to
the others after the lease.

An event is retried for `GIVE_UP_AFTER` (3 days) from its creation, backing off to
at most `BACKOFF.cap` (15 min), then given up (left undelivered, then pruned with the
others: `budgets.prune_events`). A post that passes makes its company's other events
that are backing off due at once (`expedite`): once a receiver is back, its backlog
goes at the pace passes claim it, not each event after its own backoff.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson
from cryptography.fernet import InvalidToken, MultiFernet
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session
from sqlmodel import col

from control_plane.db import Database
from control_plane.errors import ValidationFailed
from control_plane.host_lookups import HostLookups
from control_plane.tables import BudgetEvent, CompanyWebhook, iso, rowcount, utcnow
from control_plane.validation import NUL
from shared.retry import Backoff
from shared.webhooks import generate_secret, sign

log = logging.getLogger("control_plane.company_webhooks")

URL_MAX = 2000
# An event is retried this long from its creation, then given up. By count (20
# attempts, backoff capped at an hour) a receiver down 6 hours lost 84 % of its
# events (4 hours: 11 %), for a product that promises at least once. Three days, as
# Stripe retries: a receiver down over a weekend still gets every event; each event
# costs at most one post every `BACKOFF.cap` meanwhile (~290 posts in 3 days at
# the jitter's mean), claimed `PER_COMPANY` at a time.
GIVE_UP_AFTER = timedelta(days=3)
# A passing post brings at most this many of its company's backed-off events
# forward (one statement; the next passing post, the next ones).
EXPEDITE_LIMIT = 1000
BATCH = 50
PARALLEL = 10  # posts in flight per pass
# A company's events in one pass, the longest waiting first. A pass waits for every
# post it claimed; one company whose thresholds fired by the thousand, at a server
# holding each post to `ATTEMPT_SECONDS`, filled every pass with its own and held
# back every other company's events for hours. Now it holds two slots of a pass.
PER_COMPANY = 2
TIMEOUT = httpx.Timeout(10.0, connect=3.0)
# One attempt in all: the lookup, the connection and the answer's head. httpx's
# timeouts are per read, so a receiver dribbling a byte every few seconds would
# otherwise hold its post, and the pass that waits for it, for ever.
ATTEMPT_SECONDS = 30.0
# A claimed event waits this long before another process may claim it. A pass posts
# its claims `PARALLEL` at a time, so its last one starts up to `ceil(BATCH /
# PARALLEL) - 1` attempts after the claim: with a lease of 60 s (two attempts),
# receivers that hang left the rest of a pass queued past it, and another process
# claimed and posted those events too. The lease covers every wave, plus room for
# recording each outcome; a post that would still start past `START_BEFORE` (a
# database that stalled the records) is left for the next claim instead.
LEASE_SECONDS = (-(-BATCH // PARALLEL) + 1) * ATTEMPT_SECONDS
START_BEFORE = LEASE_SECONDS - ATTEMPT_SECONDS - 10.0
# Delivery passes running at once (`run_deliveries`): a pass that waits on receivers
# that hang no longer holds up the next; each leaves out the companies it would wait
# on, so it takes as many companies with receivers that hang to fill them all.
MAX_PASSES = 4
# Capped at 15 min: with an hour, an event that backed off while the receiver was
# down could wait up to an hour after it was back (30 min down: median 13.5 min,
# p90 38 min, simulated). `expedite` brings a company's backlog forward after its
# first passing post; the cap bounds the wait for that post.
BACKOFF = Backoff(base=2.0, cap=900.0, floor=1.0)


# IPv6 addresses that carry an IPv4 address, which a translator on the path (NAT64,
# as on IPv6-only cloud subnets) or the host itself connects to: Python's `is_global`
# judges the IPv6 prefix, not the address inside (`64:ff9b::7f00:1` is "global").
_V4_IN_LAST_32_BITS = tuple(
    ipaddress.IPv6Network(net)
    for net in (
        "64:ff9b::/96",  # NAT64, RFC 6052's well-known prefix
        "::/96",  # IPv4-compatible (deprecated, RFC 4291)
        "::ffff:0:0:0/96",  # IPv4-translated (SIIT, RFC 2765)
    )
)
# The operator's own translators (RFC 8215) and the deprecated site-local range:
# inward by definition, whatever they carry.
_INWARD_V6 = (ipaddress.IPv6Network("64:ff9b:1::/48"), ipaddress.IPv6Network("fec0::/10"))


def _carried_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if any(ip in net for net in _V4_IN_LAST_32_BITS):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def is_public(address: str) -> bool:
    """A globally routable address: not private, loopback, link-local (the cloud
    metadata service), shared, reserved or multicast; for an IPv6 address that
    carries an IPv4 one (NAT64, 6to4, mapped, compatible), neither is that one."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        if any(ip in net for net in _INWARD_V6):
            return False
        carried = _carried_ipv4(ip)
        if carried is not None and not is_public(str(carried)):
            return False
    return ip.is_global and not ip.is_multicast


def _named_local(host: str) -> bool:
    host = host.rstrip(".").lower()
    return host == "localhost" or host.endswith(".localhost")


def parse_url(value: Any, *, allow_private: bool = False) -> str:
    """An absolute http(s) URL with a host and, if any, a port from 1 to 65535, at
    most `URL_MAX` characters. Without `allow_private`
    (``LLMGW_COMPANY_WEBHOOKS_ALLOW_PRIVATE``), a literal private, loopback or
    link-local address, or ``localhost``, is refused: a company's URL must not make
    the control plane post inward (SSRF). Names are checked again, resolved, at each
    delivery (`deliver_due`)."""
    if not isinstance(value, str) or not 0 < len(value) <= URL_MAX or NUL in value:
        raise ValidationFailed("url", f"must be a URL of 1-{URL_MAX} characters")
    try:
        parts = urlsplit(value)
    except ValueError:
        raise ValidationFailed("url", "must be an http(s) URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValidationFailed("url", "must be an absolute http:// or https:// URL")
    try:
        port = parts.port  # ValueError: not a number, or past 65535
    except ValueError:
        port = 0
    if port == 0:  # nothing listens there: every delivery would fail
        raise ValidationFailed("url", "must have a port from 1 to 65535, or none")
    if any(c.isspace() for c in value):
        raise ValidationFailed("url", "must not contain whitespace")
    host = parts.hostname
    literal = host.strip("[]")
    is_literal = True
    try:
        ipaddress.ip_address(literal.split("%", 1)[0])
    except ValueError:
        is_literal = False
    if not allow_private and (_named_local(host) or (is_literal and not is_public(literal))):
        raise ValidationFailed("url", "must not point to a private, loopback or local address")
    return value


async def resolve(
    url: httpx.URL, lookups: HostLookups, *, allow_private: bool = False
) -> str | None:
    """The address a delivery to `url` connects to: the first its host resolves to,
    provided every one is public (see `is_public`; any, with `allow_private`). None
    when the name does not resolve, or resolves inward. Resolved once per delivery,
    and `post` connects to this very address: a name that answers a public address
    to this check and an inward one to a second lookup (DNS rebinding) gains
    nothing. Looked up on `lookups`' threads, never the loop's resolver: the company
    chose the name, and so how long its lookups hang (`host_lookups`)."""
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        host = url.raw_host.decode("ascii")  # IDNA-encoded, no brackets
        addresses = await lookups.addresses(host, port)
    except (OSError, UnicodeError, OverflowError):  # OverflowError: a port past 65535
        return None
    if not addresses or not (allow_private or all(map(is_public, addresses))):
        return None
    return addresses[0]


def webhook_public(row: CompanyWebhook, secret: str | None = None) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "company_id": row.company_id,
        "url": row.url,
        "created_at": iso(row.created_at),
        "updated_at": iso(row.updated_at),
    }
    if secret is not None:
        doc["secret"] = secret  # only when it was generated: never again
    return doc


def set_url(
    session: Session, fernet: MultiFernet, company_id: str, url: str, now: datetime
) -> tuple[CompanyWebhook, str | None]:
    """Set the URL; the secret is generated with the first URL (returned, else None)."""
    row = session.get(CompanyWebhook, company_id)
    if row is not None:
        row.url = url
        row.updated_at = now
        session.flush()
        return row, None
    secret = generate_secret()
    row = CompanyWebhook(
        company_id=company_id,
        url=url,
        secret_encrypted=fernet.encrypt(secret.encode()).decode("ascii"),
        created_at=now,
        updated_at=now,
    )
    session.add(row)
    session.flush()
    return row, secret


def rotate_secrets(session: Session, fernet: MultiFernet) -> tuple[int, list[str]]:
    """Re-encrypt every company's webhook secret under the newest Fernet key."""
    done, failed = 0, []
    for row in session.scalars(select(CompanyWebhook)):
        try:
            row.secret_encrypted = fernet.rotate(row.secret_encrypted.encode("ascii")).decode()
            done += 1
        except InvalidToken:
            failed.append(f"webhook secret of company {row.company_id}")
    session.flush()
    return done, failed


@dataclass(frozen=True, slots=True)
class Delivery:
    event_id: str
    url: str
    secret: str
    body: bytes
    attempts: int
    company_id: str = ""
    # The claim's lease (the event's `next_attempt_at` while this pass owns it): a
    # failure is recorded only while it is still so (`record_outcome`).
    leased_until: datetime | None = None


def claim_due(
    session: Session,
    fernet: MultiFernet,
    now: datetime,
    limit: int,
    exclude: Collection[str] = (),
) -> list[Delivery]:
    """Claim up to `limit` due events, at most `PER_COMPANY` of each company (their
    due time moves a lease ahead), none of the companies in `exclude` (their posts
    still in flight in another pass)."""
    rank = (
        func.row_number()
        .over(
            partition_by=col(BudgetEvent.company_id),
            order_by=(col(BudgetEvent.next_attempt_at), col(BudgetEvent.id)),
        )
        .label("rank")
    )
    due_now = (
        select(col(BudgetEvent.id), rank)
        .where(col(BudgetEvent.delivered_at).is_(None))
        .where(col(BudgetEvent.next_attempt_at) <= now)
        .where(col(BudgetEvent.created_at) > now - GIVE_UP_AFTER)
    )
    if exclude:
        due_now = due_now.where(col(BudgetEvent.company_id).not_in(sorted(exclude)))
    due = due_now.subquery()
    rows = session.scalars(
        select(BudgetEvent)
        .join(due, due.c.id == col(BudgetEvent.id))
        .where(due.c.rank <= PER_COMPANY)
        .order_by(col(BudgetEvent.next_attempt_at))
        .limit(limit)
    ).all()
    claimed: list[Delivery] = []
    for event in rows:
        leased_until = now + timedelta(seconds=LEASE_SECONDS)
        result = session.execute(
            update(BudgetEvent)
            .where(col(BudgetEvent.id) == event.id)
            .where(col(BudgetEvent.next_attempt_at) == event.next_attempt_at)
            .where(col(BudgetEvent.delivered_at).is_(None))
            .values(next_attempt_at=leased_until, backoff_until=None)
        )
        if rowcount(result) == 0:
            continue  # another process claimed it
        hook = session.get(CompanyWebhook, event.company_id)
        if hook is None:  # the company removed its webhook: nobody to tell
            event.delivered_at = now
            continue
        try:
            secret = fernet.decrypt(hook.secret_encrypted.encode("ascii")).decode()
        except InvalidToken:  # a key left the ring before a rotation: retried, then given up
            # (not marked as backing off: no post of this company can pass to expedite it)
            log.error("webhook secret of company %s does not decrypt", event.company_id)
            event.attempts += 1
            event.next_attempt_at = now + timedelta(seconds=BACKOFF.delay(event.attempts))
            continue
        claimed.append(
            Delivery(
                event.id,
                hook.url,
                secret,
                orjson.dumps(event.payload),
                event.attempts,
                event.company_id,
                leased_until,
            )
        )
    session.flush()
    return claimed


def record_outcome(session: Session, delivery: Delivery, delivered: bool, now: datetime) -> None:
    """A delivery is recorded whenever it comes (the receiver has the event); a
    failure only while the claim's lease still stands. Recorded after the lease ran
    out (a database that stalled the record), it overwrote another process's newer
    claim with a backoff, which a passing post could then bring forward while that
    process was posting it: one event posted three times."""
    event = session.get(BudgetEvent, delivery.event_id)
    if event is None or event.delivered_at is not None:
        return
    if delivered:
        event.delivered_at = now
        session.flush()
        return
    attempts = delivery.attempts + 1
    retry_at = now + timedelta(seconds=BACKOFF.delay(attempts))
    failed = (
        update(BudgetEvent)
        .where(col(BudgetEvent.id) == delivery.event_id)
        .where(col(BudgetEvent.delivered_at).is_(None))
        .values(attempts=attempts, next_attempt_at=retry_at, backoff_until=retry_at)
        .execution_options(synchronize_session=False)
    )
    if delivery.leased_until is not None:
        failed = failed.where(col(BudgetEvent.next_attempt_at) == delivery.leased_until)
    session.execute(failed)


def expedite(session: Session, company_id: str, now: datetime) -> int:
    """A post to `company_id`'s receiver passed: its events backing off become due
    now, up to `EXPEDITE_LIMIT` of them, the oldest first; how many. One statement,
    through ``ix_budget_events_backing_off`` (a company's events backing off only).

    Never one that is leased: a pass (here or in another process) may be posting it,
    and a second claim would post it twice. Backing off is ``backoff_until`` equal
    to ``next_attempt_at`` (a failed attempt writes both); a claim moves
    ``next_attempt_at`` to its lease. The conditions are repeated outside the
    subquery: on PostgreSQL an UPDATE that waited for a row (a claim or a record
    committing meanwhile) re-checks its own WHERE on the row's new version, and the
    subquery's rows only on the old one. Other companies' events keep their backoff:
    their receivers may still be down."""
    backing_off = (
        col(BudgetEvent.company_id) == company_id,
        col(BudgetEvent.backoff_until).is_not(None),
        col(BudgetEvent.next_attempt_at) == col(BudgetEvent.backoff_until),
        col(BudgetEvent.next_attempt_at) > now,
        col(BudgetEvent.delivered_at).is_(None),
    )
    oldest = (
        select(col(BudgetEvent.id))
        .where(*backing_off)
        .order_by(col(BudgetEvent.created_at))
        .limit(EXPEDITE_LIMIT)
    )
    result = session.execute(
        update(BudgetEvent)
        .where(col(BudgetEvent.id).in_(oldest), *backing_off)
        .values(next_attempt_at=now, backoff_until=None)
        .execution_options(synchronize_session=False)
    )
    moved = rowcount(result)
    if moved:
        log.info("company %s's receiver answers: %d webhooks due now", company_id, moved)
    return moved


async def post(client: httpx.AsyncClient, delivery: Delivery, address: str) -> bool:
    """POST the event to `address` (what `resolve` answered for the URL's host), with
    the name kept where it belongs: the ``Host`` header (set from the URL as the
    request is built) and TLS, whose SNI and certificate check use it."""
    headers = sign(delivery.secret, delivery.event_id, delivery.body)
    request = client.build_request("POST", delivery.url, content=delivery.body, headers=headers)
    request.extensions["sni_hostname"] = request.url.raw_host.decode("ascii")
    request.url = request.url.copy_with(host=address)
    # Pooled connections are keyed by address, not name: one opened for another
    # company's name on the same address (a shared host) must not carry this post.
    request.headers["Connection"] = "close"
    try:
        # Streamed and closed unread: the status is the whole answer we need, and a
        # receiver's body (the company's own server: endless, if it likes) must
        # never be pulled into this process's memory.
        response = await client.send(request, follow_redirects=False, stream=True)
        await response.aclose()
    except httpx.HTTPError as exc:
        log.warning("company webhook %s failed: %s", delivery.event_id, type(exc).__name__)
        return False
    return 200 <= response.status_code < 300


async def attempt(
    client: httpx.AsyncClient,
    delivery: Delivery,
    lookups: HostLookups,
    *,
    allow_private: bool = False,
) -> bool:
    """One delivery attempt: resolve and check the host once, then post to it,
    within `ATTEMPT_SECONDS` in all. A host that does not resolve, or resolves
    inward, is not posted to (False)."""
    try:
        url = httpx.URL(delivery.url)
    except httpx.InvalidURL:
        log.warning("company webhook %s has an unusable URL; not sent", delivery.event_id)
        return False
    try:
        async with asyncio.timeout(ATTEMPT_SECONDS):
            address = await resolve(url, lookups, allow_private=allow_private)
            if address is None:
                log.warning("company webhook %s resolves inward or not at all", delivery.event_id)
                return False
            return await post(client, delivery, address)
    except TimeoutError:
        log.warning("company webhook %s took over %.0f s", delivery.event_id, ATTEMPT_SECONDS)
        return False


async def deliver_due(
    db: Database,
    fernet: MultiFernet,
    client: httpx.AsyncClient,
    *,
    lookups: HostLookups | None = None,
    allow_private: bool = False,
    in_flight: Counter[str] | None = None,
) -> int:
    """One pass: claim, post, record. Returns how many were delivered. A URL whose
    host now resolves to a non-public address is not posted to, and any failure of
    one delivery is a failed attempt (retried until `GIVE_UP_AFTER`). `lookups`
    should outlive the pass (`run_deliveries` keeps one): a name hanging since an
    earlier pass is then still one thread; without, the pass has its own.
    `in_flight`: the posts of each company under way in passes running beside this
    one (shared by them): those companies are left out of this pass's claim."""
    if lookups is None:
        own = HostLookups()
        try:
            return await deliver_due(
                db,
                fernet,
                client,
                lookups=own,
                allow_private=allow_private,
                in_flight=in_flight,
            )
        finally:
            own.close()
    busy: Counter[str] = Counter() if in_flight is None else in_flight
    loop = asyncio.get_running_loop()
    claimed_at = loop.time()  # before the claim: its lease counts from no earlier
    exclude = frozenset(busy)
    claimed = await db.transaction(lambda s: claim_due(s, fernet, utcnow(), BATCH, exclude))
    busy.update(d.company_id for d in claimed)
    # Concurrently, a few at a time: one company's slow receiver (up to the timeout)
    # must not hold up every other company's events.
    gate = asyncio.Semaphore(PARALLEL)

    async def one(delivery: Delivery) -> bool:
        try:
            async with gate:
                if loop.time() - claimed_at > START_BEFORE:
                    # The claim may run out during the post: another process may then
                    # claim the event too. Left unrecorded, it is due at the lease's end.
                    return False
                try:
                    ok = await attempt(client, delivery, lookups, allow_private=allow_private)
                except Exception:
                    # Whatever went wrong (a URL stored before it was checked as now, a
                    # bug), it is a failed attempt: recorded, so the event backs off and
                    # is given up after GIVE_UP_AFTER instead of coming back every lease.
                    log.exception("company webhook %s failed", delivery.event_id)
                    ok = False
                await db.transaction(_recorder(delivery, ok))
                if ok:
                    await _expedite(db, delivery.company_id)
                return ok
        finally:
            busy[delivery.company_id] -= 1
            if busy[delivery.company_id] <= 0:
                del busy[delivery.company_id]

    return sum(await asyncio.gather(*(one(d) for d in claimed)))


async def _expedite(db: Database, company_id: str) -> None:
    """`expedite` after a passing post, in a transaction of its own: the outcome is
    committed whatever becomes of this (a lock wait given up, a deadlock with an
    edit re-arming the same budget's events), and it holds no lock of the post's
    event meanwhile. Failed, the backlog keeps its backoff (at most `BACKOFF.cap`)."""
    try:
        await db.transaction(lambda s: expedite(s, company_id, utcnow()))
    except Exception as exc:
        log.warning(
            "could not bring company %s's webhooks forward: %s", company_id, type(exc).__name__
        )


def _recorder(delivery: Delivery, delivered: bool) -> Callable[[Session], None]:
    return lambda s: record_outcome(s, delivery, delivered, utcnow())


async def run_deliveries(
    db: Database, fernet: MultiFernet, interval: float, *, allow_private: bool = False
) -> None:
    """Deliver due company events every `interval` seconds until cancelled (the app's
    lifespan owns this task, and the task its HTTP client and its lookups' threads)."""
    lookups = HostLookups()
    in_flight: Counter[str] = Counter()
    passes: set[asyncio.Task[int]] = set()

    async def one_pass(client: httpx.AsyncClient) -> int:
        try:
            return await deliver_due(
                db,
                fernet,
                client,
                lookups=lookups,
                allow_private=allow_private,
                in_flight=in_flight,
            )
        except Exception:
            log.exception("company webhook delivery failed; retrying in %.1f s", interval)
            return 0

    try:
        async with httpx.AsyncClient(timeout=TIMEOUT, follow_redirects=False) as client:
            try:
                while True:
                    await asyncio.sleep(interval)
                    # A pass waits for its slowest post (up to `ATTEMPT_SECONDS`): awaited
                    # one after the other, one company's receiver that hangs held every
                    # other company's events for that long, pass after pass. Passes run
                    # side by side, each leaving out the companies with posts in flight.
                    if len(passes) < MAX_PASSES:
                        task = asyncio.create_task(one_pass(client), name="company-webhook-pass")
                        passes.add(task)
                        task.add_done_callback(passes.discard)
            finally:
                for task in passes:
                    task.cancel()
                await asyncio.gather(*passes, return_exceptions=True)
    finally:
        lookups.close()
