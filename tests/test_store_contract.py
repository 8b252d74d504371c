"""One contract for every store backend (shared/store.py's protocols): the same
cases run against `MemoryStore`, `RedisStore` on the pipelined connection the edge
uses, `RedisStore` on redis-py's pool alone, and `RedisStore` on a Redis Cluster.

Time is never slept through and then guessed at: the memory store runs on a fake
clock that the test moves; on Redis, `elapse` polls the server's own clock (the one
its expiry uses) until the time has passed, so an expired key is gone for certain.
Times passed as arguments (`now`, `due_at`) are plain numbers: a bounded set or a
stream slot keeps only the life between them (`expires_at - now`), on the store's
clock, which `elapse` moves.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import dataclasses
import inspect
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis.asyncio as aioredis

import shared.store
from shared.store import Admission, Admitted, SlotRelease, Store
from shared.store_factory import open_store
from shared.store_memory import MemoryStore
from shared.store_redis import RedisStore, cluster_url
from stream_edge.outbox import replay_dead_letter
from tests.conftest import REDIS_URL, fresh_redis_prefix
from tests.scale_servers import redis_cluster

T = 1_000_000.0  # the `now` the cases pass in; unrelated to any clock
# A TTL or window the cases let run out; each case's calls before it runs out must
# land within it, on a loaded machine too (at 50 ms, two calls 50 ms apart under
# `make test`'s parallel workers found the window gone).
SHORT = 0.5


@dataclass
class Backend:
    store: Store
    elapse: Callable[[float], Awaitable[None]]


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    async def elapse(self, seconds: float) -> None:
        self.now += seconds


def server_clock(url: str) -> tuple[Callable[[float], Awaitable[None]], aioredis.Redis]:
    """`elapse` for a Redis: returns once the server's clock moved `seconds` past
    the call (plus a millisecond: a key expires only after its last millisecond)."""
    client = aioredis.Redis.from_url(url)

    async def server_now() -> float:
        seconds, micros = await client.time()
        return seconds + micros / 1e6

    async def elapse(seconds: float) -> None:
        until = await server_now() + seconds + 0.001
        while await server_now() <= until:
            await asyncio.sleep(0.005)

    return elapse, client


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with redis_cluster(tmp_path_factory.mktemp("cluster")) as url:
        yield url


@pytest.fixture(params=["memory", "redis", "redis-pool", "redis-cluster"])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    if request.param == "memory":
        clock = FakeClock()
        store = MemoryStore(clock=clock)
        yield Backend(store, clock.elapse)
        await store.close()
        return
    with contextlib.ExitStack() as cleanup:
        if request.param == "redis-cluster":
            url = request.getfixturevalue("cluster")
            prefix = f"t_{uuid.uuid4().hex[:12]}:"  # the cluster is ours and stops after
            node_url = cluster_url(url)
            assert node_url is not None
        else:
            url = node_url = REDIS_URL
            prefix = cleanup.enter_context(fresh_redis_prefix())
        if request.param == "redis-pool":
            store = RedisStore(aioredis.Redis.from_url(url), prefix)
        else:
            store = RedisStore.from_url(url, prefix=prefix)
        elapse, clock_client = server_clock(node_url)
        try:
            yield Backend(store, elapse)
        finally:
            await store.close()
            await clock_client.aclose()


# Every key of one admission must share a Redis Cluster slot: the hash tag `{c}`.
def admission(member: str, *, path: str = "stream", limits: tuple[int, int] = (2, 1)) -> Admission:
    return Admission(
        revocation_keys=["rev:{c}:user", f"rev:{{c}}:{member}"],
        used_key=f"used:{{c}}:{member}",
        path=path,
        used_ttl_seconds=60,
        slot_keys=["slots:{c}:company", "slots:{c}:user"],
        limits=list(limits),
        member=member,
        now=T,
        slots_expire_at=T + 60,
        fetch_key=f"stash:{{c}}:{member}",
    )


# --- key/value --------------------------------------------------------------------
async def test_values_are_kept_until_their_ttl(backend: Backend) -> None:
    store = backend.store
    assert await store.get("kv:a") is None
    await store.set("kv:a", b"one", 60)
    await store.set("kv:brief", b"two", SHORT)
    assert await store.get("kv:a") == b"one"
    assert await store.get_many(["kv:a", "kv:none", "kv:a"]) == [b"one", None, b"one"]
    assert await store.get_many([]) == []
    await store.set("kv:a", b"uno", 60)  # overwrites
    await store.set("kv:b", b"long", 60)
    await store.set("kv:b", b"short", SHORT)  # and the TTL with it
    await backend.elapse(SHORT)
    assert await store.get_many(["kv:brief", "kv:a", "kv:b"]) == [None, b"uno", None]
    await store.delete("kv:a")
    await store.delete("kv:never-set")
    assert await store.get("kv:a") is None


async def test_set_if_absent_creates_once(backend: Backend) -> None:
    store = backend.store
    assert await store.set_if_absent("nonce:1", b"first", 60)
    assert not await store.set_if_absent("nonce:1", b"second", 60)
    assert await store.get("nonce:1") == b"first"
    await store.delete("nonce:1")
    assert await store.set_if_absent("nonce:1", b"third", SHORT)
    await backend.elapse(SHORT)  # expired: absent again
    assert await store.set_if_absent("nonce:1", b"fourth", 60)
    assert await store.get("nonce:1") == b"fourth"


# --- counters ---------------------------------------------------------------------
async def test_hits_count_within_a_window_and_restart_after_it(backend: Backend) -> None:
    store = backend.store
    assert [await store.hit("rate:u", SHORT) for _ in range(3)] == [1, 2, 3]
    await store.unhit("rate:u", SHORT)
    assert await store.hit("rate:u", SHORT) == 3
    assert await store.get("rate:u") == b"3"  # counters read back as values (tpm precheck)
    assert await store.hit("rate:other", 60) == 1  # counters are independent
    await backend.elapse(SHORT)
    assert await store.hit("rate:u", SHORT) == 1
    assert await store.hit("rate:other", 60) == 2


async def test_a_late_unhit_never_counts_against_the_next_window(backend: Backend) -> None:
    store = backend.store
    assert await store.hit("login:x", SHORT) == 1
    await backend.elapse(SHORT)
    await store.unhit("login:x", SHORT)  # the attempt's window has ended
    # Memory forgets nothing that is gone (1); Redis lets DECR make a -1 that
    # expires with a window (0). Either way no attempt is counted twice.
    assert await store.hit("login:x", SHORT) <= 1


async def test_add_sums_within_a_window(backend: Backend) -> None:
    store = backend.store
    assert await store.add("tpm:c", 500, SHORT) == 500
    assert await store.add("tpm:c", 250, SHORT) == 750
    assert await store.add("tpm:c", -500, SHORT) == 250  # taken back
    assert await store.add("tpm:fresh", -3, 60) == -3
    await backend.elapse(SHORT)
    assert await store.get("tpm:c") is None
    assert await store.add("tpm:c", 40, SHORT) == 40


# --- bounded sets -----------------------------------------------------------------
async def test_a_bounded_set_caps_expires_and_drops(backend: Backend) -> None:
    store = backend.store
    key = "pending:u"
    assert await store.bounded_members(key) == []
    assert await store.bounded_add(key, "a", T + SHORT, T, 2, []) is None
    assert await store.bounded_add(key, "a", T + SHORT, T, 2, []) is None  # a member may renew
    assert await store.bounded_add(key, "b", T + 60, T, 2, []) is None
    # full: a frees first, said on the caller's clock (T: its `now`)
    assert await store.bounded_add(key, "c", T + 30, T, 2, []) == pytest.approx(T + SHORT, abs=1)
    assert sorted(await store.bounded_members(key)) == ["a", "b"]
    await backend.elapse(SHORT)
    assert await store.bounded_members(key) == ["b"]  # a expired by then
    assert await store.bounded_add(key, "c", T + 30, T, 2, ["b", "gone"]) is None  # b dropped
    assert await store.bounded_add(key, "d", T + 40, T, 2, []) is None
    assert sorted(await store.bounded_members(key)) == ["c", "d"]
    await store.bounded_remove([key], "c")
    await store.bounded_remove([key, "pending:other"], "never")
    assert await store.bounded_members(key) == ["d"]
    # the answer on this caller's clock, whatever it reads: d frees 40 s on
    assert await store.bounded_add(key, "e", 5.0 + 50, 5.0, 1, []) == pytest.approx(45.0, abs=1)


async def test_a_member_with_a_shorter_life_does_not_cut_the_others_short(
    backend: Backend,
) -> None:
    """The retired signing keys' set holds keys with lives of their own (each until
    its last token expires), announced in no set order: a key retired long ago,
    added after one retired just now, set the whole set's expiry to its own few
    seconds left, and the leaked key was forgotten with it."""
    store = backend.store
    key = "signing-keys:retired"
    assert await store.bounded_add(key, "leaked", T + 3600, T, 10, []) is None
    assert await store.bounded_add(key, "old", T + SHORT, T, 10, []) is None
    await backend.elapse(SHORT)
    assert await store.bounded_members(key) == ["leaked"]


async def test_callers_whose_clocks_disagree_agree_on_what_lives(backend: Backend) -> None:
    """Replicas (control planes, edges) share these sets, each with its own clock:
    members were scored with the writer's deadline and pruned with the reader's
    `now`, so one running ten minutes ahead dropped the others' live members (a
    pending-init cap, a stream-slot limit passed). Now a life is counted on the
    store's clock from the moment the store took it."""
    store = backend.store
    ahead = T + 600  # the same instant on a clock ten minutes fast
    assert await store.bounded_add("pending:u", "a", T + 220, T, 1, []) is None
    assert await store.bounded_add("pending:u", "b", ahead + 220, ahead, 1, []) == pytest.approx(
        ahead + 220, abs=1
    )
    assert await store.bounded_members("pending:u") == ["a"]
    assert (await store.admit(admission("j1"))).verdict == "ok"
    skewed = dataclasses.replace(admission("j2"), now=T + 1000, slots_expire_at=T + 1060)
    assert (await store.admit(skewed)) == Admitted("full", full_index=1)  # j1 still streams
    assert await store.bounded_members("slots:{c}:user") == ["j1"]


