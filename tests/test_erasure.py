"""What a deletion leaves behind: a deleted chat session's streams, the stream URLs
that could replay them and the requests stashed for its turns not yet started, on
the real gateway (PostgreSQL + Redis)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import redis

from shared.sse import ServerSentEvent, SSEDecoder
from shared.stash import stash_key
from shared.store_memory import MemoryStore
from tests.conftest import REDIS_URL
from tests.midstream import events_acting_midway
from tests.session_races import turn_and_delete_queued
from tests.stack import Client, InProcessStack, base_env, postgres_env
from tests.test_control_plane import CP, data_of
from tests.test_identity_owners import pg_cp

__all__ = ["pg_cp"]


@pytest.fixture(scope="module")
def stack(pg_server: str) -> Iterator[InProcessStack]:
    # A resume grace long enough that the test's steps all fall within it.
    with (
        postgres_env(pg_server) as env,
        InProcessStack({**env, "LLMGW_RESUME_GRACE_SECONDS": "30"}) as running,
    ):
        yield running


def _jti(grant: dict[str, Any]) -> str:
    jti: str = jwt.decode(grant["stream_token"], options={"verify_signature": False})["jti"]
    return jti


def _events(response: httpx.Response) -> list[ServerSentEvent]:
    decoder = SSEDecoder()
    return [event for raw in response.iter_raw() for event in decoder.feed(raw)]


def finished_turn(c: Client) -> tuple[str, str, str, dict[str, Any]]:
    """A new company, its owner and a member, and the member's turn in a new chat
    session streamed to its end and settled: (company, owner, member, turn's grant)."""
    company_id = c.new_company("5")
    owner = c.new_user(company_id, role="owner")
    member = c.new_user(company_id)
    finished = c.init_ok(member, {"query": "a secret [[mock tokens=5]]"})
    with c.http.stream("GET", finished["stream_url"]) as r:
        assert _events(r)[-1].event == "complete"
    c.wait_usage(member, finished["reservation_id"])
    return company_id, owner, member, finished


def test_a_deleted_sessions_streams_end_and_nothing_replays_or_starts_them(
    stack: InProcessStack,
) -> None:
    """Attack: an owner deletes a member's chat session (what it held must go), while
    the member's next turn streams, another turn's token waits unused, and the turn
    before has just ended. Before the fix the deletion touched none of them: the
    running stream went on to its end (400 of 400 chunks), its URL and the finished
    turn's URL replayed their answers with `Last-Event-ID` (200) within the resume
    grace, and the unused token still started its stream (200) from the request
    stashed at init, the deleted session's history with it, kept in Redis
    (`req:<jti>`) for the token's life plus 10 minutes."""
    c = stack.client
    company_id, owner, member, finished = finished_turn(c)
    session_id = finished["session_id"]
    turn = {"query": "long [[mock tokens=400 delay_ms=25]]", "session_id": session_id}
    running = c.init_ok(member, turn)
    unused = c.init_ok(member, {"query": "later", "session_id": session_id})
    kept = c.init_ok(member, {"query": "another chat [[mock tokens=5]]"})
    store = redis.Redis.from_url(REDIS_URL)
    stashed = stack.settings.redis_prefix + stash_key(company_id, _jti(unused))
    try:
        assert store.exists(stashed)

        def delete_the_session() -> None:
            answer = c.as_user(owner, "DELETE", f"/v1/sessions/{session_id}")
            assert answer.status_code == 204, answer.text

        events, deleted_at = events_acting_midway(running["stream_url"], delete_the_session)
        chunks = sum(e.event == "chunk" for e in events)
        assert events[-1].event == "error", f"ran on to its end: {chunks} chunks"
        assert json.loads(events[-1].data)["code"] == "revoked"
        assert len(events) - deleted_at < 200  # ended at the edge's next check
        assert c.wait_usage(owner, running["reservation_id"])["status"] == "revoked"
        for grant in (running, finished):
            resumed = c.http.get(grant["stream_url"], headers={"Last-Event-ID": "1"})
            assert resumed.status_code == 401, resumed.text
        started = c.http.get(unused["stream_url"])
        assert started.status_code == 401, started.text
        assert started.json()["error"]["code"] == "revoked"
        assert not store.exists(stashed), "the deleted session's request is still stashed"
    finally:
        store.close()
    # Settling the ended stream put nothing back, and the session stays gone.
    assert c.as_user(member, "GET", f"/v1/sessions/{session_id}").status_code == 404
    assert c.init(member, {"query": "again", "session_id": session_id}).status_code == 404
    # The member's other chat streams on.
    with c.http.stream("GET", kept["stream_url"]) as r:
        assert _events(r)[-1].event == "complete"


def test_a_turn_racing_the_sessions_deletion_holds_nothing_and_mints_no_token(
    pg_cp: CP,
) -> None:
    """Attack: an owner deletes a chat session while the next turn of it is being
    initialised (a member's tab still sending to it). When the delete took the
    session's row first, the turn's append then found the session gone and init
    went on regardless (measured: 201, a hold and a stream token for the deleted
    session, whose history it had read and stashed for the edge to send; the
    session itself 404).

    The test holds the session's row until the delete, then the turn, wait on it:
    PostgreSQL lets the delete go first."""
    client, _ = pg_cp.owner_client("10")
    session_id = data_of(client.post("/v1/chat/init", json={"query": "hi"}), 201)["session_id"]
    held_before = data_of(client.get("/v1/me"))["credits"]["held"]
    turned, deleted = turn_and_delete_queued(pg_cp, client, session_id, turn_first=False)
    answers = [deleted, turned]
    assert answers[0].status_code == 204, answers[0].text
    assert answers[1].status_code == 404, answers[1].text
    assert answers[1].json()["error"]["code"] == "session_not_found"
    assert data_of(client.get("/v1/me"))["credits"]["held"] == held_before
    assert client.get(f"/v1/sessions/{session_id}").status_code == 404


class RevocationsRefused(MemoryStore):
    """A memory store that can be made to refuse revocations (a store refusing
    writes), every other command still working."""

    refuse = False

    async def set(self, key: str, value: bytes, ttl_seconds: float) -> None:
        if self.refuse and key.startswith("revoked:"):
            raise ConnectionError("the store refused the write")
        await super().set(key, value, ttl_seconds)


def test_a_deletion_the_edges_cannot_be_told_of_deletes_nothing_and_can_be_retried(
    tmp_path: Path,
) -> None:
    """The deletion tells the edges first: with the store refusing, it is 503 and the
    session is left whole, so the retry (204 once the store is back) still finds
    the streams to end. Deleted first, the retry would be 404 and the streams left
    running."""
    store = RevocationsRefused()
    with InProcessStack(base_env(f"sqlite:///{tmp_path}/gw.db"), store=store) as running:
        c = running.client
        company_id = c.new_company("5")
        owner = c.new_user(company_id, role="owner")
        member = c.new_user(company_id)
        turn = c.init_ok(member, {"query": "hi [[mock tokens=3]]"})
        path = f"/v1/sessions/{turn['session_id']}"
        store.refuse = True
        refused = c.as_user(owner, "DELETE", path)
        assert refused.status_code == 503, refused.text
        assert c.as_user(member, "GET", path).status_code == 200
        store.refuse = False
        assert c.as_user(owner, "DELETE", path).status_code == 204
        assert c.as_user(member, "GET", path).status_code == 404
        started = c.http.get(turn["stream_url"])
        assert started.status_code == 401, started.text
