"""Where a stream's concurrency slots live in the store: one sorted set per user and
one per company (`Store.admit` takes a slot in each, keyed by the token's `jti`).

Shared because two services give slots back: the edge with the stream's report,
and the control plane's sweeper when it settles the stream of an edge that died
(`control_plane.sweeper`), whose report, and so whose release, never comes."""

from __future__ import annotations

from shared.hash_tags import company_tag


def slot_keys(company_id: str, user_id: str) -> list[str]:
    # Both under the company's hash tag: admission takes them in one script.
    tag = company_tag(company_id)
    return [f"streams:{tag}:user:{user_id}", f"streams:{tag}:company:{company_id}"]
