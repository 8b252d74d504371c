"""A revocation the edges never heard of: the database records it, the store's key
that tells the edges is lost (the write failed while Redis was down and nobody
retried the 503; or Redis failed over to a replica that never got it). The control
plane republishes, every few seconds, the keys of the revocations still in force
(`control_plane.revocation_republish`), so the edges learn of it once the store is
back; a lifted revocation is never brought back."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import httpx
import pytest
import redis

from control_plane.db import Database
from control_plane.revocation_republish import publish, standing
from control_plane.revoking import revocation_ttl
from control_plane.tables import utcnow
from shared.revocations import revocation_key
from shared.sse import SSEDecoder
from shared.stash import stash_key
from shared.store_factory import open_store
from tests.conftest import REDIS_URL, fresh_pg_database
from tests.polling import wait_until
from tests.private_redis import PrivateRedis, private_redis
from tests.stack import InProcessStack, base_env
from tests.test_erasure import finished_turn
from tests.token_claims import jti_of

__all__ = ["private_redis"]  # the fixture, used by name

PREFIX = "rv:"


@pytest.fixture
def stack(pg_server: str, private_redis: PrivateRedis) -> Iterator[InProcessStack]:
    with fresh_pg_database(pg_server, migrated=True) as url:
        with InProcessStack(base_env(url, private_redis.url, PREFIX)) as running:
            yield running


def _blip(server: PrivateRedis) -> None:
    """Redis goes down with what it holds saved; `start` brings that back (a blip of
    a persisted Redis, or a replica promoted with what it had)."""
    client = redis.Redis.from_url(server.url)
    try:
        client.save()
    finally:
        client.close()
    server.stop()


def _api_key(c: Any, access: str) -> tuple[str, str]:
    me = c.as_user(access, "GET", "/v1/me").json()["data"]["user"]
    made = c.admin("POST", "/v1/admin/api-keys", json={"user_id": me["id"]})
    assert made.status_code == 201, made.text
    return made.json()["data"]["id"], made.json()["data"]["key"]


def test_an_api_key_revoked_while_the_store_was_down_ends_its_streams_once_it_is_back(
    stack: InProcessStack, private_redis: PrivateRedis
) -> None:
    """Attack: a key leaks; the owner revokes it during a Redis blip, gets 503
    ("recorded but the edges could not be told; retry") and does not retry. Before
    the fix the key's running stream relayed to its end and its unused stream token
    streamed once Redis was back, for up to the token's life (15 min by default)."""
    c = stack.client
    company_id = c.new_company("5")
    owner = c.new_user(company_id, role="owner")
    member = c.new_user(company_id)
    key_id, key = _api_key(c, member)
    running = c.init_ok(key, {"query": "long [[mock tokens=600 delay_ms=50]]"})
    unused = c.init_ok(key, {"query": "later"})

    decoder = SSEDecoder()
    events: list[Any] = []
    revoked = False
    with httpx.stream("GET", running["stream_url"], timeout=60) as r:
        assert r.status_code == 200
        for raw in r.iter_raw():
            events.extend(decoder.feed(raw))
            if not revoked and sum(e.event == "chunk" for e in events) >= 5:
                _blip(private_redis)
                answer = c.as_user(owner, "DELETE", f"/v1/admin/api-keys/{key_id}")
                assert answer.status_code == 503, answer.text
                private_redis.start()  # back, without the key
                revoked = True
    assert revoked
    assert events[-1].event == "error", events[-1]
    assert json.loads(events[-1].data)["code"] == "revoked"
    refused = c.http.get(unused["stream_url"])
    assert refused.status_code == 401, refused.text
    assert refused.json()["error"]["code"] == "revoked"


def test_a_user_revoked_and_a_session_signed_out_while_the_store_was_down_stream_no_more(
    stack: InProcessStack, private_redis: PrivateRedis
) -> None:
    """The same for an admin's revocation of a user (the database refuses the user's
    new inits, not the stream tokens it minted already) and a user's sign-out (its
    laptop's stream tokens). Before the fix both keys never came back and both
    tokens streamed."""
    c = stack.client
    company_id = c.new_company("5")
    revoked_user = c.new_user(company_id)
    signed_out = c.new_user(company_id)
    minted = c.init_ok(revoked_user, {"query": "minted before the revocation"})
    laptop = c.init_ok(signed_out, {"query": "minted before the sign-out"})
    user_id = c.as_user(revoked_user, "GET", "/v1/me").json()["data"]["user"]["id"]

    _blip(private_redis)
    answer = c.admin("POST", "/v1/admin/revocations", json={"user_id": user_id})
    assert answer.status_code == 503, answer.text
    answer = c.as_user(signed_out, "POST", "/v1/auth/logout")
    assert answer.status_code == 503, answer.text
    private_redis.start()

    keys = [
        revocation_key("user", user_id, company_id),
        revocation_key("jti", jti_of(signed_out), company_id),
    ]
    # The tokens are not tried before (a try would use them): the keys are awaited.
    wait_until(lambda: _present(private_redis, keys), "the revocations were not republished")
    for grant in (minted, laptop):
        refused = c.http.get(grant["stream_url"])
        assert refused.status_code == 401, refused.text
        assert refused.json()["error"]["code"] == "revoked"


