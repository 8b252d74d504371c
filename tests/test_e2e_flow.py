"""The whole flow over real HTTP: login → init → stream → webhook → settled.

Runs once on SQLite + in-memory store and once on PostgreSQL + Redis (the `stack`
fixture). The stream is read by the official `openai` client and, on the EventSource
path, as raw SSE bytes.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import httpx
import openai
import orjson
import pytest

from shared.pricing import estimate_input_tokens
from shared.sse import SSEDecoder
from shared.webhooks import UsageEvent, iso_utc, sign
from tests.stack import InProcessStack, micro
from tests.token_claims import claims_of

MOCK_FAST_IN, MOCK_FAST_OUT = Decimal("1.0"), Decimal("2.0")  # credits per million tokens


def cost(input_tokens: int, output_tokens: int) -> int:
    return math.ceil(input_tokens * MOCK_FAST_IN + output_tokens * MOCK_FAST_OUT)


def test_openai_client_stream_is_billed_exactly(stack: InProcessStack) -> None:
    c = stack.client
    token = c.new_user(c.new_company("5"))
    before = c.credits(token)
    messages = [{"role": "user", "content": "Tell me about gateways. [[mock tokens=40]]"}]
    grant = c.init_ok(token, {"model": "mock-fast", "messages": messages, "max_tokens": 100})
    hold = cost(estimate_input_tokens(messages), 100)
    assert micro(grant["reserved_credits"]) == hold
    held = c.credits(token)
    assert micro(held["held"]) == hold
    assert micro(held["available"]) == micro(before["available"]) - hold

    client = c.openai(grant["stream_token"])
    chunks = list(
        client.chat.completions.create(
            model="mock-fast",
            messages=messages,  # type: ignore[arg-type]
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == 40
    assert len(text.split()) == 40
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "stop"

    record = c.wait_usage(token, grant["reservation_id"])
    expected = cost(usage.prompt_tokens, usage.completion_tokens)
    assert record["status"] == "completed"
    assert record["usage_source"] == "upstream"
    assert (record["input_tokens"], record["output_tokens"]) == (usage.prompt_tokens, 40)
    assert micro(record["cost"]) == expected
    after = c.credits(token)
    assert micro(after["balance"]) == micro(before["balance"]) - expected
    assert micro(after["held"]) == 0
    assert micro(after["available"]) == micro(after["balance"])


def test_non_streaming_completion(stack: InProcessStack) -> None:
    c = stack.client
    token = c.new_user(c.new_company("5"))
    messages = [{"role": "user", "content": "Short answer please [[mock tokens=7]]"}]
    grant = c.init_ok(token, {"messages": messages})
    client = c.openai(grant["stream_token"])
    answer = client.chat.completions.create(model="mock-fast", messages=messages)  # type: ignore[arg-type]
    assert answer.choices[0].message.content
    assert answer.usage is not None and answer.usage.completion_tokens == 7
    record = c.wait_usage(token, grant["reservation_id"])
    assert micro(record["cost"]) == cost(answer.usage.prompt_tokens, 7)


def read_events(response: httpx.Response) -> list[Any]:
    decoder = SSEDecoder()
    events = []
    for raw in response.iter_raw():
        events.extend(decoder.feed(raw))
    return events


def test_eventsource_stream_as_raw_sse(stack: InProcessStack) -> None:
    c = stack.client
    token = c.new_user(c.new_company("5"))
    grant = c.init_ok(token, {"query": "Stream me something [[mock tokens=12]]"})
    with c.http.stream(
        "GET", grant["stream_url"], headers={"Accept": "text/event-stream"}
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-cache"
        assert response.headers["x-accel-buffering"] == "no"
        assert "content-encoding" not in response.headers
        events = read_events(response)
    chunks = [e for e in events if e.event == "chunk"]
    assert len(chunks) == 12
    assert [e.id for e in events] == [str(i) for i in range(1, 14)]
    assert [orjson.loads(e.data)["index"] for e in chunks] == list(range(12))
    complete = orjson.loads(events[-1].data)
    assert events[-1].event == "complete"
    assert complete["done"] is True and complete["finish_reason"] == "stop"
    assert complete["usage"]["output_tokens"] == 12
    assert complete["session_id"] == grant["session_id"]

    # EventSource reconnects after the stream ends: 204 tells it to stop.
    again = c.http.get(grant["stream_url"], headers={"Last-Event-ID": "13"})
    assert again.status_code == 204

    record = c.wait_usage(token, grant["reservation_id"])
    assert record["output_tokens"] == 12
    assert micro(record["cost"]) == cost(complete["usage"]["input_tokens"], 12)


def test_insufficient_credits_is_402(stack: InProcessStack) -> None:
    c = stack.client
    token = c.new_user(c.new_company("0.000010"))
    response = c.init(token, {"model": "mock-fast", "query": "hello"})
    assert response.status_code == 402
    body = response.json()
    assert body["success"] is False and body["error"]["code"] == "insufficient_credits"
    assert micro(c.credits(token)["held"]) == 0


def test_unknown_model_is_404(stack: InProcessStack) -> None:
    c = stack.client
    token = c.new_user(c.new_company("5"))
    response = c.init(token, {"model": "no-such-model", "query": "hello"})
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"


def test_webhook_duplicates_charge_once_and_bad_signature_is_401(stack: InProcessStack) -> None:
    c = stack.client
    token = c.new_user(c.new_company("5"))
    before = c.credits(token)
    grant = c.init_ok(token, {"query": "never streamed", "max_tokens": 50})
    claims = claims_of(grant["stream_token"])
    now = iso_utc(datetime.now(UTC))
    event = UsageEvent(
        jti=claims["jti"], reservation_id=grant["reservation_id"], company_id=claims["company_id"],
        user_id=claims["sub"], session_id=claims["session_id"], request_id=claims["request_id"],
        model="mock-fast", provider="mock", status="completed", finish_reason="stop",
        input_tokens=10, output_tokens=20, usage_source="upstream",
        started_at=now, first_token_at=now, ended_at=now,
    )  # fmt: skip
    body = event.body()
    url = f"{c.cp_url}/v1/webhooks/usage"

    forged = sign("whsec_" + "A" * 43 + "=", event.webhook_id, body)
    assert c.http.post(url, content=body, headers=forged).status_code == 401
    tampered = sign(c.webhook_secret, event.webhook_id, body)
    assert c.http.post(url, content=body.replace(b'"output_tokens":20', b'"output_tokens":2'),
                       headers=tampered).status_code == 401  # fmt: skip
    assert micro(c.credits(token)["held"]) > 0  # nothing changed

    for _ in range(3):
        response = c.http.post(
            url, content=body, headers=sign(c.webhook_secret, event.webhook_id, body)
        )
        assert response.status_code == 200, response.text
    # A second, different webhook id for the same reservation must not charge again.
    other = sign(c.webhook_secret, "usage_other", body)
    assert c.http.post(url, content=body, headers=other).status_code == 200

    after = c.credits(token)
    assert micro(after["balance"]) == micro(before["balance"]) - cost(10, 20)
    assert micro(after["held"]) == 0
    usage = c.as_user(token, "GET", "/v1/usage").json()["data"]["items"]
    assert [u["reservation_id"] for u in usage].count(grant["reservation_id"]) == 1


@pytest.mark.parametrize("path", ["completions", "stream"])
def test_token_is_single_use(stack: InProcessStack, path: str) -> None:
    c = stack.client
    token = c.new_user(c.new_company("5"))
    grant = c.init_ok(token, {"query": "once [[mock tokens=3]]"})
    messages = [{"role": "user", "content": "once [[mock tokens=3]]"}]
    client = c.openai(grant["stream_token"], max_retries=0)
    if path == "completions":
        client.chat.completions.create(model="mock-fast", messages=messages)  # type: ignore[arg-type]
    else:
        with c.http.stream("GET", grant["stream_url"]) as response:
            read_events(response)
    requests_before = c.mock_stats()["requests"]
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model="mock-fast", messages=messages)  # type: ignore[arg-type]
    assert c.mock_stats()["requests"] == requests_before
    c.wait_usage(token, grant["reservation_id"])


def test_edge_rejects_access_tokens_and_garbage(stack: InProcessStack) -> None:
    c = stack.client
    access = c.new_user(c.new_company("5"))
    before = c.mock_stats()["requests"]
    for headers in ({"Authorization": f"Bearer {access}"}, {"Authorization": "Bearer x.y"}, {}):
        response = c.http.post(
            f"{c.edge_url}/v1/chat/completions",
            headers=headers,
            json={"messages": [{"role": "user", "content": "hi"}]},
        )
        assert response.status_code == 401, response.text
        assert set(response.json()["error"]) == {"message", "type", "code"}
    assert c.mock_stats()["requests"] == before
