"""DESIGN §3-§11 read as an outside suite reads it: statements no other test checked
through HTTP, each driven against the real services.

- §9 "Lists paginate with ?limit= (default 50, max 200) and ?cursor=<next_cursor>":
  the company listings of §11 (budgets, teams, agents, providers, `/v1/agents`).
- §9 "The edge's errors use OpenAI's shape", for a method the edge does not serve.
- §7/§9 the usage webhook the edge really sends: `type` = ``stream.`` + status,
  ISO 8601 UTC timestamps, `content` on by default, the §11 token counts, and
  `webhook-id` = ``usage_<jti>``.
- §5/§9 `X-Request-Id` echoed by both services on successes, errors, 404s and 204s;
  the envelope on control-plane `/v1/` errors; bare JWKS/OpenAPI; health shapes.
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest

from control_plane.pagination import encode_cursor, encode_key_cursor
from control_plane.settings import ControlPlaneSettings
from shared.settings import ConfigError
from shared.sse import SSEDecoder
from tests.conftest import new_webhook_secret
from tests.fallback_stack import FallbackStack
from tests.harness import ServerGroup, free_port
from tests.stack import ROOT, InProcessStack, base_env
from tests.token_claims import claims_of

ISO_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z$")
Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class WebhookTap:
    """An ASGI wrapper around the control plane that keeps a copy of every usage
    webhook the edge posts (headers and body) and passes it on unchanged."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.seen: list[tuple[dict[str, str], bytes]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != "/v1/webhooks/usage":
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        more = True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        self.seen.append((headers, body))
        sent = False

        async def replay() -> MutableMapping[str, Any]:
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


def _swap(group: ServerGroup, old: Any, new: Any) -> None:
    """Serve `new` where the running server serves `old` (uvicorn wraps the app in
    its own middleware: the wrapper's `app` is replaced)."""
    for server in group._servers:
        holder: Any = server.config
        attr = "loaded_app"
        for _ in range(5):
            inner = getattr(holder, attr, None)
            if inner is old:
                setattr(holder, attr, new)
                return
            holder, attr = inner, "app"
    raise AssertionError("the control plane's server was not found")


@contextlib.contextmanager
def webhook_tap(group: ServerGroup, control_plane: Any) -> Iterator[WebhookTap]:
    tap = WebhookTap(control_plane)
    _swap(group, control_plane, tap)
    try:
        yield tap
    finally:
        _swap(group, tap, control_plane)


def _sent_for(tap: WebhookTap, reservation_id: str) -> list[tuple[dict[str, str], Any]]:
    return [
        (headers, event)
        for headers, event in ((h, orjson.loads(b)) for h, b in tap.seen)
        if event["data"].get("reservation_id") == reservation_id
    ]


def data_of(response: httpx.Response, status: int = 200) -> Any:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["success"] is True and "meta" in body, body
    return body["data"]


# --- §9 pagination on the §11 company listings ------------------------------------------


def _owner(stack: InProcessStack) -> tuple[str, str]:
    c = stack.client
    company_id = c.new_company("10")
    return company_id, c.new_user(company_id, "owner")


def _walk(stack: InProcessStack, token: str, path: str, limit: int) -> list[list[Any]]:
    pages: list[list[Any]] = []
    cursor: str | None = None
    for _ in range(50):
        params: dict[str, Any] = {"limit": limit}
        if cursor:
            params["cursor"] = cursor
        doc = data_of(stack.client.as_user(token, "GET", path, params=params))
        assert set(doc) == {"items", "next_cursor"}, doc
        pages.append(doc["items"])
        cursor = doc["next_cursor"]
        if cursor is None:
            return pages
    raise AssertionError(f"{path}: the walk did not end")


def _made(stack: InProcessStack, company_id: str, token: str, what: str, n: int) -> set[str]:
    """`n` budgets, teams or agents of the company; the keys that name them."""
    c = stack.client
    base = f"/v1/admin/companies/{company_id}"
    made: set[str] = set()
    if what == "budgets":
        me = data_of(c.as_user(token, "GET", "/v1/me"))["user"]["id"]
        periods = ["day", "week", "month", "none"]
        keys: list[str] = []
        for i in range(n):
            if i % len(periods) == 0:
                key = data_of(c.admin("POST", "/v1/admin/api-keys", json={"user_id": me}), 201)
                keys.append(key["id"])
            body: dict[str, Any] = {"scope": "api_key", "target_id": keys[-1], "amount": "1",
                    "period": periods[i % len(periods)]}  # fmt: skip
            made.add(data_of(c.as_user(token, "POST", f"{base}/budgets", json=body), 201)["id"])
    elif what == "teams":
        for i in range(n):
            body = {"name": f"team-{i:03d}", "user_ids": []}
            made.add(data_of(c.as_user(token, "POST", f"{base}/teams", json=body), 201)["id"])
    else:
        for i in range(n):
            body = {"name": f"agent-{i:03d}", "system_prompt": "be brief"}
            made.add(data_of(c.as_user(token, "POST", f"{base}/agents", json=body), 201)["name"])
    return made


