"""Choose the store's backend from configuration: Redis when a URL is set, memory
otherwise. A module of its own so that `shared/store.py`, which the backends
import, imports neither of them."""

from __future__ import annotations

from shared.store import Store
from shared.store_memory import MemoryStore
from shared.store_redis import RedisStore, ReplicaAcks


def open_store(
    redis_url: str | None, *, prefix: str = "llmgw:", replica_acks: ReplicaAcks | None = None
) -> Store:
    """`replica_acks`: admissions wait for that many Redis replicas (the edge's
    LLMGW_REDIS_MIN_REPLICA_ACKS); a Redis store only."""
    if redis_url:
        return RedisStore.from_url(redis_url, prefix=prefix, replica_acks=replica_acks)
    if replica_acks is not None:
        raise ValueError("replica acknowledgements need a Redis store")
    return MemoryStore()
