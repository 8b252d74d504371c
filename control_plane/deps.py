"""What a request handler needs, built once by the lifespan and kept on
``app.state.deps`` (no module globals), plus the readers of a request's body and
path ids."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from cryptography.fernet import MultiFernet
from starlette.requests import Request

from control_plane import db_shares
from control_plane.catalog_cache import CatalogCache
from control_plane.db import Database
from control_plane.errors import ClientClosedRequest, NotFound, PayloadTooLarge
from control_plane.external_auth import ExternalVerifier
from control_plane.heavy_reads import HeavyReads
from control_plane.ledger import active_hold_count
from control_plane.metrics import Metrics
from control_plane.password_checks import PasswordChecks
from control_plane.readiness import failing
from control_plane.recent_answer import RecentAnswer
from control_plane.settings import ControlPlaneSettings
from control_plane.settlement_batch import SettlementBatcher
from control_plane.signing_keys import (
    UNKNOWN_KID_REFRESH_SECONDS,
    KeyRing,
    load_snapshot,
    published_jwks,
)
from control_plane.validation import parse_json_object
from control_plane.verified_tokens import VerifiedSignatures
from shared.bodies import read_limited
from shared.jwks import PUBLISHED_KEYS_AGE_SECONDS
from shared.store import Store

MAX_BODY_BYTES = 1024 * 1024


@dataclass
class Deps:
    settings: ControlPlaneSettings
    db: Database
    store: Store
    fernet: MultiFernet
    route_cipher: MultiFernet  # seals the `upr` claim (shared.route_claim)
    keyring: KeyRing
    metrics: Metrics
    external: ExternalVerifier | None = None
    # Usage webhooks settled in batches (`settlement_batch`); None: one by one.
    settler: SettlementBatcher | None = None
    # Companies' LLM overrides and keys between inits (`catalog_cache`); None: no cache.
    catalog_cache: CatalogCache | None = None
    # The clock the shared windows (init rate, logins, tokens per minute, and whether
    # a settling init's window still runs) are read on: in the app the store's
    # (`shared.store_clock`), which every replica agrees on; tests fix it.
    clock: Callable[[], float] = time.time
    # This host's: an init's instant (its token's times, its hold's deadline, its
    # rows' dates), a sign-out's (against its token's expiry).
    # `create_app` takes it: a test runs a replica whose clock disagrees.
    wall_clock: Callable[[], float] = time.time
    # When the key ring's reads begin, and the waits between them (`fresh_keyring`).
    monotonic: Callable[[], float] = time.monotonic
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    # Argon2 hashes and verifies: a few at once, a short queue, 503 past it.
    password_checks: PasswordChecks = field(default_factory=PasswordChecks)
    # Access tokens whose signature was checked, by the key that checked it.
    verified_signatures: VerifiedSignatures = field(default_factory=VerifiedSignatures)
    # What anonymous routes read of the database, once a second whatever the traffic
    # (`recent_answer`): the JWKS, readiness (the failing components), the hold count.
    published_keys: RecentAnswer[list[dict[str, Any]]] = field(init=False)
    readiness: RecentAnswer[list[str]] = field(init=False)
    hold_count: RecentAnswer[int] = field(init=False)
    # The console's aggregates and audit searches: a bounded, fair share of the
    # database threads per company, under a statement timeout (`heavy_reads`).
    heavy_reads: HeavyReads = field(init=False)
    # The key ring's read that callers finding it stale share (`fresh_keyring`).
    _key_read: asyncio.Future[None] | None = field(init=False, default=None)
    # When the last read of the key ring began; the stamp of the latest that finished.
    _key_read_began: float = field(init=False, default=float("-inf"))
    _key_read_finished: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.heavy_reads = HeavyReads(self.db)
        self.published_keys = RecentAnswer(
            lambda: self.db.transaction(published_jwks), max_age=PUBLISHED_KEYS_AGE_SECONDS
        )
        self.readiness = RecentAnswer(lambda: failing(self.db, self.store))
        self.hold_count = RecentAnswer(lambda: self.db.transaction(active_hold_count))

    async def refresh_keys(self) -> None:
        fernet = self.fernet
        began = self.monotonic()
        self._key_read_began = max(self._key_read_began, began)
        read = self.keyring.read_begins()  # reads may finish out of order
        snapshot = await self.db.transaction(lambda s: load_snapshot(s, fernet))
        if self.keyring.replace(snapshot, read):
            self.published_keys.forget()
        # Installed or not (then a newer read was): the keys as of this read are known.
        self._key_read_finished = max(self._key_read_finished, read)

    async def fresh_keyring(self, *, unknown_kid: bool = False) -> KeyRing:
        """The ring, read again first when it is older than a minute, or, for a
        token whose `kid` it lacks, once a read that began after the call has
        finished (another instance may have just rotated: its key signed after its
        rotation committed, so that read sees it). Every caller needing a read joins
        the one in flight (a crowd of made-up `kid`s, or of inits a minute on, would
        otherwise put a transaction each on the database threads). A failed read
        fails those waiting on it and is not kept: the next caller reads again."""
        if unknown_kid:
            await self._keys_read_after(self.keyring.reads_begun)
        elif self.keyring.stale():
            # Shielded: a caller that gives up must not cancel everyone's read.
            await asyncio.shield(self._shared_key_read())
        return self.keyring

    def _shared_key_read(self) -> asyncio.Future[None]:
        read = self._key_read
        if read is None or read.done():
            # No company's: inits of every company join it (`db_shares`).
            read = self._key_read = db_shares.shared_task(self.refresh_keys())
            read.add_done_callback(_retrieved)
        return read

    async def _keys_read_after(self, stamp: int) -> None:
        """Return once a read stamped after `stamp` (begun after it) has finished:
        joining the shared one in flight, else starting one once
        `UNKNOWN_KID_REFRESH_SECONDS` have passed since the last began (sleeping until
        then). At most a read begun before, the floor, then one read: each under the
        database's timeout. Stamps, not times: a clock may read the same twice."""
        while self._key_read_finished <= stamp:
            read = self._key_read
            if read is not None and not read.done():
                await asyncio.shield(read)  # a caller giving up leaves it running
                continue
            wait = self._key_read_began + UNKNOWN_KID_REFRESH_SECONDS - self.monotonic()
            if wait > 0:
                await self.sleep(wait)
                continue
            self._shared_key_read()


def _retrieved(read: asyncio.Future[None]) -> None:
    """Its waiters may all have left: the failure is theirs, not an unretrieved one."""
    if not read.cancelled():
        read.exception()


def get_deps(request: Request) -> Deps:
    deps = request.app.state.deps
    assert isinstance(deps, Deps), "the lifespan has not run"
    return deps


async def read_body(request: Request, limit: int = MAX_BODY_BYTES) -> bytes:
    """The raw body, refusing more than `limit` bytes (413) without buffering them."""
    return await read_limited(request, limit, PayloadTooLarge, ClientClosedRequest)


async def read_json(request: Request) -> dict[str, Any]:
    return parse_json_object(await read_body(request))


PATH_ID_MAX = 64
"""Longer than any id a row can have (ours are 32 hex characters)."""


def path_id(request: Request, name: str) -> str:
    """A path parameter that names a row (a company, a user, a key...): 404 when it is
    longer than any id can be, before the database or the store sees it. Only the
    server's request-line limit bounds a path otherwise (tens of KB), and an id can
    end up in a store key (`catalog_cache.version_key`)."""
    value = str(request.path_params[name])
    if len(value) > PATH_ID_MAX:
        raise NotFound()
    return value