async def test_a_member_is_forgotten_from_several_bounded_sets_at_once(backend: Backend) -> None:
    """`pending_inits.forget`: the user's and the company's set (other shards on a
    cluster), one call."""
    store = backend.store
    sets = ["pending:init:u", "pending:company:c"]
    for key in sets:
        assert await store.bounded_add(key, "a", T + 10, T, 5, []) is None
        assert await store.bounded_add(key, "b", T + 10, T, 5, []) is None
    await store.bounded_remove(sets, "a")
    assert [await store.bounded_members(key) for key in sets] == [["b"], ["b"]]


# --- admission --------------------------------------------------------------------
async def test_admission_takes_slots_and_returns_the_stash(backend: Backend) -> None:
    store = backend.store
    await store.set("stash:{c}:j1", b"request", 60)
    first = await store.admit(admission("j1"))
    assert (first.verdict, first.fetched) == ("ok", b"request")
    assert await store.get("used:{c}:j1") == b"stream"  # marked used by its path
    assert await store.bounded_members("slots:{c}:company") == ["j1"]
    assert await store.bounded_members("slots:{c}:user") == ["j1"]
    # The same path again is a reconnect; another path is a second use. Neither
    # takes anything.
    assert (await store.admit(admission("j1"))).verdict == "reconnect"
    assert (await store.admit(admission("j1", path="completions"))).verdict == "used"
    await store.release_slots(SlotRelease(["slots:{c}:company", "slots:{c}:user"], "j1"))
    bare = await store.admit(admission("j0"))  # no stash stored: nothing fetched
    assert (bare.verdict, bare.fetched) == ("ok", None)


