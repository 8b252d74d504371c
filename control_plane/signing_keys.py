"""Ed25519 signing keys: created and stored encrypted (Fernet), published as JWKS,
held in memory by a per-app `KeyRing`.

The newest non-retired key signs; every non-retired key is published at
``/.well-known/jwks.json`` and accepted, so a rotation never invalidates tokens in
flight. A key leaves the JWKS (is retired) at a later rotation, once it was
superseded longer ago than any token lives (`retire_superseded_keys`). Private
keys are stored as their 32 raw bytes encrypted with `MultiFernet`
(``LLMGW_ENCRYPTION_KEY``, newest key first, so old keys still decrypt after a
Fernet key rotation).

A rotated-in key signs at once on the instance that rotated. Another instance meeting
its `kid` answers only after a read of the keys that began after the token arrived
(`Deps.fresh_keyring(unknown_kid=True)`): a rotation commits before its key signs,
so such a read sees it, and the token is accepted instead of refused. Those reads
are shared (one in flight, every waiter joins it) and begin at least
`UNKNOWN_KID_REFRESH_SECONDS` (1 s) apart, counted from when the last one began: a
flood of tokens with made-up kids costs the database at most one read a second per
process, and each such request waits at most about a second plus a read.
"""

from __future__ import annotations

import base64
import itertools
import logging
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import orjson
from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from sqlalchemy import select
from sqlalchemy.orm import Session
from sqlmodel import col

from control_plane.tables import SigningKey, utcnow
from shared.settings import Secret
from shared.tokens import public_jwk

log = logging.getLogger("control_plane.signing_keys")

REFRESH_SECONDS = 60.0
UNKNOWN_KID_REFRESH_SECONDS = 1.0


def make_fernet(keys: tuple[Secret, ...]) -> MultiFernet:
    return MultiFernet([Fernet(k.reveal()) for k in keys])


def _raw_private(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )


def public_key_from_jwk(jwk_json: str) -> Ed25519PublicKey:
    doc = orjson.loads(jwk_json)
    raw = doc["x"] + "=" * (-len(doc["x"]) % 4)
    return Ed25519PublicKey.from_public_bytes(base64.urlsafe_b64decode(raw))


def create_signing_key(session: Session, fernet: MultiFernet) -> tuple[str, Ed25519PrivateKey]:
    """Add a new key; it becomes the active one (the newest)."""
    key = Ed25519PrivateKey.generate()
    kid = uuid.uuid4().hex[:16]
    session.add(
        SigningKey(
            kid=kid,
            private_key_encrypted=fernet.encrypt(_raw_private(key)).decode("ascii"),
            public_jwk=orjson.dumps(public_jwk(key.public_key(), kid)).decode(),
            created_at=utcnow(),
        )
    )
    session.flush()
    return kid, key


def _live_keys(session: Session) -> list[SigningKey]:
    stmt = (
        select(SigningKey)
        .where(col(SigningKey.retired_at).is_(None))
        .order_by(col(SigningKey.created_at).desc(), col(SigningKey.kid).desc())
    )
    return list(session.scalars(stmt))


def active_signing_key(session: Session, fernet: MultiFernet) -> tuple[str, Ed25519PrivateKey]:
    """The newest non-retired key we can decrypt; LookupError when there is none."""
    for row in _live_keys(session):
        try:
            raw = fernet.decrypt(row.private_key_encrypted.encode("ascii"))
        except InvalidToken:
            log.warning("signing key %s does not decrypt with LLMGW_ENCRYPTION_KEY", row.kid)
            continue
        return row.kid, Ed25519PrivateKey.from_private_bytes(raw)
    raise LookupError("no usable signing key")


def ensure_active_signing_key(
    session: Session, fernet: MultiFernet
) -> tuple[str, Ed25519PrivateKey]:
    try:
        return active_signing_key(session, fernet)
    except LookupError:
        return create_signing_key(session, fernet)


def retire_superseded_keys(session: Session, now: datetime, max_token_seconds: int) -> list[str]:
    """Retire keys replaced more than `max_token_seconds` ago: every token they signed
    has expired by then, so they can leave the JWKS. Returns the retired kids."""
    live = _live_keys(session)  # newest first
    retired: list[str] = []
    for newer, older in itertools.pairwise(live):
        if newer.created_at <= now - timedelta(seconds=max_token_seconds):
            older.retired_at = now
            retired.append(older.kid)
    session.flush()
    return retired