def _b64(doc: Any) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(doc)).decode().rstrip("=")


def _key(what: str, item: dict[str, Any]) -> str:
    return str(item["name"] if what == "agents" else item["id"])


@pytest.mark.parametrize("what", ["budgets", "teams", "agents"])
def test_company_listings_page_by_limit_and_cursor(stack: InProcessStack, what: str) -> None:
    company_id, owner = _owner(stack)
    path = f"/v1/admin/companies/{company_id}/{what}"
    made = _made(stack, company_id, owner, what, 5)
    pages = _walk(stack, owner, path, 2)
    assert [len(p) for p in pages] == [2, 2, 1]
    seen = [_key(what, item) for page in pages for item in page]
    assert len(seen) == len(set(seen)) and set(seen) == made
    for limit in ("0", "201", "x"):
        r = stack.client.as_user(owner, "GET", path, params={"limit": limit})
        assert r.status_code == 422 and r.json()["error"]["code"] == "validation_error", r.text
    # Mangled, forged (a key past any name's length, not a string) or another
    # listing's cursor: 422, never a 500, and a key cursor means nothing elsewhere.
    usage_cursor = encode_cursor(datetime.now(UTC), "x")
    for cursor, where in [
        ("not-a-cursor", path),
        (_b64(["key", "x" * 600]), path),
        (_b64(["key", 7]), path),
        (usage_cursor, path),
        (encode_key_cursor("x"), "/v1/usage"),
    ]:
        r = stack.client.as_user(owner, "GET", where, params={"cursor": cursor})
        assert r.status_code == 422 and r.json()["error"]["code"] == "validation_error", r.text


@pytest.mark.parametrize("what", ["budgets", "teams", "agents"])
def test_company_listings_show_50_by_default(stack: InProcessStack, what: str) -> None:
    company_id, owner = _owner(stack)
    path = f"/v1/admin/companies/{company_id}/{what}"
    made = _made(stack, company_id, owner, what, 51)
    first = data_of(stack.client.as_user(owner, "GET", path))
    assert len(first["items"]) == 50 and first["next_cursor"], len(first["items"])
    rest = data_of(
        stack.client.as_user(owner, "GET", path, params={"cursor": first["next_cursor"]})
    )
    assert rest["next_cursor"] is None
    assert {_key(what, i) for i in first["items"] + rest["items"]} == made
    whole = data_of(stack.client.as_user(owner, "GET", path, params={"limit": 200}))
    assert len(whole["items"]) == 51 and whole["next_cursor"] is None


def test_usable_agents_and_providers_listings_page_too(stack: InProcessStack) -> None:
    c = stack.client
    company_id, owner = _owner(stack)
    made = _made(stack, company_id, owner, "agents", 3)
    pages = _walk(stack, owner, "/v1/agents", 2)
    assert [len(p) for p in pages] == [2, 1]
    assert {a["name"] for p in pages for a in p} == made
    for provider in ("openai", "anthropic", "mock"):
        body = {"api_key": f"sk-{uuid.uuid4().hex}"}
        path = f"/v1/admin/companies/{company_id}/providers/{provider}"
        data_of(c.as_user(owner, "PUT", path, json=body))
    pages = _walk(stack, owner, f"/v1/admin/companies/{company_id}/providers", 2)
    assert [len(p) for p in pages] == [2, 1]
    assert {p["provider"] for page in pages for p in page} == {"openai", "anthropic", "mock"}


