"""The hot-state store: small protocols, two backends (memory, Redis).

Both services keep short-lived shared state here: single-use token ids, the
requests stashed at init, rate counters, and the edge's webhook outbox. Every key
carries a TTL so a crashed process leaks nothing for long, except the outbox, the
durable record of unbilled usage.

Each caller names the protocol it uses (`KeyValueStore`, `CounterStore`,
`BoundedSetStore`, `AdmissionStore`, `OutboxStore`, `LogStore`, `InitGateStore`,
`ClockStore`);
`Store` joins them for the app state that hands one object to all.
`shared/store_factory.py` picks a backend; this module imports neither, so the
backends can import it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

# How long a first use with a nonce keeps its stash for a repeat of the same
# admission (a retry after a lost reply) or its take-back (`unadmit`).
REPEAT_SECONDS = 120.0


@dataclass(frozen=True, slots=True)
class Admission:
    """Everything a stream's first request checks in the store, done in one atomic
    step (one round trip to Redis): not revoked, not used on another path, a free
    slot in each of `slot_keys`; then the token is marked used by `path` and the
    slots taken. `fetch_key`'s value (the stashed request) comes back with it.

    `now`, `slots_expire_at`: the slots' deadline on the caller's clock, kept for
    `slots_expire_at - now` on the store's (see `BoundedSetStore`): an edge whose
    clock runs ahead must not free the slots of another edge's live streams.

    `issued_key`: a key the issuer wrote before the token existed (its stashed
    request), which must still be there for a first use. A store that lost its data
    (restarted empty, a new instance, keys evicted) has lost the used mark too, so
    without it every used token would pass for a first use: it gets `unknown`, and
    nothing is taken or marked. A first use deletes it (after `fetch_key`'s read):
    from then on the used mark answers and nothing reads it, whereas kept, a started
    stream's request (up to ``LLMGW_MAX_REQUEST_BYTES``) stayed for the token's life
    plus 10 minutes, outside the pending-init cap that bounds unstarted ones.

    `nonce`: random, one per edge request (never derived from the token), kept in
    the used mark (``path nonce``; `path` has no space). The same admission run again
    (redis-py retrying a script whose reply was lost) is then `ok` again, with the
    stash, instead of a refusal of its own first use; any other request with the token
    still gets `reconnect` / `used`. With a nonce a first use keeps `issued_key` for
    `REPEAT_SECONDS` more at most (its repeat reads it) instead of deleting it, and
    `AdmissionStore.unadmit` can take the admission back. Empty: no repeat is
    recognised (the mark is the path alone, as before nonces)."""

    revocation_keys: list[str]
    used_key: str
    path: str
    used_ttl_seconds: float
    slot_keys: list[str]
    limits: list[int]
    member: str
    now: float
    slots_expire_at: float
    fetch_key: str | None = None
    issued_key: str | None = None
    nonce: str = ""
    repeat_seconds: float = REPEAT_SECONDS

    def mark(self) -> str:
        """The used mark's value: the path, and the nonce when there is one."""
        return f"{self.path} {self.nonce}" if self.nonce else self.path


@dataclass(frozen=True, slots=True)
class SlotRelease:
    """A stream's slots to give back (see `Admission`)."""

    slot_keys: list[str]
    member: str


@dataclass(frozen=True, slots=True)
class Admitted:
    # ok: first use, slots taken; reconnect: used before by the same path (nothing
    # taken); used: used by another path; revoked; full: `full_index` names the key;
    # unknown: `issued_key` is gone, the token cannot be shown unused (nothing taken).
    verdict: Literal["ok", "reconnect", "used", "revoked", "full", "unknown"]
    full_index: int = -1
    fetched: bytes | None = None


@dataclass(frozen=True, slots=True)
class InitGate:
    """What ``POST /v1/chat/init`` checks and counts in the store before it holds
    credits, in one atomic step (one round trip to a single Redis), in this order:

    1. the init counters of `rate_keys` (user, company), each counted in its fixed
       window (`hit`) and refused past `rate_limits[i]`; a refusal stops there, the
       later counters uncounted;
    2. the tokens-per-minute counters `tpm_keys`: refused when one already holds
       `tpm_limits[i]` or more (read only; empty when TPM is off);
    3. the bounded sets `pending_keys` (user, company), in order: `member` is added
       to every one of them until `expires_at`, or to none when one already holds
       `pending_limits[i]` others once the expired members and those whose stream
       started (`used_prefix` + member exists: the edge's used mark) are dropped; the
       started ones are looked up only in a set that is full; `now` and
       `expires_at` are read as `BoundedSetStore.bounded_add` reads them (the
       store's clock decides what expired, `frees_at` is on the caller's);
    4. `fetch_key`'s value read back (the company's LLM-config version).
    """

    rate_keys: list[str]
    rate_limits: list[int]
    rate_window_seconds: float
    tpm_keys: list[str]
    tpm_limits: list[int]
    pending_keys: list[str]
    pending_limits: list[int]
    used_prefix: str
    member: str
    now: float
    expires_at: float
    fetch_key: str | None = None


@dataclass(frozen=True, slots=True)
class InitGated:
    # ok: counted and added; rate / tpm / pending: `index` names the refusing key;
    # pending: that set is full and a place frees at `frees_at` at the latest.
    verdict: Literal["ok", "rate", "tpm", "pending"]
    index: int = -1
    frees_at: float = 0.0
    fetched: bytes | None = None


class KeyValueStore(Protocol):
    """Bytes under a key until its TTL runs out (markers, stashes, checkpoints)."""

    async def get(self, key: str) -> bytes | None: ...

    async def get_many(self, keys: list[str]) -> list[bytes | None]:
        """Several keys in one round trip."""
        ...

    async def set(self, key: str, value: bytes, ttl_seconds: float) -> None: ...

    async def set_if_absent(self, key: str, value: bytes, ttl_seconds: float) -> bool:
        """Atomically create `key`; False when it already exists (single use)."""
        ...

    async def delete(self, key: str) -> None: ...


class CounterStore(Protocol):
    """Fixed-window counters: a rate limiter's primitive. A counter's key expires
    with the window its first count opened; read one back with `KeyValueStore.get`."""

    async def hit(self, key: str, window_seconds: float) -> int:
        """Count one event in the current fixed window of `key`; returns the count so far."""
        ...

    async def unhit(self, key: str, window_seconds: float) -> None:
        """Take back one `hit` (an attempt counted in advance that did not count)."""
        ...

    async def add(self, key: str, amount: int, window_seconds: float) -> int:
        """Add `amount` (negative: take back) to the counter `key`; returns the new
        total (tokens per minute)."""
        ...


class BoundedSetStore(Protocol):
    """Sets of members that each expire at their own time, capped in size.

    Times are kept on the store's clock (Redis's `TIME`; the memory store's
    `clock`), never on a caller's: processes whose clocks disagree share these sets,
    and one whose clock runs ahead would expire the others' live members. A caller
    passes its deadline with its `now` (both on its clock): the store keeps the
    member for `expires_at - now` from its own present, and answers times back on
    that caller's clock. `Admission`'s slots are kept alike."""

    async def bounded_members(self, key: str) -> list[str]:
        """The members of the bounded set `key` that have not expired."""
        ...

    async def bounded_add(
        self, key: str, member: str, expires_at: float, now: float, limit: int, drop: list[str]
    ) -> float | None:
        """Atomically forget `drop` and the expired members, then add `member` (for
        `expires_at - now`) unless the set already holds `limit` others. None when
        added; otherwise the earliest expiry on the caller's clock, i.e. when a
        place frees up at the latest."""
        ...

    async def bounded_remove(self, keys: list[str], member: str) -> None:
        """Forget `member` from each set of `keys` (one round trip)."""
        ...


class AdmissionStore(Protocol):
    """A stream's start and the stream slots it holds (see `Admission`)."""

    async def admit(self, admission: Admission) -> Admitted:
        """Run `admission` atomically. Slots are sets of live members, at most
        `limits[i]` each, taken all or none; members expire at `slots_expire_at`, so a
        crashed process leaks its slots only until then."""
        ...

    async def unadmit(self, admission: Admission) -> bool:
        """Take back `admission` (its nonce is required) when its reply was lost and its
        request will not stream: only if the used mark is still its own (its nonce),
        delete it, give back its slots and keep `issued_key` for `used_ttl_seconds`
        again, so the token is unused as before. False (nothing changed) when the mark
        is absent or another request's: that admission never ran, or was refused."""
        ...

    async def release_slots(self, release: SlotRelease) -> None:
        """Give back a stream's slots on their own (when its report could not be
        stored: the slots must not wait for it)."""
        ...


class OutboxStore(Protocol):
    """The edge's webhook outbox, kept until acknowledged, and its dead letters."""

    async def outbox_put(
        self, item_id: str, payload: bytes, due_at: float, release: SlotRelease | None = None
    ) -> None:
        """Keep `payload` until acknowledged; it becomes claimable at `due_at`. With
        `release`, the stream's slots are given back in the same round trip."""
        ...

    async def outbox_claim(self, now: float, lease_seconds: float, limit: int) -> list[str]:
        """Claim up to `limit` due items, earliest due first; each claimed item is
        hidden for the lease."""
        ...

    async def outbox_get(self, item_id: str) -> bytes | None: ...

    async def outbox_reschedule(self, item_id: str, payload: bytes, due_at: float) -> None:
        """A failed delivery: the item backs off until `due_at`."""
        ...

    async def outbox_expedite(self, now: float) -> int:
        """Make every item backing off (rescheduled, not claimed since) due at `now`:
        the receiver answers again. Returns how many were brought forward."""
        ...

    async def outbox_ack(self, item_ids: list[str]) -> None:
        """Forget delivered items (several in one round trip)."""
        ...

    async def outbox_size(self) -> int: ...

    async def dead_letter_put(self, item_id: str, payload: bytes) -> None:
        """Keep an event the receiver refused for good, for an operator to inspect,
        and take it out of the outbox in the same step: done in two, an operator's
        replay landing between them was deleted by the second (the report lost)."""
        ...

    async def dead_letters(self, limit: int) -> list[tuple[str, bytes]]: ...

    async def dead_letter_count(self) -> int: ...

    async def dead_letter_ids(self) -> list[str]:
        """Every dead letter's id, without holding their bodies (to replay them all)."""
        ...

    async def dead_letter_take(self, item_id: str) -> bytes | None:
        """Remove and return one dead letter (to replay it)."""
        ...


class LogStore(Protocol):
    """Ordered, expiring logs (a stream's events, for resuming)."""

    async def log_append(self, key: str, items: list[bytes], ttl_seconds: float) -> int:
        """Append to the log `key`, restarting its TTL; returns its length."""
        ...

    async def log_range(
        self, key: str, start: int, count: int, max_bytes: int | None = None
    ) -> list[bytes]:
        """At most `count` items from index `start` (0-based): a reader never holds
        more of a log than it asked for (a reconnect flood on a long log). With
        `max_bytes`, also no more items than fit in that many bytes, but always the
        first one (a reader must get past an item larger than its budget)."""
        ...

    async def log_length(self, key: str) -> int:
        """How many items the log holds (0: none, or expired), without reading any."""
        ...


class ClockStore(Protocol):
    """The store's own clock: the one time every process sharing the store agrees on
    (`shared.store_clock` keeps it without a round trip)."""

    async def server_time(self) -> float:
        """Seconds since the epoch on the store's clock (Redis's `TIME`)."""
        ...


class InitGateStore(Protocol):
    """Init's checks and counters in one atomic step (rates, TPM, pending grants)."""

    async def init_gate(self, gate: InitGate) -> InitGated:
        """Run `gate` atomically: init's store work in one round trip (`InitGate`)."""
        ...


class Store(
    KeyValueStore,
    CounterStore,
    BoundedSetStore,
    AdmissionStore,
    OutboxStore,
    LogStore,
    InitGateStore,
    ClockStore,
    Protocol,
):
    """All of the above in one object, as the apps keep it in their state."""

    async def ping(self) -> bool: ...

    async def close(self) -> None: ...
