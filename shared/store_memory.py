"""In-memory store for the single-process embedded mode (`llm-gateway dev`)."""

from __future__ import annotations

import time
from collections.abc import Callable

from shared.store import Admission, Admitted, InitGate, InitGated, SlotRelease


class MemoryStore:
    """Every store protocol in one process's dicts. `clock` times the TTLs, the
    counters' windows and the bounded sets' members, as Redis's own clock does for
    the Redis store (seconds, `time.monotonic` unless a test passes a fake one)."""

    def __init__(
        self, clock: Callable[[], float] | None = None, wall: Callable[[], float] | None = None
    ) -> None:
        self._clock = clock or time.monotonic
        self._wall = wall or time.time  # `server_time`: one process, its own wall clock
        self._values: dict[str, tuple[bytes, float]] = {}
        self._outbox: dict[str, bytes] = {}
        self._due: dict[str, float] = {}
        self._backing_off: dict[str, float] = {}
        self._dead: dict[str, bytes] = {}
        self._slots: dict[str, dict[str, float]] = {}
        self._logs: dict[str, tuple[list[bytes], float]] = {}

    def _live(self, key: str) -> bytes | None:
        entry = self._values.get(key)
        if entry is None:
            return None
        value, expires = entry
        if expires <= self._clock():
            del self._values[key]
            return None
        return value

    def _sweep(self) -> None:
        if len(self._values) > 10_000:
            now = self._clock()
            for key in [k for k, (_, exp) in self._values.items() if exp <= now]:
                del self._values[key]

    async def get(self, key: str) -> bytes | None:
        return self._live(key)

    async def get_many(self, keys: list[str]) -> list[bytes | None]:
        return [self._live(key) for key in keys]

    async def set(self, key: str, value: bytes, ttl_seconds: float) -> None:
        self._sweep()
        self._values[key] = (value, self._clock() + ttl_seconds)

    async def set_if_absent(self, key: str, value: bytes, ttl_seconds: float) -> bool:
        if self._live(key) is not None:
            return False
        await self.set(key, value, ttl_seconds)
        return True

    async def delete(self, key: str) -> None:
        self._values.pop(key, None)

    async def outbox_put(
        self, item_id: str, payload: bytes, due_at: float, release: SlotRelease | None = None
    ) -> None:
        if release is not None:
            await self.release_slots(release)
        self._outbox[item_id] = payload
        self._due[item_id] = due_at

    async def release_slots(self, release: SlotRelease) -> None:
        for key in release.slot_keys:
            self._slots.get(key, {}).pop(release.member, None)

    async def outbox_claim(self, now: float, lease_seconds: float, limit: int) -> list[str]:
        due = sorted((at, item) for item, at in self._due.items() if at <= now)[:limit]
        for _, item in due:
            self._due[item] = now + lease_seconds
            self._backing_off.pop(item, None)
        return [item for _, item in due]

    async def outbox_get(self, item_id: str) -> bytes | None:
        return self._outbox.get(item_id)

    async def outbox_reschedule(self, item_id: str, payload: bytes, due_at: float) -> None:
        if item_id in self._outbox:
            self._outbox[item_id] = payload
            self._due[item_id] = due_at
            self._backing_off[item_id] = due_at

    async def outbox_expedite(self, now: float) -> int:
        moved = 0
        for item_id, at in self._backing_off.items():
            if self._due.get(item_id) == at and at > now:
                self._due[item_id] = now
                moved += 1
        self._backing_off.clear()
        return moved

    async def outbox_ack(self, item_ids: list[str]) -> None:
        for item_id in item_ids:
            self._outbox.pop(item_id, None)
            self._due.pop(item_id, None)
            self._backing_off.pop(item_id, None)

    async def outbox_size(self) -> int:
        return len(self._outbox)

    async def dead_letter_put(self, item_id: str, payload: bytes) -> None:
        await self.outbox_ack([item_id])
        self._dead[item_id] = payload

    async def dead_letters(self, limit: int) -> list[tuple[str, bytes]]:
        return list(self._dead.items())[:limit]

    async def dead_letter_count(self) -> int:
        return len(self._dead)

    async def dead_letter_ids(self) -> list[str]:
        return list(self._dead)

    async def dead_letter_take(self, item_id: str) -> bytes | None:
        return self._dead.pop(item_id, None)

    async def admit(self, admission: Admission) -> Admitted:
        a = admission
        if any(self._live(key) is not None for key in a.revocation_keys):
            return Admitted("revoked")
        first = self._live(a.used_key)
        if first is not None:
            if a.nonce and first.decode() == a.mark():  # this admission again: taken
                fetched = self._live(a.fetch_key) if a.fetch_key is not None else None
                return Admitted("ok", fetched=fetched)
            return Admitted("reconnect" if first.decode().split(" ")[0] == a.path else "used")
        if a.issued_key is not None and self._live(a.issued_key) is None:
            return Admitted("unknown")
        sets = []
        for index, (key, limit) in enumerate(zip(a.slot_keys, a.limits, strict=True)):
            members = self._bounded(key)
            if a.member not in members and len(members) >= limit:
                return Admitted("full", full_index=index)
            sets.append(members)
        for members in sets:
            members[a.member] = self._at(a.slots_expire_at, a.now)
        await self.set(a.used_key, a.mark().encode(), a.used_ttl_seconds)
        fetched = self._live(a.fetch_key) if a.fetch_key is not None else None
        if a.issued_key is not None and not a.nonce:
            self._values.pop(a.issued_key, None)
        elif a.issued_key is not None:
            value, expires = self._values[a.issued_key]
            self._values[a.issued_key] = (value, min(expires, self._clock() + a.repeat_seconds))
        return Admitted("ok", fetched=fetched)

    async def unadmit(self, admission: Admission) -> bool:
        a = admission
        if not a.nonce:
            raise ValueError("only an admission with a nonce can be taken back")
        mark = self._live(a.used_key)
        if mark is None or mark.decode() != a.mark():
            return False
        del self._values[a.used_key]
        await self.release_slots(SlotRelease(a.slot_keys, a.member))
        issued = self._live(a.issued_key) if a.issued_key is not None else None
        if a.issued_key is not None and issued is not None:
            self._values[a.issued_key] = (issued, self._clock() + a.used_ttl_seconds)
        return True

    async def hit(self, key: str, window_seconds: float) -> int:
        return await self.add(key, 1, window_seconds)

    async def unhit(self, key: str, window_seconds: float) -> None:
        current = self._live(key)
        if current is not None:
            self._values[key] = (str(int(current) - 1).encode(), self._values[key][1])

    async def add(self, key: str, amount: int, window_seconds: float) -> int:
        current = self._live(key)
        total = (int(current) if current is not None else 0) + amount
        expires = self._values[key][1] if current is not None else None
        self._values[key] = (str(total).encode(), expires or self._clock() + window_seconds)
        return total

    def _bounded(self, key: str) -> dict[str, float]:
        """A bounded set's live members, each with its deadline on `clock`."""
        members = self._slots.setdefault(key, {})
        now = self._clock()
        for stale in [m for m, exp in members.items() if exp <= now]:
            del members[stale]
        return members

    def _at(self, deadline: float, now: float) -> float:
        """A caller's deadline (`now` on its clock) on the store's clock."""
        return self._clock() + (deadline - now)

    def _theirs(self, at: float, now: float) -> float:
        """A deadline on the store's clock back on a caller's (`now` on its clock)."""
        return now + (at - self._clock())

    async def bounded_members(self, key: str) -> list[str]:
        return list(self._bounded(key))

    async def bounded_add(
        self, key: str, member: str, expires_at: float, now: float, limit: int, drop: list[str]
    ) -> float | None:
        members = self._bounded(key)
        for gone in drop:
            members.pop(gone, None)
        if member not in members and len(members) >= limit:
            return self._theirs(min(members.values()), now)
        members[member] = self._at(expires_at, now)
        return None

    async def bounded_remove(self, keys: list[str], member: str) -> None:
        for key in keys:
            self._slots.get(key, {}).pop(member, None)

    # --- init's gate (issue 14.3) -------------------------------------------------

    async def init_gate(self, gate: InitGate) -> InitGated:
        g = gate
        for index, (key, limit) in enumerate(zip(g.rate_keys, g.rate_limits, strict=True)):
            if await self.hit(key, g.rate_window_seconds) > limit:
                return InitGated("rate", index)
        for index, (key, limit) in enumerate(zip(g.tpm_keys, g.tpm_limits, strict=True)):
            raw = self._live(key)
            if raw is not None and int(raw) >= limit:
                return InitGated("tpm", index)
        sets = [self._bounded(key) for key in g.pending_keys]
        for index, (members, limit) in enumerate(zip(sets, g.pending_limits, strict=True)):
            if g.member not in members and len(members) >= limit:
                for started in [m for m in members if self._live(g.used_prefix + m) is not None]:
                    del members[started]
                if len(members) >= limit:
                    frees_at = self._theirs(min(members.values()), g.now)
                    return InitGated("pending", index, frees_at=frees_at)
        for members in sets:
            members[g.member] = self._at(g.expires_at, g.now)
        fetched = self._live(g.fetch_key) if g.fetch_key is not None else None
        return InitGated("ok", fetched=fetched)

    # --- end of init's gate ---------------------------------------------------------

    async def log_append(self, key: str, items: list[bytes], ttl_seconds: float) -> int:
        now = self._clock()
        for stale in [k for k, (_, exp) in self._logs.items() if exp <= now]:
            del self._logs[stale]
        log, _ = self._logs.get(key, ([], 0.0))
        log.extend(items)
        self._logs[key] = (log, now + ttl_seconds)
        return len(log)

    async def log_range(
        self, key: str, start: int, count: int, max_bytes: int | None = None
    ) -> list[bytes]:
        entry = self._logs.get(key)
        if entry is None or entry[1] <= self._clock() or count <= 0:
            return []
        items = entry[0][start : start + count]
        if max_bytes is None:
            return items
        size = 0
        for taken, item in enumerate(items):
            size += len(item)
            if taken and size > max_bytes:
                return items[:taken]
        return items

    async def log_length(self, key: str) -> int:
        entry = self._logs.get(key)
        if entry is None or entry[1] <= self._clock():
            return 0
        return len(entry[0])

    async def server_time(self) -> float:
        return self._wall()

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        return None