async def test_a_first_use_needs_the_issued_key_and_takes_nothing_without_it(
    backend: Backend,
) -> None:
    store = backend.store
    issued = dataclasses.replace(admission("j1"), fetch_key=None, issued_key="stash:{c}:j1")
    # A store that lost its data: the token's stash is gone, so is any used mark.
    assert (await store.admit(issued)).verdict == "unknown"
    assert await store.get("used:{c}:j1") is None  # not marked used
    assert await store.bounded_members("slots:{c}:company") == []  # nothing taken
    await store.set("stash:{c}:j1", b"request", 60)
    first = await store.admit(dataclasses.replace(issued, fetch_key="stash:{c}:j1"))
    assert (first.verdict, first.fetched) == ("ok", b"request")
    # Its reconnect is known by the used mark; revocations still come first.
    await store.delete("stash:{c}:j1")
    assert (await store.admit(issued)).verdict == "reconnect"
    await store.set("rev:{c}:user", b"1", 60)
    assert (await store.admit(dataclasses.replace(issued, member="j2"))).verdict == "revoked"


async def test_a_repeated_admission_is_ok_again_and_can_be_taken_back(backend: Backend) -> None:
    """A lost reply: the store ran the admission, its caller did not hear. The same
    admission again (its nonce) is `ok`, with the stash; another request with the
    token is still refused; `unadmit` undoes only its own admission."""
    store = backend.store
    await store.set("stash:{c}:j1", b"request", 60)
    mine = dataclasses.replace(admission("j1"), issued_key="stash:{c}:j1", nonce="n-1")
    first = await store.admit(mine)
    assert (first.verdict, first.fetched) == ("ok", b"request")
    assert await store.get("used:{c}:j1") == b"stream n-1"
    again = await store.admit(mine)  # a retry of the same request
    assert (again.verdict, again.fetched) == ("ok", b"request")
    assert await store.bounded_members("slots:{c}:user") == ["j1"]
    # Any other request with the token: its own nonce, or none.
    assert (await store.admit(dataclasses.replace(mine, nonce="n-2"))).verdict == "reconnect"
    assert (await store.admit(dataclasses.replace(mine, nonce=""))).verdict == "reconnect"
    other_path = dataclasses.replace(mine, path="completions", nonce="n-3")
    assert (await store.admit(other_path)).verdict == "used"
    # A take-back by another request changes nothing; by its own, everything.
    assert not await store.unadmit(dataclasses.replace(mine, nonce="n-2"))
    assert await store.get("used:{c}:j1") == b"stream n-1"
    assert await store.unadmit(mine)
    assert await store.get("used:{c}:j1") is None
    assert await store.bounded_members("slots:{c}:company") == []
    assert await store.bounded_members("slots:{c}:user") == []
    assert not await store.unadmit(mine)  # once
    # The token is unused again: its next request is a first use, with the stash.
    retried = await store.admit(dataclasses.replace(mine, nonce="n-4"))
    assert (retried.verdict, retried.fetched) == ("ok", b"request")
    with pytest.raises(ValueError):
        await store.unadmit(dataclasses.replace(mine, nonce=""))