# --- §9 the edge's errors use OpenAI's shape; both services send X-Request-Id -------------


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/v1/chat/completions"), ("PUT", "/v1/chat/completions"),
     ("POST", "/v1/stream"), ("HEAD", "/v1/stream"), ("DELETE", "/v1/models")],
)  # fmt: skip
def test_the_edge_answers_a_wrong_method_in_openais_error_shape(
    stack: InProcessStack, method: str, path: str
) -> None:
    c = stack.client
    rid = f"conf-{uuid.uuid4().hex[:12]}"
    r = c.http.request(method, c.edge_url + path, headers={"X-Request-Id": rid})
    assert r.status_code == 405, r.text
    assert r.headers["x-request-id"] == rid
    assert "GET" in r.headers["allow"] or "POST" in r.headers["allow"]
    if method == "HEAD":
        return  # no body on a HEAD
    assert r.headers["content-type"].startswith("application/json"), r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "code"}, error
    assert error["type"] == "invalid_request_error" and error["code"] == "method_not_allowed"


def test_both_services_echo_x_request_id_on_every_kind_of_answer(stack: InProcessStack) -> None:
    c = stack.client
    token = c.new_user(c.new_company("5"))

    def rid_of(method: str, url: str, **kwargs: Any) -> httpx.Response:
        rid = f"conf-{uuid.uuid4().hex[:12]}"
        headers = {"X-Request-Id": rid, **kwargs.pop("headers", {})}
        r = c.http.request(method, url, headers=headers, **kwargs)
        assert r.headers.get("x-request-id") == rid, (method, url, r.status_code)
        return r

    auth = {"Authorization": f"Bearer {token}"}
    # Control plane: success, 201, 204, 401, 404, 405, 400, 422, bare documents, health.
    envelope_errors = [
        rid_of("GET", f"{c.cp_url}/v1/me"),  # 401: no credentials
        rid_of("GET", f"{c.cp_url}/v1/no-such-route", headers=auth),
        rid_of("PUT", f"{c.cp_url}/v1/me", headers=auth),
        rid_of("POST", f"{c.cp_url}/v1/chat/init", headers=auth, content=b"{"),
        rid_of("GET", f"{c.cp_url}/v1/usage", headers=auth, params={"limit": "201"}),
        rid_of("POST", f"{c.cp_url}/v1/auth/login", json={"email": "a@b.c", "password": "x"}),
    ]
    for r in envelope_errors:
        body = r.json()
        assert body["success"] is False and isinstance(body["message"], str), body
        assert re.fullmatch(r"[a-z]+(_[a-z]+)*", body["error"]["code"]), body
    assert [r.status_code for r in envelope_errors] == [401, 404, 405, 400, 422, 401]
    data_of(rid_of("GET", f"{c.cp_url}/v1/me", headers=auth))
    init = rid_of("POST", f"{c.cp_url}/v1/chat/init", headers=auth, json={"query": "hello"})
    grant = data_of(init, 201)
    for path in ("/.well-known/jwks.json", "/openapi.json"):
        doc = rid_of("GET", c.cp_url + path).json()
        assert "success" not in doc and "data" not in doc
    for base in (c.cp_url, c.edge_url):
        for path in ("/healthz", "/readyz"):
            assert rid_of("GET", base + path).json() == {"status": "ok"}
        assert rid_of("GET", base + "/metrics").headers["content-type"].startswith("text/plain")
    # Edge: 404, 401, a stream, and the 204 after its end.
    for r in (
        rid_of("GET", f"{c.edge_url}/v1/no-such-route"),
        rid_of("POST", f"{c.edge_url}/v1/chat/completions", json={}),
    ):
        assert set(r.json()["error"]) == {"message", "type", "code"}
    # A stream answers with its init's request id (the token's `request_id` claim),
    # which is the one the client sent to init: one id from init to settlement.
    with c.http.stream("GET", grant["stream_url"]) as stream:
        assert stream.status_code == 200
        assert stream.headers["x-request-id"] == init.headers["x-request-id"]
        text = stream.read().decode()
    last = [line for line in text.splitlines() if line.startswith("id:")][-1][3:].strip()
    done = rid_of("GET", grant["stream_url"], headers={"Last-Event-ID": last})
    assert done.status_code == 204 and done.content == b""


# --- §7/§9/§11 the usage webhook the edge sends -----------------------------------------