def retire_all_but(session: Session, kid: str, now: datetime) -> list[str]:
    """Retire every live key but `kid` at once (a leaked key: the tokens it signed
    stop verifying here now, and at the edges once they refetch the JWKS). Returns
    the retired kids."""
    retired = [key for key in _live_keys(session) if key.kid != kid]
    for key in retired:
        key.retired_at = now
    session.flush()
    return [key.kid for key in retired]


def reencrypt_private_keys(session: Session, fernet: MultiFernet) -> tuple[int, list[str]]:
    """Re-encrypt every stored private key under the newest Fernet key: how many
    were, and the keys none of the configured Fernet keys opens."""
    done, failed = 0, []
    for row in session.scalars(select(SigningKey)):
        try:
            token = fernet.rotate(row.private_key_encrypted.encode("ascii"))
        except InvalidToken:
            failed.append(f"signing key {row.kid}")
            continue
        row.private_key_encrypted = token.decode("ascii")
        done += 1
    session.flush()
    return done, failed


def published_jwks(session: Session) -> list[dict[str, Any]]:
    return [orjson.loads(row.public_jwk) for row in _live_keys(session)]


@dataclass
class KeyRingSnapshot:
    active_kid: str
    active_key: Ed25519PrivateKey
    public: dict[str, Ed25519PublicKey] = field(default_factory=dict)


def load_snapshot(session: Session, fernet: MultiFernet) -> KeyRingSnapshot:
    kid, key = ensure_active_signing_key(session, fernet)
    public = {row.kid: public_key_from_jwk(row.public_jwk) for row in _live_keys(session)}
    public[kid] = key.public_key()
    return KeyRingSnapshot(active_kid=kid, active_key=key, public=public)


class KeyRing:
    """The keys one app instance signs and verifies with, refreshed from the
    database every minute (another instance may have rotated) and on an unknown
    `kid` (`Deps.fresh_keyring`: at most a read a second, so junk tokens cannot
    hammer the database)."""

    def __init__(self, snapshot: KeyRingSnapshot) -> None:
        self._snapshot = snapshot
        self.loaded_at = time.monotonic()
        self._reads_begun = 0  # reads stamped by `read_begins`, in the order they began
        self._installed = 0  # the stamp of the read installed
        self._retired: frozenset[str] = frozenset()  # `retire`

    @property
    def reads_begun(self) -> int:
        """The stamp of the last read begun (0: none yet): a later one began after now."""
        return self._reads_begun

    def read_begins(self) -> int:
        """The stamp of a read of the keys about to begin, for `replace`."""
        self._reads_begun += 1
        return self._reads_begun

    def replace(self, snapshot: KeyRingSnapshot, read: int | None = None) -> bool:
        """Install `snapshot`, unless it comes from a `read` that began before the
        one installed: a shared read that started before a rotation and finished
        after the rotation's own would bring the rotated-out key back (to sign
        with, or a retired one to trust) until the next refresh. Whether it was
        installed. Without a stamp, always (tests)."""
        if read is not None:
            if read < self._installed:
                return False
            self._installed = read
        self._snapshot = self._without_retired(snapshot)
        self.loaded_at = time.monotonic()
        return True

    def retire(self, kids: frozenset[str]) -> bool:
        """Trust none of `kids` from now on (a platform admin retired them, maybe on
        another instance: `shared.revocations.RETIRED_SIGNING_KEYS`), whatever a
        read of the keys begun before that brings back. Whether the key this ring
        signs with is one of them: the ring must then be read again."""
        self._retired = kids
        self._snapshot = self._without_retired(self._snapshot)
        return self._snapshot.active_kid in kids

    def _without_retired(self, snapshot: KeyRingSnapshot) -> KeyRingSnapshot:
        if not any(kid in self._retired for kid in snapshot.public):
            return snapshot
        public = {kid: key for kid, key in snapshot.public.items() if kid not in self._retired}
        return KeyRingSnapshot(snapshot.active_kid, snapshot.active_key, public)

    def active(self) -> tuple[str, Ed25519PrivateKey]:
        return self._snapshot.active_kid, self._snapshot.active_key

    def public_key(self, kid: str) -> Ed25519PublicKey | None:
        return self._snapshot.public.get(kid)

    def stale(self) -> bool:
        return time.monotonic() - self.loaded_at > REFRESH_SECONDS