async def test_a_first_use_with_a_nonce_keeps_its_stash_only_briefly(backend: Backend) -> None:
    store = backend.store
    await store.set("stash:{c}:j1", b"request", 3600)
    mine = dataclasses.replace(
        admission("j1"), issued_key="stash:{c}:j1", nonce="n-1", repeat_seconds=SHORT
    )
    assert (await store.admit(mine)).verdict == "ok"
    await store.set("stash:{c}:j2", b"brief", SHORT / 2)  # never made longer
    brief = dataclasses.replace(
        admission("j2", limits=(2, 2)), issued_key="stash:{c}:j2", nonce="n-2", repeat_seconds=3600
    )
    assert (await store.admit(brief)).verdict == "ok"
    await backend.elapse(SHORT)
    assert await store.get("stash:{c}:j2") is None
    assert await store.get("stash:{c}:j1") is None


async def test_admission_refuses_revoked_and_full(backend: Backend) -> None:
    store = backend.store
    assert (await store.admit(admission("j1"))).verdict == "ok"
    full = await store.admit(admission("j2"))
    assert (full.verdict, full.full_index) == ("full", 1)  # the user's slot (limit 1)
    # All or none: the company's set did not take j2, and j2 is not marked used.
    assert await store.bounded_members("slots:{c}:company") == ["j1"]
    assert await store.get("used:{c}:j2") is None
    await store.set("rev:{c}:user", b"1", 60)  # the user's tokens are revoked
    assert (await store.admit(admission("j2"))).verdict == "revoked"
    assert (await store.admit(admission("j1"))).verdict == "revoked"  # before reconnect
    await store.delete("rev:{c}:user")
    await store.set("rev:{c}:j2", b"1", 60)  # just this token
    assert (await store.admit(admission("j2"))).verdict == "revoked"
    assert (await store.admit(admission("j1"))).verdict == "reconnect"