def test_the_edges_usage_webhook_has_the_contracts_shape(stack: InProcessStack) -> None:
    c = stack.client
    with webhook_tap(stack.group, stack.control_plane) as tap:
        token = c.new_user(c.new_company("5"))
        grant = c.init_ok(token, {"query": "hello"})
        with c.http.stream("GET", grant["stream_url"]) as stream:
            stream.read()
        c.wait_usage(token, grant["reservation_id"])
        sent = _sent_for(tap, grant["reservation_id"])
    assert sent, "no usage webhook reached the control plane"
    headers, event = sent[0]
    jti = event["data"]["jti"]
    assert headers["webhook-id"] == f"usage_{jti}"
    assert headers["webhook-signature"].startswith("v1,")
    assert re.fullmatch(r"\d+", headers["webhook-timestamp"])
    assert set(event) >= {"type", "timestamp", "data"}
    assert event["type"] == "stream." + event["data"]["status"] == "stream.completed"
    data = event["data"]
    for key in ("timestamp",):
        assert ISO_UTC.match(event[key]), event[key]
    for key in ("started_at", "first_token_at", "ended_at"):
        assert ISO_UTC.match(data[key]), (key, data[key])
        datetime.fromisoformat(data[key])
    assert {
        "jti", "reservation_id", "company_id", "user_id", "session_id", "request_id",
        "model", "provider", "status", "finish_reason", "input_tokens", "output_tokens",
        "usage_source", "content", "cached_input_tokens", "cache_write_tokens",
        "reasoning_tokens",
    } <= set(data)  # fmt: skip
    assert data["model"] == "mock-fast" and data["provider"] == "mock"
    assert data["usage_source"] in ("upstream", "estimated")
    assert isinstance(data["content"], str) and data["content"]
    assert "fallback_from" not in data  # the first choice served
    for key in ("cached_input_tokens", "cache_write_tokens", "reasoning_tokens"):
        assert isinstance(data[key], int) and data[key] >= 0


# --- §11 "NUL (\u0000) in any input is 400 invalid_characters": the edge's input too ------


def test_a_nul_in_a_chat_body_at_the_edge_is_400_invalid_characters(stack: InProcessStack) -> None:
    c = stack.client
    token = c.new_user(c.new_company("5"))
    ask = [{"role": "user", "content": "hello there, how are you today?"}]
    grant = c.init_ok(token, {"messages": ask})
    client = c.openai(grant["stream_token"], max_retries=0)
    before = c.mock_stats()["requests"]
    bad_bodies: list[dict[str, Any]] = [
        {"messages": [{"role": "user", "content": "hello\u0000"}]},
        {"messages": ask, "user": "u\u0000"},
        {"messages": ask, "stop": ["\u0000"]},
    ]
    for bad in bad_bodies:
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model="mock-fast", **bad)
        assert refused.value.status_code == 400
        assert refused.value.code == "invalid_characters", refused.value.body
    assert c.mock_stats()["requests"] == before  # nothing reached the backend
    # Refused before the token was claimed; an escaped backslash then "u0000" is text.
    answer = client.chat.completions.create(
        model="mock-fast", messages=[{"role": "user", "content": "a \\u0000 b"}]
    )
    assert answer.choices[0].message.content


# --- §11 fallbacks: the webhook names what served and `data.fallback_from` the first choice --


def _fallbacks_metric(gw: FallbackStack) -> dict[str, float]:
    text = gw.client.http.get(f"{gw.client.edge_url}/metrics").text
    found: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("llmgw_edge_fallbacks_total{"):
            labels, value = line.rsplit(" ", 1)
            found[labels] = float(value)
    return found


def test_a_fallback_webhook_names_the_serving_model_and_fallback_from(tmp_path: Path) -> None:
    with FallbackStack(base_env(f"sqlite:///{tmp_path / 'gateway.db'}"), tmp_path) as gw:
        c = gw.client
        company = c.new_company("100")
        owner = c.new_user(company, "owner")
        control_plane = gw.group._apps[2][0]
        # A model the company added (its own key) whose chain falls back: the metric
        # names packaged ids only, the company's own is `custom`.
        own = {"api_key": "sk-company-own-key", "models": {"co-first": {
            "upstream_model": "down", "context_length": 8192, "max_output_tokens": 1024,
            "features": ["streaming"], "price": {"input_per_mtok": "1", "output_per_mtok": "1"},
            "fallbacks": ["claude-ok"]}}}  # fmt: skip
        path = f"/v1/admin/companies/{company}/providers/p-down"
        assert c.as_user(owner, "PUT", path, json=own).status_code in (200, 201)
        before = _fallbacks_metric(gw)
        with webhook_tap(gw.group, control_plane) as tap:
            grants = []
            for model in ("first-down", "co-first"):
                grant = c.init_ok(owner, {"model": model, "query": "hello"})
                with c.http.stream("GET", grant["stream_url"]) as stream:
                    assert stream.status_code == 200
                    stream.read()
                grants.append((grant, c.wait_usage(owner, grant["reservation_id"])))
            sent = [_sent_for(tap, grant["reservation_id"]) for grant, _ in grants]
        after = _fallbacks_metric(gw)
    for (_, usage), events, first in zip(grants, sent, ("first-down", "co-first"), strict=True):
        assert (usage["model"], usage["provider"]) == ("claude-ok", "p-claude")
        data = events[0][1]["data"]
        assert (data["model"], data["provider"]) == ("claude-ok", "p-claude")
        assert data["fallback_from"] == first
    moved = {k: after[k] - before.get(k, 0.0) for k in after if after[k] != before.get(k, 0.0)}
    assert moved == {
        'llmgw_edge_fallbacks_total{from_model="first-down",to_model="claude-ok"}': 1.0,
        'llmgw_edge_fallbacks_total{from_model="custom",to_model="claude-ok"}': 1.0,
    }, moved


