"""The control plane's public signing keys, fetched and cached.

An unknown `kid` triggers a refetch (a key was just rotated in), but at most once
per `min_refetch_seconds`, so a flood of tokens with made-up kids cannot turn the
edge into a request amplifier against the control plane.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import httpx
import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from shared.tokens import ALGORITHM

log = logging.getLogger("llmgw.edge.jwks")


class KeysUnavailable(Exception):
    """The key set could not be fetched and nothing usable is cached."""


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


class JWKSCache:
    def __init__(
        self,
        client: httpx.AsyncClient,
        url: str,
        *,
        max_age_seconds: float = 300.0,
        min_refetch_seconds: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self._url = url
        self._max_age = max_age_seconds
        self._min_refetch = min_refetch_seconds
        self._clock = clock
        self._keys: dict[str, Ed25519PublicKey] = {}
        self._fetched_at: float | None = None
        self._lock = asyncio.Lock()

    async def key(self, kid: str) -> Ed25519PublicKey | None:
        """The public key for `kid`, or None when the control plane does not know it."""
        now = self._clock()
        stale = self._fetched_at is None or now - self._fetched_at > self._max_age
        if kid in self._keys and not stale:
            return self._keys[kid]
        async with self._lock:
            now = self._clock()
            recently = self._fetched_at is not None and now - self._fetched_at < self._min_refetch
            if not recently:
                await self._refresh()
            elif kid not in self._keys and self._fetched_at is None:
                raise KeysUnavailable("signing keys are not available yet")
        return self._keys.get(kid)

    async def _refresh(self) -> None:
        try:
            response = await self._client.get(self._url, timeout=5.0)
            response.raise_for_status()
            keys = parse_jwks(response.json())
        except (httpx.HTTPError, ValueError) as exc:
            log.warning("jwks fetch failed: %s", exc)
            if not self._keys:
                raise KeysUnavailable("cannot fetch the control plane's signing keys") from exc
            return  # keep serving with the keys we have
        self._keys = keys
        self._fetched_at = self._clock()

    async def ready(self) -> bool:
        try:
            await self.key("")
        except KeysUnavailable:
            return False
        return bool(self._keys)