async def test_slots_come_back_by_release_report_or_expiry(backend: Backend) -> None:
    store = backend.store
    limits = (1, 1)
    assert (await store.admit(admission("j1", limits=limits))).verdict == "ok"
    assert (await store.admit(admission("j2", limits=limits))).verdict == "full"
    await store.release_slots(SlotRelease(["slots:{c}:company", "slots:{c}:user"], "j1"))
    assert (await store.admit(admission("j2", limits=limits))).verdict == "ok"
    # The usage report gives the slots back in the same step as it is stored.
    release = SlotRelease(["slots:{c}:company", "slots:{c}:user"], "j2")
    await store.outbox_put("usage_j2", b"report", T, release=release)
    assert await store.bounded_members("slots:{c}:company") == []
    assert (await store.admit(admission("j3", limits=limits))).verdict == "ok"
    # A crashed edge's slots expire: j3 holds them for their life, on the store's clock.
    brief = dataclasses.replace(admission("j5", limits=(2, 2)), slots_expire_at=T + SHORT)
    assert (await store.admit(brief)).verdict == "ok"
    assert (await store.admit(admission("j4", limits=(2, 2)))).verdict == "full"
    await backend.elapse(SHORT)
    assert (await store.admit(admission("j4", limits=(2, 2)))).verdict == "ok"


# --- outbox -----------------------------------------------------------------------
async def test_the_outbox_claims_due_items_in_due_order_under_a_lease(backend: Backend) -> None:
    store = backend.store
    for item, due in (("c", T + 3), ("a", T + 2), ("b", T + 1), ("later", T + 100)):
        await store.outbox_put(item, f"payload {item}".encode(), due)
    assert await store.outbox_size() == 4
    assert await store.outbox_claim(T, 10, 10) == []  # nothing due yet
    assert await store.outbox_claim(T + 5, 10, 2) == ["b", "a"]  # earliest first, capped
    assert await store.outbox_claim(T + 5, 10, 10) == ["c"]  # the leased ones are hidden
    assert await store.outbox_claim(T + 5, 10, 10) == []
    assert await store.outbox_get("a") == b"payload a"
    assert await store.outbox_get("missing") is None
    # Leases ran out (all at T + 15): claimable again, ties in id order.
    assert await store.outbox_claim(T + 15, 10, 10) == ["a", "b", "c"]
    assert await store.outbox_size() == 4  # claiming is not acknowledging