# --- §6 `max_tokens` clamped to the token's; `model` omitted or the token's -------------------


def test_the_edge_clamps_max_tokens_to_the_tokens_and_takes_model_omitted(
    stack: InProcessStack,
) -> None:
    c = stack.client
    token = c.new_user(c.new_company("5"))
    for field in ("max_tokens", "max_completion_tokens"):
        grant = c.init_ok(token, {"query": "tell me a long story", "max_tokens": 5})
        client = c.openai(grant["stream_token"], max_retries=0)
        rid = claims_of(grant["stream_token"])["request_id"]
        answer = client.chat.completions.create(  # type: ignore[call-overload]
            model=openai.NOT_GIVEN,
            messages=[{"role": "user", "content": "tell me a long story"}],
            max_tokens=1000 if field == "max_tokens" else openai.NOT_GIVEN,
            max_completion_tokens=1000 if field != "max_tokens" else openai.NOT_GIVEN,
        )
        assert answer.model == "mock-fast"
        assert answer.usage is not None and 0 < answer.usage.completion_tokens <= 5
        sent = [
            r["body"]
            for r in c.http.get(f"{c.mock_url}/_mock/requests").json()["requests"]
            if r["headers"].get("x-request-id") == rid
        ]
        assert len(sent) == 1
        assert sent[0].get("max_tokens", sent[0].get("max_completion_tokens")) == 5, sent[0]


# --- §6 `GET /v1/stream`: the token as `Authorization: Bearer`, the events' shapes ----------


def test_the_eventsource_takes_the_token_as_a_bearer_header(stack: InProcessStack) -> None:
    c = stack.client
    token = c.new_user(c.new_company("5"))
    grant = c.init_ok(token, {"query": "hello [[mock tokens=4]]"})
    url = f"{c.edge_url}/v1/stream"
    bearer = {"Authorization": f"Bearer {grant['stream_token']}"}
    with c.http.stream("GET", url, headers=bearer) as stream:
        assert stream.status_code == 200, stream.read()
        assert stream.headers["content-type"].startswith("text/event-stream")
        assert stream.headers["cache-control"] == "no-cache"
        assert stream.headers["x-accel-buffering"] == "no"
        assert "content-encoding" not in stream.headers
        events = list(SSEDecoder().feed(stream.read()))
    assert all(e.id for e in events)
    chunks = [orjson.loads(e.data) for e in events if e.event == "chunk"]
    assert [set(c) for c in chunks] == [{"content", "index"}] * len(chunks)
    assert [c["index"] for c in chunks] == list(range(len(chunks)))
    [complete] = [orjson.loads(e.data) for e in events if e.event == "complete"]
    assert events[-1].event == "complete"
    assert complete["done"] is True and complete["finish_reason"] == "stop"
    assert complete["session_id"] == grant["session_id"]
    assert set(complete["usage"]) >= {"input_tokens", "output_tokens"}
    assert complete["usage"]["output_tokens"] == 4
    # A second GET without Last-Event-ID is a second use; with it, after the end, 204.
    again = c.http.get(url, headers=bearer)
    assert again.status_code == 401 and again.json()["error"]["code"] == "token_used"
    done = c.http.get(url, headers={**bearer, "Last-Event-ID": events[-1].id or ""})
    assert done.status_code == 204


