"""Revocations, shared through the store: the control plane writes them, every edge
checks them before a stream starts and about once a second while it runs.

A revocation lives as long as any token it could concern (the longest token life
plus the longest stream), then expires by itself.
"""

from __future__ import annotations

from collections.abc import Iterable

from shared.hash_tags import company_tag
from shared.store import BoundedSetStore, KeyValueStore
from shared.tokens import StreamGrant

KINDS = ("user", "company", "jti")
# The signing keys a platform admin retired (`POST /v1/admin/signing-keys/rotate` with
# `retire_others`: a key leaked), each until the last token it signed has expired.
# Every edge and control-plane process reads it once a second: a retired key's tokens
# are refused, and its streams end, within about a second everywhere, where each
# process otherwise learnt it at its next read of the keys (an edge's JWKS cache: up
# to 5 minutes; a sibling control plane's key ring: up to a minute). One key, read on
# its own, so it needs no hash tag on a Redis Cluster.
RETIRED_SIGNING_KEYS = "signing-keys:retired"
# Rotations retire a few keys each: a set this large is not ours to grow.
RETIRED_SIGNING_KEYS_LIMIT = 10_000


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


async def restore(
    store: KeyValueStore, kind: str, value: str, company_id: str, ttl_seconds: float
) -> bool:
    """`revoke` only if the store lost the key: one standing keeps the TTL its
    revocation gave it. `ttl_seconds` is the life left as read on the caller's clock
    from another process's `created_at`: a clock running ahead would otherwise cut a
    standing key short (`control_plane.revocation_republish`). True: the key was lost
    and is set again."""
    return await store.set_if_absent(revocation_key(kind, value, company_id), b"1", ttl_seconds)


async def announce_retired_signing_keys(
    store: BoundedSetStore, kids: Iterable[str], until: float, now: float
) -> None:
    """Tell every edge and control plane that `kids` are retired, until `until`
    (epoch seconds: when the last token they signed has expired)."""
    for kid in kids:
        await store.bounded_add(
            RETIRED_SIGNING_KEYS, kid, until, now, RETIRED_SIGNING_KEYS_LIMIT, []
        )


async def retired_signing_keys(store: BoundedSetStore) -> frozenset[str]:
    return frozenset(await store.bounded_members(RETIRED_SIGNING_KEYS))