async def test_the_outbox_reschedules_and_forgets_acknowledged_items(backend: Backend) -> None:
    store = backend.store
    await store.outbox_put("x", b"v1", T)
    await store.outbox_put("y", b"y", T)
    assert await store.outbox_claim(T, 30, 10) == ["x", "y"]
    await store.outbox_reschedule("x", b"v2", T + 5)  # a failed delivery, retried later
    assert await store.outbox_claim(T + 4, 30, 10) == []
    assert await store.outbox_claim(T + 5, 30, 10) == ["x"]
    assert await store.outbox_get("x") == b"v2"
    await store.outbox_ack(["x", "unknown"])
    await store.outbox_ack([])
    assert await store.outbox_size() == 1
    assert await store.outbox_get("x") is None
    # Acknowledged meanwhile (another edge delivered it after the lease ran out):
    # it stays gone, payload included.
    await store.outbox_reschedule("x", b"v3", T)
    assert await store.outbox_get("x") is None
    assert await store.outbox_claim(T + 100, 30, 10) == ["y"]
    assert await store.outbox_size() == 1


async def test_the_outbox_brings_forward_only_what_backs_off(backend: Backend) -> None:
    """`outbox_expedite`: a report backing off is due now; one leased to an edge keeps
    its lease (posting it twice would double a recovering receiver's load), as does
    one already due, one put afresh, acknowledged or dead-lettered."""
    store = backend.store
    for item in ("backing", "leased", "early", "acked", "dead", "new"):
        await store.outbox_put(item, item.encode(), T)
    assert len(await store.outbox_claim(T, 30, 10)) == 6
    for item in ("backing", "acked", "dead", "new"):
        await store.outbox_reschedule(item, item.encode(), T + 100)
    await store.outbox_reschedule("early", b"early", T + 2)
    await store.outbox_reschedule("leased", b"leased", T + 1)
    assert await store.outbox_claim(T + 1, 200, 1) == ["leased"]  # leased to T + 201
    await store.outbox_ack(["acked"])
    await store.dead_letter_put("dead", b"dead")
    await store.outbox_put("new", b"new", T + 50)  # put afresh (a replayed dead letter)
    assert await store.outbox_expedite(T + 3) == 1  # "backing"
    assert await store.outbox_claim(T + 3, 30, 10) == ["early", "backing"]
    assert await store.outbox_expedite(T + 3) == 0  # nothing backs off any more
    assert await store.outbox_claim(T + 32, 30, 10) == []  # "leased", "new" not due
    assert await store.outbox_size() == 4  # backing, early, leased, new


async def test_the_outbox_brings_a_large_backlog_forward_in_batches(backend: Backend) -> None:
    store = backend.store
    for i in range(2_500):
        await store.outbox_put(f"r{i}", b"r", T)
    assert len(await store.outbox_claim(T, 30, 3_000)) == 2_500
    for i in range(2_500):
        await store.outbox_reschedule(f"r{i}", b"r", T + 100 + i)
    assert await store.outbox_expedite(T) == 2_500
    assert len(await store.outbox_claim(T, 30, 3_000)) == 2_500


async def test_dead_letters_are_kept_listed_and_taken_once(backend: Backend) -> None:
    store = backend.store
    assert await store.dead_letters(10) == []
    await store.dead_letter_put("d1", b"one")
    await store.dead_letter_put("d2", b"two")
    assert sorted(await store.dead_letters(10)) == [("d1", b"one"), ("d2", b"two")]
    assert len(await store.dead_letters(1)) == 1
    assert await store.dead_letter_take("d1") == b"one"
    assert await store.dead_letter_take("d1") is None
    assert await store.dead_letters(10) == [("d2", b"two")]
    assert await store.outbox_size() == 0  # dead letters are not pending deliveries
    assert await store.dead_letter_count() == 1
    assert await store.dead_letter_ids() == ["d2"]
    await store.dead_letter_take("d2")
    assert await store.dead_letter_count() == 0 and await store.dead_letter_ids() == []


