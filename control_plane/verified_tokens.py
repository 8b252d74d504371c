"""Access tokens whose signature this process has already checked (issue 14).

A browser or script keeps one access token for its hour and sends it on every
request, and the Ed25519 check of it is the largest single item left of an init's
control-plane CPU (~65 µs of ~1.2 ms, docs/cp-profile.md, "Init, seventh round").
Its outcome depends only on the token's bytes and the public key, so a token seen
verified by the very key object the keyring hands out now needs no second check.

Only the signature is remembered. Everything that can change is read again on
every request: the claims (`exp`, `nbf`, `aud`, `iss`… against the clock,
`jws_fast.check_claims`), the `kid`'s key in the keyring (a retired key is gone
from it, so its tokens are refused as before; a reloaded keyring hands out new key
objects, which simply miss once), and the user and company rows (`auth`, so
revocation stays immediate). A token that fails is never remembered.
"""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from shared import jws_fast

DEFAULT_CAPACITY = 10_000  # tokens of ~300 bytes: a few MB at most


class VerifiedSignatures:
    """A bounded memo of token → the public key object that verified it; the
    oldest entry goes first when full. Event-loop only (no lock)."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self._capacity = capacity
        self._seen: dict[str, Ed25519PublicKey] = {}

    def __len__(self) -> int:
        return len(self._seen)

    def check(self, token: str, parsed: jws_fast.ParsedToken, key: Ed25519PublicKey) -> None:
        """`jws_fast.check_signature(parsed, key)`, skipped when `token` was verified
        before by this same `key` object; raises `TokenRejected` as it does."""
        seen = self._seen
        if seen.get(token) is key:
            return
        jws_fast.check_signature(parsed, key)
        if token not in seen and len(seen) >= self._capacity:
            del seen[next(iter(seen))]  # dicts keep insertion order: the oldest
        seen[token] = key