def _present(server: PrivateRedis, keys: list[str]) -> bool:
    client = redis.Redis.from_url(server.url)
    try:
        return bool(client.exists(*[PREFIX + k for k in keys]) == len(keys))
    finally:
        client.close()


@pytest.fixture
def shared_stack(pg_server: str, redis_prefix: str) -> Iterator[InProcessStack]:
    with fresh_pg_database(pg_server, migrated=True) as url:
        with InProcessStack(base_env(url, REDIS_URL, redis_prefix)) as running:
            yield running


def test_a_lift_committed_after_a_pass_read_wins_over_its_write(
    shared_stack: InProcessStack, redis_prefix: str
) -> None:
    """Race: a pass reads a revocation in force, the admin lifts it (commit, then the
    store's key deleted), and only then does the pass write the key again. Without
    the pass's second look the lifted user's new stream tokens were refused
    `revoked` for the whole TTL (16 min by default) though the user was re-enabled.
    With another revocation of the same user still in force, the key stays."""
    c = shared_stack.client
    settings = shared_stack.settings
    company_id = c.new_company("5")
    alone = c.new_user(company_id)
    twice = c.new_user(company_id)
    ids = {
        name: c.as_user(token, "GET", "/v1/me").json()["data"]["user"]["id"]
        for name, token in (("alone", alone), ("twice", twice))
    }
    made = {}
    for name in ("alone", "twice", "twice-again"):
        user_id = ids[name.removesuffix("-again")]
        answer = c.admin("POST", "/v1/admin/revocations", json={"user_id": user_id})
        assert answer.status_code == 201, answer.text
        made[name] = answer.json()["data"]["id"]
    ttl = revocation_ttl(settings)

    async def race() -> dict[str, bytes | None]:
        db = Database(settings.database_url)
        store = open_store(REDIS_URL, prefix=redis_prefix)
        try:
            read = await db.transaction(lambda s: standing(s, utcnow(), ttl))
            assert {k.value for k in read} >= set(ids.values())
            for name in ("alone", "twice"):  # committed after the read
                lifted = c.admin("DELETE", f"/v1/admin/revocations/{made[name]}")
                assert lifted.status_code == 204, lifted.text
            await publish(db, store, ttl, read)
            return {
                name: await store.get(revocation_key("user", user_id, company_id))
                for name, user_id in ids.items()
            }
        finally:
            await store.close()
            await asyncio.to_thread(db.close)

    keys = asyncio.run(race())
    assert keys == {"alone": None, "twice": b"1"}
    # The lifted user streams again; the other is still refused.
    grant = c.init_ok(alone, {"query": "lifted"})
    assert c.http.get(grant["stream_url"]).status_code == 200
    assert c.init(twice, {"query": "still revoked"}).status_code == 403


def test_a_pass_on_a_clock_running_ahead_never_shortens_a_standing_key(
    shared_stack: InProcessStack, redis_prefix: str
) -> None:
    """A control-plane host whose clock runs ahead (no time sync, a VM resumed from a
    pause) republishes: each key's life left is read on its clock from the row's
    `created_at` (another host's clock), and a plain SET rewrote the standing key's
    TTL with it. 600 s ahead, the revoked user's key lost 600 s of the TTL the
    revocation gave it (token life + longest stream + only 60 s of margin), so a
    stream token minted before the revocation relayed on after the key expired.
    A republish only brings back a key the store lost; one still standing keeps the
    life its revocation gave it."""
    c = shared_stack.client
    settings = shared_stack.settings
    company_id = c.new_company("5")
    member = c.new_user(company_id)
    user_id = c.as_user(member, "GET", "/v1/me").json()["data"]["user"]["id"]
    answer = c.admin("POST", "/v1/admin/revocations", json={"user_id": user_id})
    assert answer.status_code == 201, answer.text
    ttl = revocation_ttl(settings)
    name = redis_prefix + revocation_key("user", user_id, company_id)
    client = redis.Redis.from_url(REDIS_URL)
    ahead = 600

    async def skewed_pass() -> None:
        db = Database(settings.database_url)
        store = open_store(REDIS_URL, prefix=redis_prefix)
        try:
            now = utcnow() + timedelta(seconds=ahead)
            read = await db.transaction(lambda s: standing(s, now, ttl))
            assert user_id in {k.value for k in read}
            await publish(db, store, ttl, read)
        finally:
            await store.close()
            await asyncio.to_thread(db.close)

    try:
        before = client.pttl(name)
        assert before > (ttl - ahead) * 1000, before  # as the revocation route set it
        asyncio.run(skewed_pass())
        after = client.pttl(name)
        # Not a timing bound: the pass takes nowhere near half the skew.
        assert after > before - ahead * 1000 // 2, (before, after)
    finally:
        client.close()