# --- §6/§11 OpenAI's exact chunk shapes on the wire, tool calls included -------------------

WEATHER_TOOL: list[Any] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]


def test_streamed_chunks_and_tool_call_deltas_are_openais_shape_on_the_wire(
    stack: InProcessStack,
) -> None:
    c = stack.client
    token = c.new_user(c.new_company("5"))
    ask = [{"role": "user", "content": "Weather in two cities? [[mock tool_calls=2]]"}]
    grant = c.init_ok(token, {"messages": ask, "tools": WEATHER_TOOL})
    body = {"messages": ask, "tools": WEATHER_TOOL, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    headers = {"Authorization": f"Bearer {grant['stream_token']}"}
    r = c.http.post(f"{c.edge_url}/v1/chat/completions", json=body, headers=headers)
    assert r.status_code == 200, r.text
    datas = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert datas[-1] == "[DONE]"
    chunks = [orjson.loads(d) for d in datas[:-1]]
    for chunk in chunks:
        assert chunk["object"] == "chat.completion.chunk" and chunk["model"] == "mock-fast"
        assert chunk["id"].startswith("chatcmpl-") and isinstance(chunk["created"], int)
    *with_choices, usage = chunks
    assert usage["choices"] == []
    assert set(usage["usage"]) >= {"prompt_tokens", "completion_tokens", "total_tokens"}
    deltas = [tc for ch in with_choices for tc in ch["choices"][0]["delta"].get("tool_calls", [])]
    firsts = [tc for tc in deltas if "id" in tc]
    assert [(tc["index"], tc["type"], tc["function"]["name"]) for tc in firsts] == [
        (0, "function", "get_weather"),
        (1, "function", "get_weather"),
    ]
    for tc in firsts:
        assert set(tc) == {"index", "id", "type", "function"}
        assert set(tc["function"]) == {"name", "arguments"}
    for tc in deltas:
        if "id" not in tc:
            assert set(tc) == {"index", "function"} and set(tc["function"]) == {"arguments"}
    for index in (0, 1):
        joined = "".join(tc["function"]["arguments"] for tc in deltas if tc["index"] == index)
        assert isinstance(orjson.loads(joined), dict)
    finishes = [ch["choices"][0]["finish_reason"] for ch in with_choices]
    assert finishes[-1] == "tool_calls" and all(f is None for f in finishes[:-1])

    # EventSource: one `tool_call` event per call, its data exactly the four fields.
    grant = c.init_ok(token, {"messages": ask, "tools": WEATHER_TOOL})
    with c.http.stream("GET", grant["stream_url"]) as stream:
        events = list(SSEDecoder().feed(stream.read()))
    kinds = [e.event for e in events]
    assert kinds[-3:] == ["tool_call", "tool_call", "complete"]
    for e in events[-3:-1]:
        call = orjson.loads(e.data)
        assert set(call) == {"index", "id", "name", "arguments"}
        assert isinstance(orjson.loads(call["arguments"]), dict)
    assert orjson.loads(events[-1].data)["finish_reason"] == "tool_calls"


# --- §9 Secrets: LLMGW_ENCRYPTION_KEY required outside dev; LLMGW_TOKEN_TTL_SECONDS 1-300 -----


def test_a_control_plane_without_an_encryption_key_refuses_to_start_naming_it(
    tmp_path: Path,
) -> None:
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(tmp_path),
        "LLMGW_WEBHOOK_SECRET": new_webhook_secret(),
        "LLMGW_DATABASE_URL": f"sqlite:///{tmp_path / 'gateway.db'}",
    }
    port = str(free_port())
    done = subprocess.run(
        [sys.executable, "-m", "llm_gateway.cli", "control-plane", "--port", port],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode != 0
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and "LLMGW_ENCRYPTION_KEY" in lines[0], lines


@pytest.mark.parametrize(("ttl", "taken"), [("0", None), ("1", 1), ("300", 300), ("301", None)])
def test_the_token_ttl_takes_1_to_300_seconds(ttl: str, taken: int | None) -> None:
    env = {"LLMGW_WEBHOOK_SECRET": new_webhook_secret(), "LLMGW_TOKEN_TTL_SECONDS": ttl}
    if taken is None:
        with pytest.raises(ConfigError, match="LLMGW_TOKEN_TTL_SECONDS"):
            ControlPlaneSettings.from_env(env)
    else:
        assert ControlPlaneSettings.from_env(env).token_ttl_seconds == taken
