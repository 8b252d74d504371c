"""The control plane's public signing keys, fetched and cached (`shared.jwks`: one
refresh at a time, a floor between attempts, stale keys served while it runs; an
unknown `kid` answered after a fetch begun `PUBLISHED_KEYS_AGE_SECONDS` after it
arrived, the age of the control plane's answer)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import httpx
import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from shared import jwks
from shared.jwks import PUBLISHED_KEYS_AGE_SECONDS, KeysUnavailable
from shared.tokens import ALGORITHM

__all__ = ["JWKSCache", "KeysUnavailable", "parse_jwks"]


def parse_jwks(document: object) -> dict[str, Ed25519PublicKey]:
    """The Ed25519 keys of a JWKS document, by kid; other key types are ignored."""
    keys: dict[str, Ed25519PublicKey] = {}
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError("not a JWKS document")
    for entry in document["keys"]:
        if (
            not isinstance(entry, dict)
            or entry.get("kty") != "OKP"
            or entry.get("crv") != "Ed25519"
        ):
            continue
        if entry.get("alg", ALGORITHM) != ALGORITHM or not isinstance(entry.get("kid"), str):
            continue
        try:
            key = jwt.PyJWK(entry, algorithm=ALGORITHM).key
        except jwt.PyJWTError:
            continue
        if isinstance(key, Ed25519PublicKey):
            keys[entry["kid"]] = key
    return keys


class JWKSCache(jwks.JWKSCache[Ed25519PublicKey]):
    def __init__(
        self,
        client: httpx.AsyncClient,
        url: str,
        *,
        max_age_seconds: float = 300.0,
        min_refetch_seconds: float = 1.0,
        fetch_timeout_seconds: float = 5.0,
        answer_age_seconds: float = PUBLISHED_KEYS_AGE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        super().__init__(
            client,
            url,
            parse_jwks,
            max_age_seconds=max_age_seconds,
            min_refetch_seconds=min_refetch_seconds,
            fetch_timeout_seconds=fetch_timeout_seconds,
            answer_age_seconds=answer_age_seconds,
            clock=clock,
            sleep=sleep,
            source="the control plane",
        )
