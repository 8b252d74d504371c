"""The store on a Redis Cluster (issue 14.5): a private 3-master cluster, both apps
selecting the cluster client from ``LLMGW_REDIS_URL=redis+cluster://…``. Every Lua
script's keys must hash to one slot and multi-key reads may span slots, so the
whole flow, single use, exactly-once settlement, the stream limits, revocations
while streams of several companies run, and the outbox all go through it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import httpx
import orjson
import pytest

from shared.revocations import grant_keys
from shared.sse import ServerSentEvent, SSEDecoder
from shared.stash import stash_key
from shared.store import Admission, InitGate, InitGated, SlotRelease
from shared.store_redis import RedisStore
from shared.tokens import StreamGrant
from stream_edge.grants import used_key
from stream_edge.limits import slot_keys
from tests import test_e2e_flow as flow
from tests.conftest import REDIS_URL, fresh_redis_prefix
from tests.scale_servers import redis_cluster
from tests.stack import InProcessStack, base_env
from tests.token_claims import jti_of

PREFIX = "llmgw_t:"


@pytest.fixture(scope="module")
def cluster_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with redis_cluster(tmp_path_factory.mktemp("cluster")) as url:
        yield url


@pytest.fixture(scope="module")
def stack(cluster_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessStack]:
    db = tmp_path_factory.mktemp("db") / "gateway.db"
    env = {
        **base_env(f"sqlite:///{db}", cluster_url, PREFIX),
        "LLMGW_MAX_STREAMS_PER_USER": "2",
        "LLMGW_WEBHOOK_RETRY_BASE_SECONDS": "0.05",
    }
    with InProcessStack(env) as running:
        yield running


def _events(response: httpx.Response) -> list[ServerSentEvent]:
    decoder = SSEDecoder()
    return [event for raw in response.iter_raw() for event in decoder.feed(raw)]


def test_streams_are_billed_exactly_on_a_redis_cluster(stack: InProcessStack) -> None:
    c = stack.client
    for url in (c.cp_url, c.edge_url):  # both see the store as reachable
        assert c.http.get(f"{url}/readyz").status_code == 200
    flow.test_openai_client_stream_is_billed_exactly(stack)
    flow.test_eventsource_stream_as_raw_sse(stack)


def test_tokens_are_single_use_on_a_redis_cluster(stack: InProcessStack) -> None:
    flow.test_token_is_single_use(stack, "stream")
    flow.test_token_is_single_use(stack, "completions")


def test_duplicate_webhooks_charge_once_on_a_redis_cluster(stack: InProcessStack) -> None:
    flow.test_webhook_duplicates_charge_once_and_bad_signature_is_401(stack)


def test_stream_limits_hold_on_a_redis_cluster(stack: InProcessStack) -> None:
    c = stack.client
    token = c.new_user(c.new_company("5"))
    slow = [c.init_ok(token, {"query": f"s{i} [[mock tokens=10 delay_ms=60]]"}) for i in range(2)]
    extra = c.init_ok(token, {"query": "third [[mock tokens=2]]"})
    with (
        httpx.stream("GET", slow[0]["stream_url"]) as a,
        httpx.stream("GET", slow[1]["stream_url"]) as b,
    ):
        assert a.status_code == b.status_code == 200
        third = c.http.get(extra["stream_url"])
        assert third.status_code == 429, third.text
        assert third.json()["error"]["code"] == "too_many_streams"
        # Another company's keys hash elsewhere: its user is not held back.
        stranger = c.new_user(c.new_company("5"))
        theirs = c.init_ok(stranger, {"query": "mine [[mock tokens=2]]"})
        assert c.http.get(theirs["stream_url"]).status_code == 200
        assert _events(a)[-1].event == _events(b)[-1].event == "complete"
    # The slots come back with the usage reports (the outbox); the same unburned
    # token then starts.
    deadline = time.monotonic() + 15
    while (again := c.http.get(extra["stream_url"])).status_code == 429:
        assert time.monotonic() < deadline, "the slots were never released"
        time.sleep(0.05)
    assert again.status_code == 200 and b"event: complete" in again.content


def test_revocation_ends_one_companys_stream_on_a_redis_cluster(stack: InProcessStack) -> None:
    # Two companies' streams run at once: the edge's revocation watch reads both
    # companies' keys (different slots) in one pass.
    c = stack.client
    tokens = [c.new_user(c.new_company("5")) for _ in range(2)]
    grants = [
        c.init_ok(t, {"query": f"long {i} [[mock tokens=60 delay_ms=25]]"})
        for i, t in enumerate(tokens)
    ]
    with (
        httpx.stream("GET", grants[0]["stream_url"], timeout=30) as a,
        httpx.stream("GET", grants[1]["stream_url"], timeout=30) as b,
    ):
        assert a.status_code == b.status_code == 200
        revoked = c.admin(
            "POST", "/v1/admin/revocations", json={"jti": jti_of(grants[0]["stream_token"])}
        )
        assert revoked.status_code == 201, revoked.text
        first, second = _events(a), _events(b)
    assert first[-1].event == "error" and orjson.loads(first[-1].data)["code"] == "revoked"
    assert second[-1].event == "complete"
    assert c.wait_usage(tokens[0], grants[0]["reservation_id"])["status"] == "revoked"
    assert c.wait_usage(tokens[1], grants[1]["reservation_id"])["status"] == "completed"


def test_outbox_and_admission_on_a_redis_cluster(cluster_url: str) -> None:
    async def go() -> None:
        store = RedisStore.from_url(cluster_url, prefix="llmgw_t_outbox:")
        try:
            # Admission for two companies: each script call stays in its slot.
            taken = []
            for company in ("co-a", "co-b", "co-c"):
                grant = _grant(company)
                admitted = await store.admit(
                    Admission(
                        revocation_keys=grant_keys(grant),
                        used_key=used_key(company, grant.jti),
                        path="stream",
                        used_ttl_seconds=60,
                        slot_keys=slot_keys(grant),
                        limits=[1, 1],
                        member=grant.jti,
                        now=time.time(),
                        slots_expire_at=time.time() + 60,
                        fetch_key=stash_key(company, grant.jti),
                    )
                )
                assert admitted.verdict == "ok"
                taken.append(SlotRelease(slot_keys(grant), grant.jti))
            # Reads across slots (the revocation watch, the sweeper) answer in order.
            marks = await store.get_many([used_key(c, f"j-{c}") for c in ("co-c", "x", "co-a")])
            assert marks == [b"stream", None, b"stream"]

            now = time.time()
            await store.outbox_put("usage_1", b"one", now, release=taken[0])
            await store.outbox_put("usage_2", b"two", now, release=taken[1])
            await store.outbox_put("usage_3", b"three", now + 3600, release=taken[2])
            assert await store.outbox_size() == 3
            for release in taken:  # the usage report gave the slots back
                assert await store.bounded_members(release.slot_keys[0]) == []
            claimed = await store.outbox_claim(now + 1, 30, 10)
            assert sorted(claimed) == ["usage_1", "usage_2"]
            assert await store.outbox_claim(now + 1, 30, 10) == []  # leased
            assert await store.outbox_get("usage_1") == b"one"
            await store.outbox_reschedule("usage_2", b"two again", now)
            assert await store.outbox_claim(now + 1, 30, 10) == ["usage_2"]
            await store.outbox_ack(["usage_1", "usage_2", "usage_3"])
            assert await store.outbox_size() == 0
            await store.dead_letter_put("usage_3", b"three")
            assert await store.dead_letters(10) == [("usage_3", b"three")]
            assert await store.dead_letter_count() == 1
            assert await store.dead_letter_ids() == ["usage_3"]
            assert await store.dead_letter_take("usage_3") == b"three"
        finally:
            await store.close()

    asyncio.run(go())


def test_the_init_gate_reads_pending_marks_only_when_full_on_a_redis_cluster(
    cluster_url: str,
) -> None:
    """A cluster's init gate goes step by step (`_init_gate_steps`); it answers as the
    single node's script, the pending set full or not, and, like the script, reads
    the pending grants' marks only when the set is at its limit."""
    now = 1_000_000.0
    tag = uuid.uuid4().hex
    gate = InitGate(
        rate_keys=[f"rl:user:{tag}"], rate_limits=[100], rate_window_seconds=60,
        tpm_keys=[], tpm_limits=[],
        pending_keys=[f"pending:init:{tag}", f"pending:company:{tag}"], pending_limits=[2, 3],
        used_prefix=f"jti:{{c:{tag}}}:", member="a", now=now, expires_at=now + 10,
    )  # fmt: skip
    colleague = replace(gate, pending_keys=[f"pending:init:{tag}-2", gate.pending_keys[1]])
    # (the init, the mark of a started grant to set first, whether the set is full)
    steps: list[tuple[InitGate, str | None, bool]] = [
        (gate, None, False),
        (replace(gate, member="b", expires_at=now + 20), None, False),
        (replace(gate, member="c"), None, True),  # refused: frees at a's expiry
        (gate, None, False),  # a is already in: no new place
        (replace(gate, member="c", expires_at=now + 30), "a", True),  # a started
        (replace(gate, member="d", expires_at=now + 40), "b", True),  # b started
        # a colleague: the company's set (c, d) has room for one (e), then is full
        (replace(colleague, member="e", expires_at=now + 50), None, False),
        (replace(colleague, member="f", expires_at=now + 60), None, True),  # c frees 1st
    ]

    async def run(store: RedisStore) -> list[Any]:
        # The marks' reads counted on this store's own client (a server-wide count
        # would also see the module's stack, whose sweeper reads marks now and then).
        reads = 0
        get_many = store.get_many

        async def counted(keys: list[str]) -> list[bytes | None]:
            nonlocal reads
            reads += 1
            return await get_many(keys)

        store.get_many = counted  # type: ignore[method-assign]
        seen: list[Any] = []
        for step, started, full in steps:
            if started is not None:
                await store.set(gate.used_prefix + started, b"stream", 60)
            before = reads
            gated = await store.init_gate(step)
            read_marks = reads > before
            members = [
                sorted(await store.bounded_members(key))
                for key in (*gate.pending_keys, colleague.pending_keys[0])
            ]
            # `frees_at` to the second: the store's clock moved a little between calls.
            seen.append((replace(gated, frees_at=round(gated.frees_at)), members))
            if store.is_cluster:
                assert read_marks is full, (step.member, full)
        return seen

    async def go() -> None:
        cluster = RedisStore.from_url(cluster_url, prefix="llmgw_t_gate:")
        try:
            assert cluster.is_cluster
            on_cluster = await run(cluster)
        finally:
            await cluster.close()
        with fresh_redis_prefix() as prefix:
            single = RedisStore.from_url(REDIS_URL, prefix=prefix)
            try:
                by_script = await run(single)
            finally:
                await single.close()
        assert on_cluster == by_script
        assert [gated.verdict for gated, _ in on_cluster] == [
            "ok", "ok", "pending", "ok", "ok", "ok", "ok", "pending"
        ]  # fmt: skip
        assert on_cluster[2][0] == InitGated("pending", 0, frees_at=now + 10)
        assert on_cluster[-1][0] == InitGated("pending", 1, frees_at=now + 30)
        assert [members[0] for _, members in on_cluster[4:6]] == [["b", "c"], ["c", "d"]]
        # refused by the company's set, f is in neither
        assert on_cluster[-1][1] == [["c", "d"], ["c", "d", "e"], ["e"]]

    asyncio.run(go())


def _grant(company: str) -> StreamGrant:
    return StreamGrant(
        jti=f"j-{company}", user_id=f"u-{company}", company_id=company, role="member",
        scopes=("llm:chat:send",), session_id="s", model="mock-fast", max_tokens=16,
        max_input_tokens=100, reservation_id="r", request_id="q", issued_at=0,
        expires_at=int(time.time()) + 60,
    )  # fmt: skip


def test_a_plain_redis_url_still_opens_a_single_node_client(cluster_url: str) -> None:
    # The scheme, not a guess, picks the client: one node of the cluster named as
    # redis:// is a single-node store (and a cross-slot script fails loudly).
    store = RedisStore.from_url(cluster_url.replace("redis+cluster", "redis"), prefix="x:")
    with contextlib.closing(_Closer(store)):
        assert not store.is_cluster


class _Closer:
    def __init__(self, store: RedisStore) -> None:
        self._store = store

    def close(self) -> None:
        asyncio.run(self._store.close())
