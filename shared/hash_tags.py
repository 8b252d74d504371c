"""Redis Cluster hash tags: which keys live together on one shard.

A Lua script may only touch keys of one cluster slot, and Redis hashes only the part
of a key between its first ``{`` and the next ``}`` when there is one. A stream's
admission (`Store.admit`) checks its token's revocations (user, company, jti), marks
the token used, takes a slot in the user's and the company's stream sets and reads
the stashed request, all in one script: those keys span a user, a company and a
token, so the one tag they can share is the company's, ``{c:<company_id>}``.

The trade-off: all of one company's admission keys sit on one shard, so a single
very large company loads one shard (its limits are checked there anyway, in one
place). Companies spread over the shards. Keys that no script touches together
(rate counters, checkpoints, resume logs) carry no tag and spread freely; the
edge's global outbox uses its own tag (`shared.store_redis`).

On a single Redis the braces are ordinary characters: one naming everywhere.
"""

from __future__ import annotations


def company_tag(company_id: str) -> str:
    return "{c:" + company_id + "}"
