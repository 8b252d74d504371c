"""The control plane's public signing keys, fetched and cached.

An unknown `kid` triggers a refetch (a key was just rotated in), but at most once
per `min_refetch_seconds`, so a flood of tokens with made-up kids cannot turn the
edge into a request amplifier against the control plane.

With a slow or failing control plane (issue 11.14) there is one refresh at a time:
look-ups that need it join the one in flight; the floor counts attempts, failed
ones too; and a known `kid` whose cache is merely stale is answered at once from
the cache while the refresh runs in the background, so a slow control plane never
stalls stream starts.
"""

from __future__ import annotations

import asyncio
import contextlib
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
        self._fetched_at: float | None = None  # last success
        self._attempted_at: float | None = None  # last attempt, failed or not
        self._inflight: asyncio.Task[None] | None = None

    @property
    def refreshing(self) -> bool:
        return self._inflight is not None and not self._inflight.done()

    async def key(self, kid: str) -> Ed25519PublicKey | None:
        """The public key for `kid`, or None when the control plane does not know it."""
        known = self._keys.get(kid)
        if known is not None:
            assert self._fetched_at is not None
            if self._clock() - self._fetched_at > self._max_age:
                self._start_refresh()  # in the background: stale keys are still good
            return known
        refresh = self._start_refresh()
        if refresh is not None:
            # Shielded: a caller that gives up must not cancel everyone's refresh.
            await asyncio.shield(refresh)
        if self._fetched_at is None:
            raise KeysUnavailable("cannot fetch the control plane's signing keys")
        return self._keys.get(kid)

    def _start_refresh(self) -> asyncio.Task[None] | None:
        """The refresh in flight, or a new one unless the last attempt is more recent
        than the floor (None: nothing to wait for)."""
        if self.refreshing:
            return self._inflight
        now = self._clock()
        if self._attempted_at is not None and now - self._attempted_at < self._min_refetch:
            return None
        self._attempted_at = now
        self._inflight = asyncio.create_task(self._refresh(), name="jwks-refresh")
        return self._inflight

    async def _refresh(self) -> None:
        try:
            response = await self._client.get(self._url, timeout=5.0)
            response.raise_for_status()
            keys = parse_jwks(response.json())
        except Exception as exc:  # in the background too: nothing may escape
            log.warning("jwks fetch failed: %s", exc)
            return  # keep serving with the keys we have
        self._keys = keys
        self._fetched_at = self._clock()

    async def aclose(self) -> None:
        """Cancel a refresh still running (the app's lifespan, before its client closes)."""
        if self._inflight is not None:
            self._inflight.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._inflight

    async def ready(self) -> bool:
        try:
            await self.key("")
        except KeysUnavailable:
            return False
        return bool(self._keys)
