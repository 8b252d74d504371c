"""A stream's admission acknowledged by Redis replicas before its upstream request
(``LLMGW_REDIS_MIN_REPLICA_ACKS``).

Redis replicates asynchronously: an admission (the token's single-use mark, its
stream slots) that the primary ran but no replica had yet received is lost when a
replica is promoted, and the same token replayed against the new primary is
admitted again: a second stream on one hold, one of the two unbilled (settlement is
once per reservation). Measured before: with the replica unable to have the write
(frozen, or cut off by its promotion) the stream started upstream at once (mock saw
1 request), and after the failover the replay streamed too (mock saw 2 requests for
one token). With the option on, the edge sends `WAIT` after the admission on the
same connection and starts nothing until the replicas acknowledged it; short of
that, the admission is taken back and the client gets 503 `store_unavailable`, its
token still good for a retry.

A primary and replicas of the test's own (`tests.private_redis`), never the
machine's shared Redis; the gateway in process (`tests.inproc`).
"""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import redis.asyncio

from shared.hash_tags import company_tag
from shared.settings import ConfigError
from shared.store import Admission, Store
from shared.store_factory import open_store
from shared.store_redis import RedisStore, ReplicaAckMissing, ReplicaAcks, _acked_connections
from stream_edge.grants import used_key
from stream_edge.settings import EdgeSettings
from tests.conftest import _unavailable
from tests.inproc import Gateway
from tests.private_redis import PrivateRedis
from tests.stack import base_env
from tests.token_claims import claims_of

HI = {"role": "user", "content": "hi [[mock tokens=2]]"}
ACKS = {"LLMGW_REDIS_MIN_REPLICA_ACKS": "1", "LLMGW_REDIS_REPLICA_ACK_TIMEOUT_SECONDS": "0.3"}


@pytest.fixture
def primary(tmp_path: Path) -> Iterator[PrivateRedis]:
    if shutil.which("redis-server") is None:
        _unavailable("redis-server", FileNotFoundError("not on PATH"))
    with _server(tmp_path / "primary") as server:
        yield server


@pytest.fixture
def replica(tmp_path: Path, primary: PrivateRedis) -> Iterator[PrivateRedis]:
    with _server(tmp_path / "replica", primary) as server:
        yield server


@contextlib.contextmanager
def _server(directory: Path, replica_of: PrivateRedis | None = None) -> Iterator[PrivateRedis]:
    directory.mkdir()
    server = PrivateRedis(directory, replica_of)
    server.start()
    try:
        if replica_of is not None:
            server.caught_up()
        yield server
    finally:
        server.stop()


def edge_store(env: dict[str, str]) -> Store:
    """The store an edge with this environment opens."""
    settings = EdgeSettings.from_env(env)
    return open_store(
        settings.redis_url, prefix=settings.redis_prefix, replica_acks=settings.replica_acks()
    )


def gateway_env(tmp_path: Path, redis_url: str) -> dict[str, str]:
    return {**base_env(f"sqlite:///{tmp_path}/gw.db", redis_url, "t:"), **ACKS}


def wait_calls(server: PrivateRedis) -> int:
    """How many WAIT commands `server` has run."""
    client = redis.Redis.from_url(server.url)
    try:
        stats = client.info("commandstats")
    finally:
        client.close()
    return int(stats.get("cmdstat_wait", {}).get("calls", 0))


async def test_an_admission_no_replica_acknowledged_starts_no_upstream_request(
    tmp_path: Path, primary: PrivateRedis, replica: PrivateRedis
) -> None:
    env = gateway_env(tmp_path, primary.url)
    async with Gateway(env, store=edge_store(env)) as gw:
        user = await gw.new_user()
        token = (await gw.init_ok(user, {"messages": [HI], "max_tokens": 16}))["stream_token"]
        claims = claims_of(token)
        assert wait_calls(primary) == 0  # init's writes do not wait
        replica.caught_up()  # it has the init's stash: only the admission can be missing
        replica.freeze()  # its link stays up, it acknowledges nothing
        try:
            status, answer = await gw.complete(token, {"messages": [HI]})
        finally:
            replica.thaw()
        assert (status, gw.stats.requests) == (503, 0), answer  # nothing reached the backend
        assert answer["error"]["code"] == "store_unavailable", answer
        # Operators see the shortfall in Prometheus, not only in the log.
        registry = gw.edge_state().metrics.registry
        sample = ("llmgw_edge_token_rejections_total", {"reason": "replicas_behind"})
        assert registry.get_sample_value(*sample) == 1
        # Taken back on the primary: the token is unused, the retry can have it, and
        # the company's stream slot is free.
        company = claims["company_id"]
        assert await gw.store.get(used_key(company, claims["jti"])) is None
        slots = f"streams:{company_tag(company)}:company:{company}"
        assert await gw.store.bounded_members(slots) == []
        replica.caught_up()
        waits = wait_calls(primary)
        status, answer = await gw.complete(token, {"messages": [HI]})
        assert status == 200, answer
        assert gw.stats.requests == 1
        assert wait_calls(primary) == waits + 1  # the admission waited for its replica
        # A refusal takes nothing a failover could give back: it does not wait on them.
        replica.freeze()
        try:
            status, answer = await gw.complete(token, {"messages": [HI]})
        finally:
            replica.thaw()
        assert (status, answer["error"]["code"]) == (401, "token_used"), answer


