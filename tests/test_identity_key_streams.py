"""A revoked API key takes the stream tokens it minted with it: the edge refuses
their first use and their resume, and ends the streams they run with ``revoked``;
the user's other credentials stream on."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import psycopg
import pytest

from shared.sse import SSEDecoder
from tests.midstream import events_acting_midway
from tests.polling import wait_until
from tests.stack import InProcessStack, postgres_env
from tests.test_identity_owners import _lock_waiters


def _api_key(stack: InProcessStack, access: str) -> tuple[str, str]:
    me = stack.client.as_user(access, "GET", "/v1/me").json()["data"]["user"]
    made = stack.client.admin("POST", "/v1/admin/api-keys", json={"user_id": me["id"]})
    assert made.status_code == 201, made.text
    return made.json()["data"]["id"], made.json()["data"]["key"]


def test_a_revoked_api_keys_stream_tokens_stop_streaming(stack: InProcessStack) -> None:
    """Attack: a member's API key leaks; whoever holds it mints stream tokens (up
    to the pending-init cap, each valid for the token's life) and starts a long
    stream. The owner revokes the key: before the fix every stream token it had
    minted still started a stream (200), the running one went on to its end and its
    URL still resumed, so the thief kept streaming on the company's credits for
    the tokens' life and the streams' after the key was dead."""
    c = stack.client
    company_id = c.new_company("5")
    owner = c.new_user(company_id, role="owner")
    member = c.new_user(company_id)
    key_id, key = _api_key(stack, member)
    running = c.init_ok(key, {"query": "long [[mock tokens=1000 delay_ms=30]]"})
    unused = c.init_ok(key, {"query": "later"})
    kept = c.init_ok(member, {"query": "the member's own sign-in"})

    def revoke_the_key() -> None:
        answer = c.as_user(owner, "DELETE", f"/v1/admin/api-keys/{key_id}")
        assert answer.status_code == 204, answer.text

    events, revoked_at = events_acting_midway(running["stream_url"], revoke_the_key)
    assert events[-1].event == "error" and json.loads(events[-1].data)["code"] == "revoked"
    assert len(events) - revoked_at < 200  # ended at the next check, not after 1000
    assert c.wait_usage(owner, running["reservation_id"])["status"] == "revoked"
    # Its URL resumes nothing either.
    resumed = c.http.get(running["stream_url"], headers={"Last-Event-ID": "1"})
    assert resumed.status_code == 401, resumed.text

    refused = c.http.get(unused["stream_url"])
    assert refused.status_code == 401, refused.text
    assert refused.json()["error"]["code"] == "revoked"
    # The key itself is refused at the control plane, as before.
    assert c.init(key, {"query": "again"}).status_code in (401, 403)

    decoder = SSEDecoder()
    with httpx.stream("GET", kept["stream_url"], timeout=10) as r:
        assert r.status_code == 200
        tail = [e for raw in r.iter_raw() for e in decoder.feed(raw)]
    assert tail[-1].event == "complete"


@pytest.fixture(scope="module")
def pg_stack(pg_server: str) -> Iterator[InProcessStack]:
    with postgres_env(pg_server) as env, InProcessStack(env) as running:
        yield running


def test_a_token_minted_as_its_key_is_revoked_is_refused_too(pg_stack: InProcessStack) -> None:
    """Attack: the thief of a leaked key keeps inits in flight while the owner
    revokes it (each waits its turn on the company's row, as a burst of them does).
    An init authenticated before the revocation committed, whose hold committed
    after the revocation looked for the key's open holds, was in none of them: its
    token was minted, not revoked at the edges, and streamed (measured: 201, then
    200 and a whole answer on the company's credits, after the 204). Now every token
    a key mints names the key as its parent, and the revocation revokes that parent
    at the edges: whatever the order, the token is refused."""
    c = pg_stack.client
    company_id = c.new_company("5")
    owner = c.new_user(company_id, role="owner")
    member = c.new_user(company_id)
    key_id, key = _api_key(pg_stack, member)
    url = pg_stack.settings.database_url.replace("postgresql+psycopg://", "postgresql://", 1)
    with (
        ThreadPoolExecutor(1) as pool,
        psycopg.connect(url) as locker,
        psycopg.connect(url, autocommit=True) as watcher,
    ):
        # The row init's hold updates; FOR NO KEY UPDATE leaves the revocation's
        # audit row (a foreign key to it) free to commit meanwhile.
        locker.execute("SELECT id FROM companies WHERE id = %s FOR NO KEY UPDATE", (company_id,))
        init = pool.submit(c.init, key, {"query": "minted as the key dies"})
        wait_until(lambda: _lock_waiters(watcher) == 1, "the init never waited on the company")
        revoked = c.as_user(owner, "DELETE", f"/v1/admin/api-keys/{key_id}")
        assert revoked.status_code == 204, revoked.text
        locker.rollback()
        minted = init.result()
    if minted.status_code != 201:  # refused outright: nothing to stream either way
        assert minted.status_code in (401, 403), minted.text
        return
    refused = c.http.get(minted.json()["data"]["stream_url"])
    assert refused.status_code == 401, refused.text
    assert refused.json()["error"]["code"] == "revoked"