@pytest.fixture
def grace_stack(pg_server: str, redis_prefix: str) -> Iterator[InProcessStack]:
    # A resume grace long enough that the test's steps all fall within it.
    env = {**base_env("", REDIS_URL, redis_prefix), "LLMGW_RESUME_GRACE_SECONDS": "60"}
    with fresh_pg_database(pg_server, migrated=True) as url:
        with InProcessStack({**env, "LLMGW_DATABASE_URL": url}) as running:
            yield running


def test_a_deleted_sessions_stream_tokens_stay_refused_after_the_store_lost_their_keys(
    grace_stack: InProcessStack, redis_prefix: str
) -> None:
    """Attack: a member's chat session is deleted (its owner erases it), then Redis
    fails over to a replica that had the session's init writes but not the
    deletion's (the `jti` revocations, the stash's removal). The only record of
    those revocations was the store's key: before the fix the finished turn's URL
    replayed the deleted answer with `Last-Event-ID` and the unused token streamed
    the deleted history to the backend; no pass ever brought the keys back. Once the
    pass did, the stash the replica kept (the deleted history) stayed in Redis for
    the token's life plus 10 minutes."""
    c = grace_stack.client
    company_id, owner, member, finished = finished_turn(c)
    session_id = finished["session_id"]
    unused = c.init_ok(member, {"query": "later [[mock tokens=5]]", "session_id": session_id})
    client = redis.Redis.from_url(REDIS_URL)
    stashed = redis_prefix + stash_key(company_id, jti_of(unused["stream_token"]))
    try:
        stash = client.dump(stashed)
        assert isinstance(stash, bytes)
        answer = c.as_user(owner, "DELETE", f"/v1/sessions/{session_id}")
        assert answer.status_code == 204, answer.text
        keys = [
            revocation_key("jti", jti_of(grant["stream_token"]), company_id)
            for grant in (finished, unused)
        ]
        # The failover: the replica promoted has the stash, not the deletion's keys.
        client.delete(*[redis_prefix + k for k in keys])
        client.restore(stashed, 600_000, stash)
    finally:
        client.close()
    wait_until(lambda: _prefixed(redis_prefix, keys), "the revocations were not republished")
    # The deleted history leaves the store again with them (deleted just after).
    wait_until(
        lambda: not _prefixed("", [stashed]), "the deleted session's request is still stashed"
    )
    resumed = c.http.get(finished["stream_url"], headers={"Last-Event-ID": "1"})
    assert resumed.status_code == 401, resumed.text
    assert resumed.json()["error"]["code"] == "revoked"
    started = c.http.get(unused["stream_url"])
    assert started.status_code == 401, started.text
    assert started.json()["error"]["code"] == "revoked"


def _prefixed(prefix: str, keys: list[str]) -> bool:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        return bool(client.exists(*[prefix + k for k in keys]) == len(keys))
    finally:
        client.close()


def test_lifting_an_admins_revocation_of_a_deleted_sessions_token_keeps_it_refused(
    grace_stack: InProcessStack,
) -> None:
    """Attack: an owner revokes a member's finished turn (`POST /v1/admin/revocations
    {"jti"}`), the session is then deleted, and the owner lifts its revocation. The
    lift withdrew the edges' key unless another revocation row was in force, though
    the deletion's (``reservations.revoked_at``) was: the deleted answer's URL
    replayed again until the next republishing pass put the key back (up to 5 s),
    and a silent stream's stalled edge relayed on, unbilled, as long."""
    c = grace_stack.client
    _, owner, _, finished = finished_turn(c)
    jti = jti_of(finished["stream_token"])
    revoked = c.as_user(owner, "POST", "/v1/admin/revocations", json={"jti": jti})
    assert revoked.status_code == 201, revoked.text
    deleted = c.as_user(owner, "DELETE", f"/v1/sessions/{finished['session_id']}")
    assert deleted.status_code == 204, deleted.text
    lifted = c.as_user(owner, "DELETE", f"/v1/admin/revocations/{revoked.json()['data']['id']}")
    assert lifted.status_code == 204, lifted.text
    resumed = c.http.get(finished["stream_url"], headers={"Last-Event-ID": "1"})
    assert resumed.status_code == 401, resumed.text[:200]
    assert resumed.json()["error"]["code"] == "revoked"
