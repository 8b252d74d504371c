"""Revocations, shared through the store: the control plane writes them, every edge
checks them before a stream starts and about once a second while it runs.

A revocation lives as long as any token it could concern (the longest token life
plus the longest stream), then expires by itself.
"""

from __future__ import annotations

from shared.hash_tags import company_tag
from shared.store import KeyValueStore
from shared.tokens import StreamGrant

KINDS = ("user", "company", "jti")


def revocation_key(kind: str, value: str, company_id: str) -> str:
    """`company_id`: the company the user, the company or the token belongs to (the
    key's hash tag, `shared.hash_tags`)."""
    if kind not in KINDS:
        raise ValueError(f"unknown revocation kind {kind!r}")
    return f"revoked:{company_tag(company_id)}:{kind}:{value}"


def api_key_parent(key_id: str) -> str:
    """The `parent_jti` of the stream tokens an API key mints: revoked with the key, it
    ends every one of them at the edges, minted before or while the key died. Never
    a token id's shape (those are hex), so it names no signed-in session."""
    return f"key-{key_id}"


def grant_keys(grant: StreamGrant) -> list[str]:
    keys = [
        revocation_key("user", grant.user_id, grant.company_id),
        revocation_key("company", grant.company_id, grant.company_id),
        revocation_key("jti", grant.jti, grant.company_id),
    ]
    if grant.parent_jti is not None:
        # The access token that minted it was signed out (``POST /v1/auth/logout``),
        # or the API key was revoked (`api_key_parent`).
        keys.append(revocation_key("jti", grant.parent_jti, grant.company_id))
    return keys


async def revoke(
    store: KeyValueStore, kind: str, value: str, company_id: str, ttl_seconds: float
) -> None:
    await store.set(revocation_key(kind, value, company_id), b"1", ttl_seconds)