async def test_a_failover_to_a_replica_that_missed_the_admission_streams_the_token_once(
    tmp_path: Path, primary: PrivateRedis, replica: PrivateRedis
) -> None:
    """The replica is promoted (`REPLICAOF NO ONE`, as Sentinel does) while the old
    primary still takes the edge's writes: it has everything up to the admission and
    never gets the admission itself, the case async replication loses. The edge then
    reaches the new primary (a new replica behind it) and the client replays."""
    env = gateway_env(tmp_path, primary.url)
    async with Gateway(env, store=edge_store(env)) as gw:
        user = await gw.new_user()
        token = (await gw.init_ok(user, {"messages": [HI], "max_tokens": 16}))["stream_token"]
        replica.caught_up()
        promoted = redis.Redis.from_url(replica.url)
        try:
            promoted.replicaof("NO", "ONE")
        finally:
            promoted.close()
        first, answer = await gw.complete(token, {"messages": [HI]})
        served_before_failover = gw.stats.requests

        # The failover: an edge on the promoted replica, which has a replica of its own.
        with _server(tmp_path / "new-replica", replica):
            after = edge_store({**env, "LLMGW_REDIS_URL": replica.url})
            await gw.add_edge("after", store=after)
            status, answer = await gw.complete(token, {"messages": [HI]}, edge="after")
            # Before the failover nothing started; after it, the one stream this token
            # pays for.
            seen = (first, served_before_failover, status, gw.stats.requests)
            assert seen == (503, 0, 200, 1), answer
            status, answer = await gw.complete(token, {"messages": [HI]}, edge="after")
            assert (status, answer["error"]["code"]) == (401, "token_used"), answer
            assert gw.stats.requests == 1


def test_replica_acks_are_a_single_redis_setting_checked_at_start() -> None:
    env = base_env("sqlite:///unused.db", "redis://127.0.0.1:6379/0")
    assert EdgeSettings.from_env(env).replica_acks() is None  # off by default
    acks = EdgeSettings.from_env({**env, **ACKS}).replica_acks()
    assert acks == ReplicaAcks(1, 0.3) and acks.timeout_ms() == 300
    refused = {
        "needs LLMGW_REDIS_URL": {**base_env("sqlite:///unused.db"), **ACKS},
        "not a Redis Cluster": {**env, **ACKS, "LLMGW_REDIS_URL": "redis+cluster://h:7000"},
        "must be": {**env, "LLMGW_REDIS_MIN_REPLICA_ACKS": "two"},
    }
    for reason, bad in refused.items():
        with pytest.raises(ConfigError, match=reason) as error:
            EdgeSettings.from_env(bad)
        assert "LLMGW_REDIS_MIN_REPLICA_ACKS" in str(error.value)
        assert "\n" not in str(error.value)


def _admission(jti: str, nonce: str = "first") -> Admission:
    now = time.time()
    return Admission(
        revocation_keys=[f"rev:{jti}"],
        used_key=f"jti:{jti}",
        path="stream",
        used_ttl_seconds=300,
        slot_keys=[f"slots:{jti}"],
        limits=[5],
        member=jti,
        now=now,
        slots_expire_at=now + 900,
        nonce=nonce,
    )


@pytest.mark.parametrize("lean", [True, False], ids=["pipelined", "redis-py"])
async def test_an_admission_returns_once_the_replica_has_it_and_not_before(
    primary: PrivateRedis, replica: PrivateRedis, lean: bool
) -> None:
    """Both ways the store waits (the lean connections of `redis://`, redis-py's for
    TLS and Unix sockets): `ok` means the replica has the used mark, read from the
    replica itself as soon as `admit` returns; a frozen replica means no `ok`."""
    acks = ReplicaAcks(1, 0.3)
    plain = RedisStore.from_url(primary.url, prefix="t:")
    store = RedisStore(
        redis.asyncio.Redis.from_url(primary.url),
        "t:",
        acks=acks,
        acked=_acked_connections(primary.url, acks, lean=lean),
    )
    on_replica = redis.Redis.from_url(replica.url)
    try:
        # The option off: the admission as it always was, no WAIT.
        assert (await plain.admit(_admission("off"))).verdict == "ok"
        assert wait_calls(primary) == 0
        admitted = await store.admit(_admission("a"))
        assert admitted.verdict == "ok"
        assert on_replica.get("t:jti:a") is not None
        replica.freeze()
        try:
            with pytest.raises(ReplicaAckMissing, match="0 of 1 replicas"):
                await store.admit(_admission("b"))
            # The primary ran it: taking it back is the caller's (`admission.claim`).
            assert await plain.unadmit(_admission("b"))
            assert await plain.bounded_members("slots:b") == []
            # Another request on the same path takes nothing (a reconnect): its
            # verdict stands without the replicas.
            assert (await store.admit(_admission("a", "again"))).verdict == "reconnect"
        finally:
            replica.thaw()
    finally:
        on_replica.close()
        await store.close()
        await plain.close()