# --- resume log -------------------------------------------------------------------
async def test_a_log_appends_ranges_and_expires(backend: Backend) -> None:
    store = backend.store
    assert await store.log_range("events:none", 0, 100) == []
    assert await store.log_append("events:j", [b"e0", b"e1"], 60) == 2
    assert await store.log_append("events:j", [b"e2"], 60) == 3
    assert await store.log_range("events:j", 0, 100) == [b"e0", b"e1", b"e2"]
    assert await store.log_range("events:j", 2, 100) == [b"e2"]
    assert await store.log_range("events:j", 3, 100) == []
    assert await store.log_append("events:brief", [b"x"], SHORT) == 1
    assert await store.log_append("events:cut", [b"x"], 60) == 1
    assert await store.log_append("events:cut", [b"y"], SHORT) == 2  # the last TTL holds
    await backend.elapse(SHORT)
    assert await store.log_range("events:brief", 0, 100) == []
    assert await store.log_range("events:cut", 0, 100) == []
    assert await store.log_append("events:brief", [b"y"], 60) == 1  # a new log
    assert await store.log_range("events:j", 1, 100) == [b"e1", b"e2"]
    # A reader takes at most `count` items: never a whole long log at once.
    assert await store.log_range("events:j", 0, 2) == [b"e0", b"e1"]
    assert await store.log_range("events:j", 1, 1) == [b"e1"]
    assert await store.log_range("events:j", 0, 0) == []


async def test_a_log_read_is_bounded_by_bytes_and_always_makes_progress(backend: Backend) -> None:
    store = backend.store
    items = [b"a" * 10, b"b" * 10, b"c" * 100, b"d" * 10] + [b"e"] * 20
    await store.log_append("events:sized", items, 60)
    assert await store.log_length("events:sized") == 24
    assert await store.log_length("events:none") == 0
    assert await store.log_range("events:sized", 0, 10, max_bytes=20) == items[:2]
    assert await store.log_range("events:sized", 0, 10, max_bytes=19) == items[:1]
    # An item larger than the budget still comes, alone: a reader must get past it.
    assert await store.log_range("events:sized", 2, 10, max_bytes=20) == [items[2]]
    assert await store.log_range("events:sized", 3, 2, max_bytes=1000) == items[3:5]
    # Past the script's batches of eight, and to the end of the log.
    assert await store.log_range("events:sized", 3, 100, max_bytes=1000) == items[3:]
    assert await store.log_range("events:sized", 4, 100, max_bytes=12) == items[4:16]
    assert await store.log_range("events:sized", 24, 10, max_bytes=1000) == []
    assert await store.log_range("events:none", 0, 10, max_bytes=1000) == []


async def test_a_live_store_answers_ping(backend: Backend) -> None:
    assert await backend.store.ping()


async def test_the_store_tells_its_own_time(backend: Backend) -> None:
    """Epoch seconds on the store's clock (`shared.store_clock` runs on from them);
    this host's and the test Redis's clocks are one."""
    assert abs(await backend.store.server_time() - time.time()) < 60


# --- the factory --------------------------------------------------------------------
async def test_the_factory_picks_the_backend_from_the_url() -> None:
    memory = open_store(None)
    assert isinstance(memory, MemoryStore)
    with fresh_redis_prefix() as prefix:
        single = open_store(REDIS_URL, prefix=prefix)
        try:
            assert isinstance(single, RedisStore) and not single.is_cluster
            assert await single.ping()
        finally:
            await single.close()


def test_the_protocols_import_no_backend() -> None:
    # The backends import shared/store.py; it importing them back was a cycle.
    tree = ast.parse(Path(inspect.getfile(shared.store)).read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)} | {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    assert not {name for name in imported if name and name.startswith("shared")}, imported


async def test_a_dead_letter_leaves_the_outbox_in_the_same_step(backend: Backend) -> None:
    """Moved in two steps (keep the dead letter, then acknowledge the outbox item),
    an operator's replay landing between them put the item back in the outbox, and
    the acknowledgement then deleted it: the report was lost while the replay said
    it was sent. One step now: a replay after it finds the item to put back."""
    store = backend.store
    await store.outbox_put("usage_x", b'{"attempt": 3}', T)
    await store.dead_letter_put("usage_x", b'{"attempt": 3}')
    assert await store.outbox_get("usage_x") is None and await store.outbox_size() == 0
    assert await replay_dead_letter(store, "usage_x")
    assert await store.outbox_size() == 1 and await store.dead_letter_count() == 0
