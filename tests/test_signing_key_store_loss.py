"""A leaked signing key's retirement outlives the store's record of it.

Attack: whoever holds a leaked signing key signs stream tokens (and access tokens)
for anyone. The platform admin rotates with `retire_others`; the rotation tells every
edge and control plane through one store entry (`RETIRED_SIGNING_KEYS`). Then that
entry is lost within the keys' token life: Redis restarts empty or fails over to a
replica that missed the write, or the rotation ran while Redis was down (503). Nothing
wrote it again, so an edge whose JWKS cache still held the key (up to 5 minutes)
streamed the thief's tokens, and a sibling control plane trusted the key until its
ring's next read (up to a minute). Now each control plane's republishing pass
(`revocation_republish.republish_once`) adds back, from the database's
``signing_keys.retired_at``, every retired key whose tokens may still be unexpired,
with that life (`retired_announce`).

A control plane (A), a sibling (B) and an edge on PostgreSQL and a Redis of the test's
own (`tests/private_redis.py`: a restart comes back empty), in one event loop; the
test runs the processes' passes itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from datetime import timedelta

import orjson
import pytest
import pytest_asyncio
import redis
from sqlalchemy.orm import Session

from control_plane.retired_announce import max_token_life
from control_plane.retired_keys import check_retired_keys
from control_plane.revocation_republish import republish_once
from control_plane.tables import SigningKey
from shared.revocations import RETIRED_SIGNING_KEYS
from shared.store_factory import open_store
from stream_edge.revocation_watch import check_pass
from tests.inproc import Gateway, events, eventually, kid_of, opened, second_control_plane
from tests.private_redis import PrivateRedis, private_redis
from tests.stack import base_env
from tests.test_signing_key_leak_scaled_out import BODY, me

__all__ = ["private_redis"]  # the fixture, used by name

pytestmark = pytest.mark.asyncio
PREFIX = "sk:"
LONG = {"query": "long [[mock tokens=400 delay_ms=20]]"}


@pytest_asyncio.fixture
async def gw(migrated_pg_url: str, private_redis: PrivateRedis) -> AsyncIterator[Gateway]:
    store = open_store(private_redis.url, prefix=PREFIX)
    async with Gateway(base_env(migrated_pg_url), store=store) as gateway:
        yield gateway


async def _leaked_tokens(gw: Gateway, count: int) -> tuple[str, list[str]]:
    """An access token the key about to leak signed, and `count` unused stream tokens
    it signed (the thief's, in effect), the edge's JWKS cache holding the key."""
    access = await gw.new_user()
    status, _ = await gw.complete((await gw.init_ok(access, BODY))["stream_token"], BODY)
    assert status == 200
    return access, [(await gw.init_ok(access, BODY))["stream_token"] for _ in range(count)]


async def _everyones_pass(gw: Gateway, *siblings: object) -> None:
    """Control plane A's republishing pass, then every reader's once-a-second pass."""
    await republish_once(gw.cp.state.deps)
    for deps in siblings:
        await check_retired_keys(deps)  # type: ignore[arg-type]
    await check_pass(gw.edge_state())


async def _back_empty(gw: Gateway, server: PrivateRedis) -> None:
    """`server` (stopped, or not yet) starts again empty; the store's connection has
    dropped, and its first command after that fails once: sent here. (Not asserted
    empty: the control planes' own passes run in the background too.)"""
    server.stop()
    server.start()
    with contextlib.suppress(redis.ConnectionError):
        await gw.store.bounded_members(RETIRED_SIGNING_KEYS)


def _forget_entry(server: PrivateRedis) -> None:
    client = redis.Redis.from_url(server.url)
    try:
        assert client.delete(PREFIX + RETIRED_SIGNING_KEYS) == 1
    finally:
        client.close()


def _score(server: PrivateRedis, kid: str) -> float | None:
    client = redis.Redis.from_url(server.url)
    try:
        score = client.zscore(PREFIX + RETIRED_SIGNING_KEYS, kid)
        return None if score is None else float(score)
    finally:
        client.close()


LOSSES = ["a failover lost the entry", "restarted empty", "down during the rotation"]


@pytest.mark.parametrize("loss", LOSSES)
async def test_a_retired_keys_entry_the_store_lost_is_back_within_a_pass(
    gw: Gateway, private_redis: PrivateRedis, loss: str
) -> None:
    """Before, after the loss and a pass of everyone: the sibling answered `/v1/me`
    200 on the leaked key's access token and minted a stream token with it (201,
    signed by the leaked key, which it still signed with); the edge streamed that
    token (200), and, where the store kept the stream tokens' records (the failover),
    a stream token minted before the rotation (200); a 400-token stream the key's
    token started ran to `complete`; the store's set stayed empty."""
    async with second_control_plane(gw) as (deps_b, b):
        leaked, (unused,) = await _leaked_tokens(gw, 1)
        leaked_kid = kid_of(leaked)
        assert await me(b, leaked) == 200
        running = await gw.init_ok(leaked, LONG)
        async with opened(await gw.get(running["stream_url"])) as stream:
            assert [e.event for e in await events(stream, stop_after=2)] == ["chunk", "chunk"]
            if loss == "down during the rotation":
                private_redis.stop()
            rotated = await gw.admin(
                "POST", "/v1/admin/signing-keys/rotate", json={"retire_others": True}
            )
            if loss == "down during the rotation":
                assert rotated.status_code == 503, rotated.text
            else:
                assert rotated.status_code == 201, rotated.text
            if loss == "a failover lost the entry":  # the replica had all but that write
                _forget_entry(private_redis)
                # Sound before the pass too: an edge started now reads the keys afresh,
                # and the control plane publishes no retired key.
                await gw.add_edge("late")
                status, answer = await gw.complete(unused, BODY, edge="late")
                assert (status, answer["error"]["code"]) == (401, "invalid_token"), answer
            else:
                await _back_empty(gw, private_redis)

            await _everyones_pass(gw, deps_b)
            thief = await b.post(
                "/v1/chat/init", json=BODY, headers={"Authorization": f"Bearer {leaked}"}
            )
            tail = await events(stream)
        assert tail[-1].event == "error", [e.event for e in tail]
        assert orjson.loads(tail[-1].data)["code"] == "revoked"
        assert leaked_kid in await gw.store.bounded_members(RETIRED_SIGNING_KEYS)
        assert await me(b, leaked) == 401
        assert thief.status_code == 401, thief.text
        status, answer = await gw.complete(unused, BODY)
        assert status == 401, answer
        # Kept until the last token the key signed has expired (the rotation's life).
        score = _score(private_redis, leaked_kid)
        assert score is not None
        assert abs(score - (time.time() + max_token_life(gw.cp.state.deps.settings))) < 60
        # The sibling signs with the new key.
        fresh = await gw.new_user()
        minted = await b.post(
            "/v1/chat/init", json=BODY, headers={"Authorization": f"Bearer {fresh}"}
        )
        assert minted.status_code == 201, minted.text
        assert kid_of(minted.json()["data"]["stream_token"]) != leaked_kid


async def test_only_keys_whose_tokens_may_live_on_are_published_again(
    gw: Gateway, private_redis: PrivateRedis
) -> None:
    """Each key is told until the longest token life after it was retired, however
    long ago it was superseded (a leaked key signs any `exp`:
    `test_a_leaked_key_superseded_long_ago_is_refused_at_once`); a key retired longer
    ago than that is not told again by a pass after the store lost the set. A member
    with less life left does not cut the set's (`_BOUNDED_ADD`)."""
    deps = gw.cp.state.deps
    life = max_token_life(deps.settings)
    first = deps.keyring.active()[0]
    older, leaked_kid = [await _rotated(gw) for _ in range(2)]
    # `first` made long ago, `older` superseded it longer ago than a token lives, and
    # the leaked key superseded `older` 1000 s ago.
    ages = {first: life + 60, older: life + 30, leaked_kid: 1000}

    await _made_long_ago(gw, ages)
    rotated = await gw.admin("POST", "/v1/admin/signing-keys/rotate", json={"retire_others": True})
    assert rotated.status_code == 201, rotated.text
    assert set(rotated.json()["data"]["retired"]) == {first, older, leaked_kid}
    told = {first, older, leaked_kid}
    assert set(await gw.store.bounded_members(RETIRED_SIGNING_KEYS)) == told

    def retired_long_ago(session: Session) -> None:
        row = session.get(SigningKey, first)
        assert row is not None and row.retired_at is not None
        row.retired_at -= timedelta(seconds=life + 1)

    await deps.db.transaction(retired_long_ago)
    await _back_empty(gw, private_redis)
    await _everyones_pass(gw)
    assert set(await gw.store.bounded_members(RETIRED_SIGNING_KEYS)) == {older, leaked_kid}
    now = time.time()
    assert _score(private_redis, first) is None
    for kid in (older, leaked_kid):
        score = _score(private_redis, kid)
        assert score is not None and abs(score - (now + life)) < 60, (kid, score, now + life)
    client = redis.Redis.from_url(private_redis.url)
    try:
        assert client.pttl(PREFIX + RETIRED_SIGNING_KEYS) > (life - 60) * 1000
    finally:
        client.close()


async def _made_long_ago(gw: Gateway, ages: dict[str, int]) -> None:
    """Each key of `ages` made that many seconds earlier than it was."""

    def made(session: Session) -> None:
        for kid, ago in ages.items():
            row = session.get(SigningKey, kid)
            assert row is not None
            row.created_at -= timedelta(seconds=ago)

    await gw.cp.state.deps.db.transaction(made)


async def _rotated(gw: Gateway) -> str:
    rotated = await gw.admin("POST", "/v1/admin/signing-keys/rotate")
    assert rotated.status_code == 201, rotated.text
    kid: str = rotated.json()["data"]["kid"]
    return kid


async def test_a_sibling_stops_trusting_a_key_retired_while_the_store_is_down(
    gw: Gateway, private_redis: PrivateRedis
) -> None:
    """The store is down when the platform admin rotates (503): a sibling cannot read
    the announcement, so it trusted and signed with the leaked key until its ring's
    next read, up to a minute, whatever the leaked key signed: measured before,
    `/v1/me` 200 on its access token after the sibling's once-a-second check. Now the
    check reads the database's record while the store cannot answer."""
    async with second_control_plane(gw) as (deps_b, b):
        leaked, _ = await _leaked_tokens(gw, 0)
        assert await me(b, leaked) == 200
        private_redis.stop()
        rotated = await gw.admin(
            "POST", "/v1/admin/signing-keys/rotate", json={"retire_others": True}
        )
        assert rotated.status_code == 503, rotated.text
        await check_retired_keys(deps_b)
        assert await me(b, leaked) == 401
        assert deps_b.keyring.active()[0] != kid_of(leaked)  # it signs with the new key


async def test_a_sibling_stops_trusting_a_key_retired_while_the_store_is_silent(
    gw: Gateway, private_redis: PrivateRedis
) -> None:
    """The store stops answering (a partition, a frozen or failing-over Redis) as the
    platform admin rotates: the rotation commits, then waits on the store. A sibling's
    check waited on the store too, up to its 20 s reply timeout every pass, trusting
    the leaked key meanwhile (measured before: its check had not returned at this
    test's 10 s bound). Now the check waits on the store at most a second, then reads
    the database's record."""
    async with second_control_plane(gw) as (deps_b, b):
        leaked, _ = await _leaked_tokens(gw, 0)
        leaked_kid = kid_of(leaked)
        assert await me(b, leaked) == 200
        db = gw.cp.state.deps.db
        private_redis.freeze()
        try:
            rotation = asyncio.create_task(
                gw.admin("POST", "/v1/admin/signing-keys/rotate", json={"retire_others": True})
            )

            async def committed() -> bool:
                row = await db.transaction(lambda s: s.get(SigningKey, leaked_kid))
                return row is not None and row.retired_at is not None

            await eventually(committed, "the rotation commits (then waits on the store)")
            async with asyncio.timeout(10):  # a bound, not a timing assertion
                await check_retired_keys(deps_b)
            assert await me(b, leaked) == 401
        finally:
            private_redis.thaw()
        assert (await rotation).status_code == 201


async def test_a_leaked_key_superseded_long_ago_is_refused_at_once(gw: Gateway) -> None:
    """A key superseded longer ago than a token lives, but never retired since (a
    rotation without `retire_others` leaves it in the JWKS until the next one), leaks;
    the platform admin rotates with `retire_others`. Its honest tokens have all
    expired, but the thief signs new ones with any `exp`: the key must be told
    retired like any other. Measured before (it was not told): after everyone's pass,
    the sibling answered `/v1/me` 200 on the thief's access token and the edge, its
    JWKS cache holding the key, streamed the thief's stream token (200); the store's
    set held only the key that superseded it."""
    async with second_control_plane(gw) as (deps_b, b):
        deps = gw.cp.state.deps
        life = max_token_life(deps.settings)
        # Signed by the key about to leak (the thief's tokens, in effect).
        leaked, (unused,) = await _leaked_tokens(gw, 1)
        leaked_kid = kid_of(leaked)
        newer = await _rotated(gw)  # supersedes it; it stays in the JWKS
        ages = {leaked_kid: life + 60, newer: life + 30}
        await _made_long_ago(gw, ages)
        assert await me(b, leaked) == 200
        rotated = await gw.admin(
            "POST", "/v1/admin/signing-keys/rotate", json={"retire_others": True}
        )
        assert rotated.status_code == 201, rotated.text
        assert leaked_kid in rotated.json()["data"]["retired"]
        await _everyones_pass(gw, deps_b)
        assert leaked_kid in await gw.store.bounded_members(RETIRED_SIGNING_KEYS)
        assert await me(b, leaked) == 401
        status, answer = await gw.complete(unused, BODY)
        assert status == 401, answer
