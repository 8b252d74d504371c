"""The hot-state store: one small interface, two backends (memory, Redis).

Both services keep short-lived shared state here: single-use token ids, the
requests stashed at init, and the edge's webhook outbox. Every key carries a TTL so
a crashed process leaks nothing for long. Choose a backend with `open_store(url)`.
"""

from __future__ import annotations

from typing import Protocol


class Store(Protocol):
    async def get(self, key: str) -> bytes | None: ...

    async def get_many(self, keys: list[str]) -> list[bytes | None]:
        """Several keys in one round trip."""
        ...

    async def set(self, key: str, value: bytes, ttl_seconds: float) -> None: ...

    async def set_if_absent(self, key: str, value: bytes, ttl_seconds: float) -> bool:
        """Atomically create `key`; False when it already exists (single use)."""
        ...

    async def delete(self, key: str) -> None: ...

    async def outbox_put(self, item_id: str, payload: bytes, due_at: float) -> None:
        """Keep `payload` until acknowledged; it becomes claimable at `due_at`."""
        ...

    async def outbox_claim(self, now: float, lease_seconds: float, limit: int) -> list[str]:
        """Claim up to `limit` due items; each claimed item is hidden for the lease."""
        ...

    async def outbox_get(self, item_id: str) -> bytes | None: ...

    async def outbox_reschedule(self, item_id: str, payload: bytes, due_at: float) -> None: ...

    async def outbox_ack(self, item_id: str) -> None: ...

    async def outbox_size(self) -> int: ...

    async def dead_letter_put(self, item_id: str, payload: bytes) -> None:
        """Keep an event the receiver refused for good, for an operator to inspect."""
        ...

    async def dead_letters(self, limit: int) -> list[tuple[str, bytes]]: ...

    async def dead_letter_take(self, item_id: str) -> bytes | None:
        """Remove and return one dead letter (to replay it)."""
        ...

    async def acquire_slots(
        self, keys: list[str], limits: list[int], member: str, now: float, expires_at: float
    ) -> int:
        """Take one slot in each of `keys` (sets of live members, at most `limits[i]`),
        all or none, atomically. Members expire at `expires_at`, so a crashed process
        leaks its slots only until then. Returns -1, or the index of the key that is full."""
        ...

    async def release_slots(self, keys: list[str], member: str) -> None: ...

    async def hit(self, key: str, window_seconds: float) -> int:
        """Count one event in the current fixed window of `key`; returns the count so far
        (a rate limiter's primitive: the window's key expires with the window)."""
        ...

    async def log_append(self, key: str, items: list[bytes], ttl_seconds: float) -> int:
        """Append to an ordered log (a stream's events, for resuming); returns its length."""
        ...

    async def log_range(self, key: str, start: int) -> list[bytes]:
        """Items from index `start` (0-based) to the end."""
        ...

    async def ping(self) -> bool: ...

    async def close(self) -> None: ...


def open_store(redis_url: str | None, *, prefix: str = "llmgw:") -> Store:
    if redis_url:
        from shared.store_redis import RedisStore

        return RedisStore.from_url(redis_url, prefix=prefix)
    from shared.store_memory import MemoryStore

    return MemoryStore()
