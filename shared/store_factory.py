"""Choose the store's backend from configuration: Redis when a URL is set, memory
otherwise. A module of its own so that `shared/store.py`, which the backends
import, imports neither of them."""

from __future__ import annotations

from shared.store import Store
from shared.store_memory import MemoryStore
from shared.store_redis import RedisStore


def open_store(redis_url: str | None, *, prefix: str = "llmgw:") -> Store:
    if redis_url:
        return RedisStore.from_url(redis_url, prefix=prefix)
    return MemoryStore()
