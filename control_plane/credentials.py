"""Passwords (argon2id) and API keys (``sk_…``).

Password hashing is deliberately slow (~200 ms of CPU and 64 MiB with argon2-cffi's
defaults): callers run it off the event loop through the process's bounded gate
(`password_checks`). API keys are 256 bits from `secrets`, so a single fast
SHA-256 is the right hash for them: there is nothing to brute-force, and the lookup
by hash stays a cheap unique-index probe on every request.
"""

from __future__ import annotations

import functools
import hashlib
import secrets
from dataclasses import dataclass

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

API_KEY_PREFIX = "sk_"
_DISPLAY_PREFIX_LEN = 11  # "sk_" + 8 characters: enough to tell keys apart in a list

_hasher = PasswordHasher()


@functools.cache
def _dummy_hash() -> str:
    """The hash of a random, forgotten password: verifying unknown emails against it
    makes "no such user" take as long as "wrong password". Made by `_hasher` itself,
    so its cost follows the hasher's parameters (a literal would drift from them when
    argon2-cffi changes its defaults)."""
    return str(_hasher.hash(secrets.token_urlsafe(32)))


def hash_password(password: str) -> str:
    return str(_hasher.hash(password))


def verify_password(password_hash: str | None, password: str) -> bool:
    """Constant-ish time whether or not the user exists (`password_hash` None)."""
    try:
        return bool(_hasher.verify(password_hash or _dummy_hash(), password)) and (
            password_hash is not None
        )
    except (VerificationError, InvalidHashError):
        return False


@dataclass(frozen=True, slots=True)
class NewApiKey:
    key: str  # shown once, never stored
    prefix: str
    key_hash: str


def hash_api_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def looks_like_api_key(value: str) -> bool:
    return value.startswith(API_KEY_PREFIX)


def new_api_key() -> NewApiKey:
    key = API_KEY_PREFIX + secrets.token_urlsafe(32)
    return NewApiKey(key=key, prefix=key[:_DISPLAY_PREFIX_LEN], key_hash=hash_api_key(key))
