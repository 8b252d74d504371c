"""Revocations, shared through the store: the control plane writes them, every edge
checks them before a stream starts and about once a second while it runs.

A revocation lives as long as any token it could concern (the longest token life
plus the longest stream), then expires by itself.
"""

from __future__ import annotations

from shared.store import Store
from shared.tokens import StreamGrant

KINDS = ("user", "company", "jti")


def revocation_key(kind: str, value: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"unknown revocation kind {kind!r}")
    return f"revoked:{kind}:{value}"


def grant_keys(grant: StreamGrant) -> list[str]:
    return [
        revocation_key("user", grant.user_id),
        revocation_key("company", grant.company_id),
        revocation_key("jti", grant.jti),
    ]


async def revoke(store: Store, kind: str, value: str, ttl_seconds: float) -> None:
    await store.set(revocation_key(kind, value), b"1", ttl_seconds)
