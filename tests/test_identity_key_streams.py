"""A revoked API key takes the stream tokens it minted with it: the edge refuses
their first use and their resume, and ends the streams they run with ``revoked``;
the user's other credentials stream on."""

from __future__ import annotations

import json
from typing import Any

import httpx

from shared.sse import SSEDecoder
from tests.stack import InProcessStack


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

    decoder = SSEDecoder()
    events: list[Any] = []
    revoked_at = None
    with httpx.stream("GET", running["stream_url"], timeout=10) as r:
        assert r.status_code == 200
        for raw in r.iter_raw():
            events.extend(decoder.feed(raw))
            if revoked_at is None and sum(e.event == "chunk" for e in events) >= 5:
                answer = c.as_user(owner, "DELETE", f"/v1/admin/api-keys/{key_id}")
                assert answer.status_code == 204, answer.text
                revoked_at = len(events)
    assert revoked_at is not None
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
