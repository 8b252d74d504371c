"""One key, one call (issue 16.5): a gateway API key straight at the edge.

Pure tables first (the OpenAI body → init translation, the refusal mapping, the
settings, the estimates init and edge agree on); then one real stack for the module
(SQLite + memory store) with `LLMGW_EDGE_SERVICE_SECRET` set, attacked through the
control plane's internal endpoint and through the edge with the official client.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest

from control_plane.chat_init import plan_hold
from control_plane.chat_request import parse_init_request
from control_plane.credentials import hash_api_key
from control_plane.routes import internal
from shared.catalog import load_catalog
from shared.service_calls import (
    INIT_PATH,
    KEY_HASH_HEADER,
    MODELS_PATH,
    key_digest,
    nonce_key,
    signed_headers,
)
from shared.settings import ConfigError
from shared.tokens import StreamGrant
from stream_edge.errors import BadRequest, InitRefused, ServiceUnavailable
from stream_edge.key_callers import init_request, normalised, openai_models, refusal
from stream_edge.requests import parse_chat_request
from stream_edge.settings import EdgeSettings
from tests.conftest import new_webhook_secret
from tests.inproc import Gateway, edge_url, eventually
from tests.stack import InProcessStack, base_env

SERVICE_SECRET = new_webhook_secret()
IMAGE = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}
TOOL = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}},
}

# --- pure: translation, refusals, settings ---------------------------------------


def test_an_openai_body_becomes_an_init_request() -> None:
    body = normalised(
        {
            "model": "mock-fast",
            "messages": [{"role": "user", "content": "hi"}],
            "max_completion_tokens": 7,
            "stream": True,
            "stream_options": {"include_usage": True},
            "temperature": None,  # null means "not set": not sent on, not sized
            "tools": [],
            "seed": 3,
            "user": "end-user-1",
            "session_id": "someone-elses",  # not OpenAI's: never reaches init
            "agent": "x",
        }
    )
    assert init_request(body) == {
        "model": "mock-fast",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 7,
        "seed": 3,
        "user": "end-user-1",
    }


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ([1, 2], "invalid_json"),
        ({"messages": [], "stream": "yes"}, "invalid_stream"),
        ({"messages": [], "stream_options": 3}, "invalid_stream_options"),
        ({"messages": [], "max_tokens": 0}, "invalid_max_tokens"),
        ({"messages": [], "max_tokens": True}, "invalid_max_tokens"),
    ],
)
def test_what_only_the_edge_checks_is_refused_before_the_init(body: Any, code: str) -> None:
    with pytest.raises(BadRequest) as refused:
        init_request(normalised(body))
    assert refused.value.code == code


def _envelope(code: str, message: str = "no") -> bytes:
    return orjson.dumps({"success": False, "message": message, "error": {"code": code}})


@pytest.mark.parametrize(
    ("status", "code", "retry_after", "want_status", "want_type", "want_headers"),
    [
        (402, "insufficient_credits", None, 402, "insufficient_quota", {}),
        (402, "budget_exceeded", None, 402, "insufficient_quota", {}),
        (403, "forbidden", None, 403, "permission_error", {}),
        (404, "not_found", None, 404, "invalid_request_error", {}),
        (413, "input_too_large", None, 413, "invalid_request_error", {}),
        (422, "validation_error", None, 422, "invalid_request_error", {}),
        (429, "tpm_exceeded", "7", 429, "rate_limit_error", {"Retry-After": "7"}),
        (401, "unauthenticated", None, 401, "authentication_error", {}),
    ],
)
def test_a_refused_init_keeps_its_status_code_and_retry_after(
    status: int,
    code: str,
    retry_after: str | None,
    want_status: int,
    want_type: str,
    want_headers: dict[str, str],
) -> None:
    error = refusal(status, _envelope(code, "why"), retry_after)
    assert isinstance(error, InitRefused)
    assert (error.status, error.type, error.code, error.message) == (
        want_status,
        want_type,
        code,
        "why",
    )
    for name, value in want_headers.items():
        assert error.headers()[name] == value


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (401, _envelope("invalid_signature")),  # our secret is wrong: not the caller's fault
        (500, _envelope("internal_error")),
        (503, _envelope("unavailable")),
        (400, b"<html>proxy error</html>"),
    ],
)
def test_the_edges_own_failures_are_503_not_the_callers(status: int, body: bytes) -> None:
    error = refusal(status, body, None)
    assert isinstance(error, ServiceUnavailable)
    assert error.code == "control_plane_unavailable"


def test_the_models_list_is_openais_shape() -> None:
    data = {"models": [{"id": "m1", "provider": "p"}], "default_model": "m1"}
    assert openai_models(data) == {
        "object": "list",
        "data": [{"id": "m1", "object": "model", "created": 0, "owned_by": "p"}],
    }


def test_the_key_travels_as_the_hash_the_control_plane_stores() -> None:
    key = "sk_" + uuid.uuid4().hex
    assert key_digest(key) == hash_api_key(key)


def _env(**extra: str) -> dict[str, str]:
    return {**base_env("sqlite:///unused.db"), **extra}


@pytest.mark.parametrize(
    "secret",
    ["whsec_CHANGE_ME", "whsec_" + "QUFB" * 8, "whsec_c2hvcnQ=", "not-a-secret"],
)
def test_a_weak_service_secret_never_starts(secret: str) -> None:
    with pytest.raises(ConfigError, match="LLMGW_EDGE_SERVICE_SECRET"):
        EdgeSettings.from_env(_env(LLMGW_EDGE_SERVICE_SECRET=secret))


def test_the_service_secret_must_not_be_the_webhook_secret() -> None:
    env = _env()
    with pytest.raises(ConfigError, match="must differ"):
        EdgeSettings.from_env({**env, "LLMGW_EDGE_SERVICE_SECRET": env["LLMGW_WEBHOOK_SECRET"]})


def test_the_service_secret_rotates_newest_first() -> None:
    old, new = new_webhook_secret(), new_webhook_secret()
    settings = EdgeSettings.from_env(_env(LLMGW_EDGE_SERVICE_SECRET=f"{new},{old}"))
    assert [s.reveal() for s in settings.edge_service_secrets] == [new, old]


# --- pure: init's hold always covers what the edge then sends --------------------

CATALOG = load_catalog(None)
BODIES: list[tuple[str, dict[str, Any]]] = [
    ("mock-fast", {"messages": [{"role": "user", "content": "hello there"}]}),
    (
        "mock-fast",
        {
            "messages": [
                {"role": "developer", "content": "be brief"},
                {"role": "user", "content": "é" * 301},
            ],
            "stop": "END",
            "temperature": 0.5,
            "top_p": 1,
            "presence_penalty": -1.5,
            "frequency_penalty": 0.25,
            "seed": 42,
            "user": "u-1",
            "max_tokens": 12,
        },
    ),
    (
        "mock-fast",
        {
            "messages": [
                {"role": "user", "content": "weather?"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": "{}"},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
            ],
            "tools": [TOOL],
            "tool_choice": "auto",
            "parallel_tool_calls": False,
            "user": None,
        },
    ),
    (
        "gpt-4o-mini",
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "what?"}, IMAGE]}]},
    ),
]


@pytest.mark.parametrize(("model_id", "body"), BODIES, ids=[str(i) for i in range(len(BODIES))])
def test_the_edge_never_finds_the_input_larger_than_init_held_for(
    model_id: str, body: dict[str, Any]
) -> None:
    """A key caller's body is sized twice: at init (the hold, the grant's
    max_input_tokens) and at the edge (checked against it). Were the edge's count
    larger, the stream would be refused 413 after the hold was taken."""
    model = CATALOG.model(model_id)
    assert model is not None
    clean = normalised({**body, "model": model_id})
    req = parse_init_request(init_request(clean))
    assert req.messages is not None
    plan = plan_hold(model, req.messages, req.max_tokens, req.params)
    grant = StreamGrant(
        jti="j", user_id="u", company_id="c", role="member", scopes=("llm:chat:send",),
        session_id="s", model=model_id, max_tokens=plan.max_tokens,
        max_input_tokens=plan.input_estimate, reservation_id="r", request_id="q",
        issued_at=0, expires_at=10**10,
    )  # fmt: skip
    chat = parse_chat_request(clean, grant, model)
    assert chat.input_estimate <= plan.input_estimate
    assert chat.params.keys() <= req.params.keys() | {"stream"}


# --- one real stack ---------------------------------------------------------------


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessStack]:
    tmp = tmp_path_factory.mktemp("keys")
    env = {
        **base_env(f"sqlite:///{tmp}/gw.db"),
        "LLMGW_EDGE_SERVICE_SECRET": SERVICE_SECRET,
        "LLMGW_MAX_STREAMS_PER_USER": "1",
        # No test here inits more than twice per user but the one that hits this.
        "LLMGW_INIT_RATE_PER_USER": "3",
        "LLMGW_SPOOL_DIR": str(tmp / "spool"),
    }
    with InProcessStack(env) as running:
        yield running


class Caller:
    """A company, one of its users (password-less: keys only) and its API keys:
    `full` (every scope of the user: also reads /v1/me and /v1/usage) and `key`
    (`scopes`, default the same)."""

    def __init__(
        self, stack: InProcessStack, credits: str = "5", scopes: list[str] | None = None
    ) -> None:
        c = stack.client
        self.stack = stack
        self.company_id = c.new_company(credits)
        created = c.admin(
            "POST",
            "/v1/admin/users",
            json={"company_id": self.company_id, "email": f"k-{uuid.uuid4().hex}@x.io",
                  "role": "member"},
        )  # fmt: skip
        assert created.status_code == 201, created.text
        self.user_id: str = created.json()["data"]["id"]
        self.full, self.full_id = self._key(None)
        self.key, self.key_id = self._key(scopes) if scopes else (self.full, self.full_id)

    def _key(self, scopes: list[str] | None) -> tuple[str, str]:
        body: dict[str, Any] = {"user_id": self.user_id}
        if scopes is not None:
            body["scopes"] = scopes
        created = self.stack.client.admin("POST", "/v1/admin/api-keys", json=body)
        assert created.status_code == 201, created.text
        return created.json()["data"]["key"], created.json()["data"]["id"]

    def held(self) -> str:
        return self.stack.client.credits(self.full)["held"]

    def usage(self) -> list[dict[str, Any]]:
        answer = self.stack.client.as_user(self.full, "GET", "/v1/usage")
        assert answer.status_code == 200, answer.text
        items: list[dict[str, Any]] = answer.json()["data"]["items"]
        return items

    def post(self, body: dict[str, Any], key: str | None = None) -> httpx.Response:
        return self.stack.client.http.post(
            f"{self.stack.client.edge_url}/v1/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {key or self.key}"},
        )


HI = {"messages": [{"role": "user", "content": "hi [[mock tokens=3]]"}]}


def _internal(
    stack: InProcessStack, path: str, doc: dict[str, Any], secret: str | None = SERVICE_SECRET
) -> httpx.Response:
    body = orjson.dumps(doc)
    headers = signed_headers(secret, body) if secret else {}
    headers["content-type"] = "application/json"
    return stack.client.http.post(f"{stack.client.cp_url}{path}", content=body, headers=headers)


def test_the_official_client_streams_with_an_api_key_and_is_billed(
    stack: InProcessStack,
) -> None:
    caller = Caller(stack)
    client = stack.client.openai(caller.key)
    chunks = list(
        client.chat.completions.create(
            model="mock-fast",
            messages=[{"role": "user", "content": "hello [[mock tokens=5]]"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    usage = chunks[-1].usage
    assert text and usage is not None and usage.completion_tokens == 5
    # Settled like any stream: one usage record for the key's user, the hold gone.
    items = caller.usage()
    deadline = time.monotonic() + 15
    while not items and time.monotonic() < deadline:
        time.sleep(0.05)
        items = caller.usage()
    assert [(i["status"], i["output_tokens"]) for i in items] == [("completed", 5)]
    assert caller.held() == "0.000000"


def test_model_omitted_runs_the_company_default_without_streaming(
    stack: InProcessStack,
) -> None:
    caller = Caller(stack)
    completion = stack.client.openai(caller.key).chat.completions.create(
        model=openai.NOT_GIVEN,  # type: ignore[arg-type]
        messages=[{"role": "user", "content": "hi [[mock tokens=2]]"}],
    )
    assert completion.model == "mock-fast"
    assert completion.choices[0].message.content


def test_models_list_answers_the_keys_company_catalog(stack: InProcessStack) -> None:
    caller = Caller(stack)
    listed = stack.client.openai(caller.key).models.list()
    ids = {m.id for m in listed.data}
    assert {"mock-fast", "mock-chat"} <= ids
    assert all(m.object == "model" for m in listed.data)


def test_each_key_sees_and_reaches_only_its_own_companys_models(
    stack: InProcessStack,
) -> None:
    """Company A adds its own model `house` (its default) and hides `mock-chat`; a key
    of company B neither lists nor reaches `house`, and A's key gets A's catalog."""
    a, b = Caller(stack), Caller(stack)
    house = {
        "api_key": "sk-company-mock-key",
        "default_model": "house",
        "models": {
            "house": {
                "upstream_model": "mock-fast",
                "context_length": 4096,
                "max_output_tokens": 64,
                "features": ["streaming"],
                "price": {"input_per_mtok": "1", "output_per_mtok": "1"},
            },
            "mock-chat": {"enabled": False},
        },
    }
    put = stack.client.admin(
        "PUT", f"/v1/admin/companies/{a.company_id}/providers/mock", json=house
    )
    assert put.status_code == 200, put.text
    listed_a = {m.id for m in stack.client.openai(a.key).models.list().data}
    listed_b = {m.id for m in stack.client.openai(b.key).models.list().data}
    assert "house" in listed_a and "mock-chat" not in listed_a
    assert "house" not in listed_b and "mock-chat" in listed_b
    refused = b.post({**HI, "model": "house"})
    assert refused.status_code == 404, refused.text
    assert refused.json()["error"]["code"] == "model_not_found"
    assert a.post({**HI, "model": "mock-chat"}).status_code == 403
    default = a.post(HI)  # model omitted: A's default, its own model
    assert default.status_code == 200, default.text
    assert default.json()["model"] == "house"
    assert b.held() == "0.000000"


def test_a_read_only_key_cannot_start_a_stream_and_holds_nothing(
    stack: InProcessStack,
) -> None:
    caller = Caller(stack, scopes=["llm:chat:read"])
    upstream = stack.client.mock_stats()
    refused = caller.post(HI)
    assert refused.status_code == 403, refused.text
    assert refused.json()["error"]["type"] == "permission_error"
    assert caller.held() == "0.000000"
    assert caller.usage() == []
    assert stack.client.mock_stats() == upstream  # nothing went upstream


def test_a_revoked_key_stops_at_once(stack: InProcessStack) -> None:
    caller = Caller(stack)
    assert caller.post(HI).status_code == 200
    revoked = stack.client.admin("DELETE", f"/v1/admin/api-keys/{caller.key_id}")
    assert revoked.status_code == 204, revoked.text
    refused = caller.post(HI)
    assert refused.status_code == 401, refused.text
    assert refused.json()["error"]["type"] == "authentication_error"
    listing = stack.client.http.get(
        f"{stack.client.edge_url}/v1/models", headers={"Authorization": f"Bearer {caller.key}"}
    )
    assert listing.status_code == 401


def test_an_unknown_key_is_401_in_openais_shape(stack: InProcessStack) -> None:
    caller = Caller(stack)
    refused = caller.post(HI, key="sk_" + uuid.uuid4().hex)
    assert refused.status_code == 401
    assert set(refused.json()["error"]) == {"message", "type", "code"}


def test_no_credits_is_402_and_nothing_is_held(stack: InProcessStack) -> None:
    caller = Caller(stack, credits="0")
    refused = caller.post(HI)
    assert refused.status_code == 402, refused.text
    assert refused.json()["error"]["code"] == "insufficient_credits"
    assert caller.held() == "0.000000"


def test_the_keys_own_budget_applies(stack: InProcessStack) -> None:
    caller = Caller(stack)
    budget = stack.client.admin(
        "POST",
        f"/v1/admin/companies/{caller.company_id}/budgets",
        json={"scope": "api_key", "target_id": caller.key_id, "amount": "0.000001",
              "period": "none"},
    )  # fmt: skip
    assert budget.status_code == 201, budget.text
    refused = caller.post(HI)
    assert refused.status_code == 402, refused.text
    assert refused.json()["error"]["code"] == "budget_exceeded"
    assert caller.held() == "0.000000"


def test_the_init_rate_applies_with_its_retry_after(stack: InProcessStack) -> None:
    """LLMGW_INIT_RATE_PER_USER is 3 here: the key path is no way around it."""
    caller = Caller(stack)
    one = {"messages": [{"role": "user", "content": "r [[mock tokens=1]]"}]}
    assert [caller.post(one).status_code for _ in range(3)] == [200, 200, 200]
    refused = caller.post(one)
    assert refused.status_code == 429, refused.text
    assert refused.json()["error"]["code"] == "rate_limited"
    assert int(refused.headers["retry-after"]) >= 1


def test_a_user_at_its_stream_limit_gets_429_and_the_hold_goes_back(
    stack: InProcessStack,
) -> None:
    """LLMGW_MAX_STREAMS_PER_USER is 1 here: one slow stream runs, then the key's
    call is refused 429 by the edge's limit, after init took a hold, which must not
    stay held until the sweeper."""
    caller = Caller(stack)
    started = threading.Event()
    finish = threading.Event()

    def slow_stream() -> None:
        body = {
            "messages": [{"role": "user", "content": "slow [[mock tokens=40 delay_ms=100]]"}],
            "stream": True,
        }
        headers = {"Authorization": f"Bearer {caller.key}"}
        url = f"{stack.client.edge_url}/v1/chat/completions"
        with httpx.Client(timeout=30) as http, http.stream("POST", url, json=body, headers=headers):
            started.set()
            finish.wait(30)

    runner = threading.Thread(target=slow_stream)
    runner.start()
    try:
        assert started.wait(30)
        refused = caller.post(HI)
        assert refused.status_code == 429, refused.text
        assert refused.headers.get("retry-after")
        assert refused.json()["error"]["type"] == "rate_limit_error"
    finally:
        finish.set()
        runner.join(30)
    deadline = time.monotonic() + 15
    while caller.held() != "0.000000" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert caller.held() == "0.000000"


# --- the internal endpoint: only an edge, once, by hash ------------------------------


def test_a_forged_internal_call_is_401_and_holds_nothing(stack: InProcessStack) -> None:
    caller = Caller(stack)
    doc = {"key_hash": key_digest(caller.key), "request": HI}
    unsigned = _internal(stack, INIT_PATH, doc, secret=None)
    assert unsigned.status_code == 401, unsigned.text
    assert unsigned.json()["error"]["code"] == "invalid_signature"
    other = _internal(stack, INIT_PATH, doc, secret=new_webhook_secret())
    assert other.status_code == 401
    # The webhook secret settles usage; it does not open the init.
    webhook = _internal(stack, INIT_PATH, doc, secret=stack.client.webhook_secret)
    assert webhook.status_code == 401
    # Nor does the caller's own key as a bearer.
    as_bearer = stack.client.http.post(
        f"{stack.client.cp_url}{INIT_PATH}",
        json=doc,
        headers={"Authorization": f"Bearer {caller.key}"},
    )
    assert as_bearer.status_code == 401
    assert (
        _internal(stack, MODELS_PATH, {"key_hash": key_digest(caller.key)}, None).status_code == 401
    )
    assert caller.held() == "0.000000"


def test_a_replayed_internal_call_is_refused(stack: InProcessStack) -> None:
    caller = Caller(stack)
    body = orjson.dumps({"key_hash": key_digest(caller.key), "request": HI})
    headers = {**signed_headers(SERVICE_SECRET, body), "content-type": "application/json"}
    url = f"{stack.client.cp_url}{INIT_PATH}"
    first = stack.client.http.post(url, content=body, headers=headers)
    assert first.status_code == 201, first.text
    held = caller.held()
    again = stack.client.http.post(url, content=body, headers=headers)
    assert again.status_code == 401
    assert caller.held() == held  # no second hold


def _signed_for(key_hash: str, body: bytes) -> dict[str, str]:
    """An edge's headers: signed, naming the key's hash ahead of the body."""
    headers = {**signed_headers(SERVICE_SECRET, body), "content-type": "application/json"}
    headers[KEY_HASH_HEADER] = key_hash
    return headers


def test_an_unknown_key_is_refused_before_its_body_is_parsed(
    stack: InProcessStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review 5: an anonymous `Bearer sk_<random>` with a 1 MiB body made the control
    plane parse the whole forwarded body before finding the key unknown (CPU spent
    for a credential that costs nothing). The key is now looked up first, by the
    hash the edge sends in a header, right after the signature."""
    parsed: list[int] = []
    real = internal.parse_json_object

    def counting(body: bytes, **kw: Any) -> dict[str, Any]:
        parsed.append(len(body))
        return real(body, **kw)

    monkeypatch.setattr(internal, "parse_json_object", counting)
    # Straight at the endpoint: a signed body that is not even JSON gets the unknown
    # key's 401, not the parse's 400.
    unknown = key_digest("sk_" + uuid.uuid4().hex)
    for path in (INIT_PATH, MODELS_PATH):
        answer = stack.client.http.post(
            f"{stack.client.cp_url}{path}",
            content=b"{not json",
            headers=_signed_for(unknown, b"{not json"),
        )
        assert answer.status_code == 401, answer.text
        assert answer.json()["error"]["code"] == "unauthenticated"
    # Through the edge: a large body for a random key is never parsed by the control plane.
    big = {"messages": [{"role": "user", "content": "x" * 40}] * 5000}
    refused = Caller(stack).post(big, key="sk_" + uuid.uuid4().hex)
    assert refused.status_code == 401
    assert parsed == []


def test_the_key_hash_header_must_match_the_signed_body(stack: InProcessStack) -> None:
    """The header is not signed: it only lets an unknown key be refused early. A
    live key's header over another key's signed body inits for neither."""
    caller, other = Caller(stack), Caller(stack)
    body = orjson.dumps({"key_hash": key_digest(other.key), "request": HI})
    answer = stack.client.http.post(
        f"{stack.client.cp_url}{INIT_PATH}",
        content=body,
        headers=_signed_for(key_digest(caller.key), body),
    )
    assert answer.status_code == 401, answer.text
    assert caller.held() == other.held() == "0.000000"
    bad = stack.client.http.post(
        f"{stack.client.cp_url}{INIT_PATH}", content=body, headers=_signed_for("nothex", body)
    )
    assert bad.status_code == 401, bad.text
    assert other.held() == "0.000000"


def test_internal_endpoints_are_not_in_the_public_openapi(stack: InProcessStack) -> None:
    paths = stack.client.http.get(f"{stack.client.cp_url}/openapi.json").json()["paths"]
    assert not any(p.startswith("/v1/internal") for p in paths)


class Recorder:
    """Wraps the edge's client to the control plane and records what it sends."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.sent: list[tuple[str, dict[str, str], bytes]] = []

    async def send(
        self, method: str, url: str, headers: Any, body: bytes, company: str | None = None
    ) -> Any:
        self.sent.append((url, dict(headers), body))
        return await self.inner.send(method, url, headers, body, company=company)

    async def aclose(self) -> None:
        await self.inner.aclose()


def test_the_edge_never_sends_the_key_itself(stack: InProcessStack) -> None:
    caller = Caller(stack)
    link = stack.edge.state.edge.control_plane
    recorder = Recorder(link._client)
    link._client = recorder
    trace = "trace-" + uuid.uuid4().hex[:8]
    try:
        streamed = stack.client.http.post(
            f"{stack.client.edge_url}/v1/chat/completions",
            json=HI,
            headers={"Authorization": f"Bearer {caller.key}", "X-Request-Id": trace},
        )
        assert streamed.status_code == 200, streamed.text
        # One request id from the caller through the init to the stream.
        assert streamed.headers["x-request-id"] == trace
        stack.client.openai(caller.key).models.list()
    finally:
        link._client = recorder.inner
    assert len(recorder.sent) == 2
    for _url, headers, body in recorder.sent:
        wire = body + orjson.dumps(headers)
        assert caller.key.encode() not in wire
        assert caller.key[3:].encode() not in wire
        assert key_digest(caller.key).encode() in body
        assert "authorization" not in {h.lower() for h in headers}


# What writes a key to the store; reads, and the outbox loop's own claims, do not count.
STORE_WRITES = (
    "set", "set_if_absent", "hit", "add", "bounded_add", "log_append", "outbox_put",
    "admit", "init_gate",
)  # fmt: skip


async def test_unknown_keys_leave_nothing_in_the_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review 4: each anonymous `Bearer sk_<random>` at the edge left its call's nonce
    in the store for 10 minutes, recorded before the key was looked up."""
    env = {**base_env(f"sqlite:///{tmp_path}/gw.db"), "LLMGW_EDGE_SERVICE_SECRET": SERVICE_SECRET}
    async with Gateway(env) as gw:
        link = gw.edge_state().control_plane
        assert link is not None
        recorder = Recorder(link._client)
        monkeypatch.setattr(link, "_client", recorder)
        writes: list[str] = []
        for name in STORE_WRITES:
            method = getattr(gw.store, name)

            def spy(*args: Any, _name: str = name, _method: Any = method, **kw: Any) -> Any:
                writes.append(f"{_name} {args[:1]}")
                return _method(*args, **kw)

            monkeypatch.setattr(gw.store, name, spy)

        async def edge(method: str, path: str, key: str, body: bytes = b"") -> int:
            headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}
            answer = await gw.clients.send(method, f"{edge_url('edge')}{path}", headers, body)
            await answer.aread()
            await answer.aclose()
            return answer.status_code

        chat = orjson.dumps(HI)
        for _ in range(3):
            assert await edge("POST", "/v1/chat/completions", f"sk_{uuid.uuid4().hex}", chat) == 401
            assert await edge("GET", "/v1/models", f"sk_{uuid.uuid4().hex}") == 401
        assert len(recorder.sent) == 6  # each reached the control plane, signed
        assert writes == []
        for _url, headers, _body in recorder.sent:
            assert await gw.store.get(nonce_key(headers["webhook-id"])) is None

        # A live key's call is still recorded, and its replay refused.
        company = await gw._new_company("5")
        user = await gw.admin(
            "POST", "/v1/admin/users",
            json={"company_id": company, "email": f"k-{uuid.uuid4().hex}@x.io", "role": "member"},
        )  # fmt: skip
        created = await gw.admin(
            "POST", "/v1/admin/api-keys", json={"user_id": user.json()["data"]["id"]}
        )
        assert await edge("GET", "/v1/models", created.json()["data"]["key"]) == 200
        url, headers, body = recorder.sent[-1]
        assert await gw.store.get(nonce_key(headers["webhook-id"])) is not None
        replayed = await gw.http.post(httpx.URL(url).path, content=body, headers=headers)
        assert replayed.status_code == 401, replayed.text
        assert replayed.json()["error"]["code"] == "invalid_signature"


# --- a key caller cancelled between its init and its claim ---------------------------


class HeldAdmit:
    """Wraps the store's `admit`: parks the call on `release` (never set here), before
    the real store runs it (`ran_first=False`) or after (`ran_first=True`: the claim is
    taken in the store, its reply not yet back). The real store does the work."""

    def __init__(self, inner: Any, ran_first: bool) -> None:
        self.inner = inner
        self.ran_first = ran_first
        self.reached = asyncio.Event()
        self.release = asyncio.Event()

    async def __call__(self, admission: Any) -> Any:
        answer = await self.inner(admission) if self.ran_first else None
        self.reached.set()
        await self.release.wait()
        return answer if self.ran_first else await self.inner(admission)


@pytest.mark.parametrize("ran_first", [False, True], ids=["before-claim", "claim-taken"])
async def test_a_key_caller_cancelled_before_its_stream_gives_its_hold_back_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ran_first: bool
) -> None:
    """Review: the server's graceful shutdown cancels a key caller's request after the
    edge's init took its hold and before its stream exists (the claim under way). Only
    `Exception` abandoned the hold: it stayed held until the sweeper's deadline, and a
    claim already taken in the store kept the user's stream slot until its expiry."""
    env = {
        **base_env(f"sqlite:///{tmp_path}/gw.db"),
        "LLMGW_EDGE_SERVICE_SECRET": SERVICE_SECRET,
        "LLMGW_MAX_STREAMS_PER_USER": "1",
    }
    async with Gateway(env) as gw:
        key = await gw.new_api_key()
        state = gw.edge_state()
        held = HeldAdmit(gw.store.admit, ran_first)
        monkeypatch.setattr(gw.store, "admit", held)
        reports = _counted_reports(state, monkeypatch)
        caller = asyncio.create_task(gw.complete(key, HI))
        await held.reached.wait()
        await gw.clients.aclose()  # the server shuts down: the request task is cancelled
        with contextlib.suppress(Exception):
            await caller

        await eventually(lambda: _given_back(gw, key), "the hold given back", within=5)
        assert len(reports) == 1
        (record,) = await _usage_of(gw, key)
        assert record["status"] == "failed"
        assert record["output_tokens"] == 0
        # The stream slot (the user's only one) is free: the next call streams.
        monkeypatch.setattr(gw.store, "admit", held.inner)
        status, answer = await gw.complete(key, HI)
        assert status == 200, answer
        assert len(reports) == 2


# --- a key caller cancelled while the edge's init is in flight -----------------------


class SlowInit:
    """Wraps the control plane's init behind its internal endpoint: parks the edge's
    call on `release` before the init runs (`held_first=False`: the hold not yet
    taken) or after (`held_first=True`: the hold taken and the token minted, the
    answer not yet sent). The real init does the work."""

    def __init__(self, inner: Any, held_first: bool) -> None:
        self.inner = inner
        self.held_first = held_first
        self.reached = asyncio.Event()
        self.release = asyncio.Event()

    async def __call__(self, request: Any, arrive: Any, parse: Any) -> Any:
        answer = await self.inner(request, arrive, parse) if self.held_first else None
        self.reached.set()
        await self.release.wait()
        return answer if self.held_first else await self.inner(request, arrive, parse)


class SlowVerify:
    """Wraps the edge's token verification: parks it on `release` (the control
    plane's answer is in, its token not yet checked: a JWKS refresh under way)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.reached = asyncio.Event()
        self.release = asyncio.Event()

    async def __call__(self, token: str) -> Any:
        self.reached.set()
        await self.release.wait()
        return await self.inner(token)


async def _usage_of(gw: Gateway, key: str) -> list[dict[str, Any]]:
    answer = await gw.http.get("/v1/usage", headers={"Authorization": f"Bearer {key}"})
    assert answer.status_code == 200, answer.text
    items: list[dict[str, Any]] = answer.json()["data"]["items"]
    return items


async def _given_back(gw: Gateway, key: str) -> bool:
    """The key's hold released and its one usage record stored."""
    return (await gw.credits(key))["held"] == "0.000000" and len(await _usage_of(gw, key)) == 1


def _counted_reports(state: Any, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The jti of each usage report the edge enqueues from here on."""
    reports: list[str] = []
    enqueue = state.outbox.enqueue

    async def counted(event: Any, release: Any = None) -> None:
        reports.append(event.jti)
        await enqueue(event, release)

    monkeypatch.setattr(state.outbox, "enqueue", counted)
    return reports


async def _cancel_while_parked(gw: Gateway, key: str, parked: SlowInit | SlowVerify) -> None:
    """The key caller's request, cancelled while parked at `parked`, which is
    released only after the cancellation (the control plane goes on by itself)."""
    caller = asyncio.create_task(gw.complete(key, HI))
    await parked.reached.wait()
    # The server cancels the request task (its shutdown; another server: the caller
    # leaving). `aclose` waits for the task to end, so the park is released meanwhile.
    closing = asyncio.create_task(gw.clients.aclose())
    await asyncio.sleep(0)  # the cancellation is delivered before the answer exists
    parked.release.set()
    await closing
    with contextlib.suppress(Exception):
        await caller


@pytest.mark.parametrize(
    "where", ["before-hold", "hold-taken", "verifying"], ids=lambda where: str(where)
)
async def test_a_key_caller_cancelled_during_its_init_gives_the_hold_back_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """Review: a key caller's request cancelled while the edge's internal init was in
    flight (or its token being verified). The control plane took the hold and minted
    the token anyway; the edge dropped the answer, so the hold stayed held (credits
    locked, the init counted pending) until its deadline or the sweeper."""
    from control_plane.routes import internal

    env = {
        **base_env(f"sqlite:///{tmp_path}/gw.db"),
        "LLMGW_EDGE_SERVICE_SECRET": SERVICE_SECRET,
        "LLMGW_MAX_STREAMS_PER_USER": "1",
    }
    async with Gateway(env) as gw:
        key = await gw.new_api_key()
        before = await gw.credits(key)
        state = gw.edge_state()
        reports = _counted_reports(state, monkeypatch)
        parked: SlowInit | SlowVerify
        if where == "verifying":
            parked = SlowVerify(state.grants.verify)
            monkeypatch.setattr(state.grants, "verify", parked)
        else:
            parked = SlowInit(internal.serve_init, held_first=where == "hold-taken")
            monkeypatch.setattr(internal, "serve_init", parked)
        await _cancel_while_parked(gw, key, parked)

        # Bounded well below the hold's deadline (the sweeper never runs here).
        await eventually(lambda: _given_back(gw, key), "the hold given back", within=5)
        assert (await gw.credits(key))["available"] == before["available"]
        assert len(reports) == 1
        (record,) = await _usage_of(gw, key)
        assert record["status"] == "failed"
        assert record["output_tokens"] == 0
        # The next call streams, and is its own report: nothing was given back twice.
        monkeypatch.undo()
        reports = _counted_reports(state, monkeypatch)
        status, answer = await gw.complete(key, HI)
        assert status == 200, answer
        assert len(reports) == 1

        async def both_settled() -> bool:
            return len(await _usage_of(gw, key)) == 2

        await eventually(both_settled, "the next call settled", within=5)
        assert (await gw.credits(key))["held"] == "0.000000"


async def test_a_key_callers_init_refused_after_its_cancellation_abandons_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The other side of the above: the control plane refuses the init (no credits)
    after the caller is gone. Nothing was held, so the edge reports nothing."""
    from control_plane.routes import internal

    env = {**base_env(f"sqlite:///{tmp_path}/gw.db"), "LLMGW_EDGE_SERVICE_SECRET": SERVICE_SECRET}
    async with Gateway(env) as gw:
        key = await gw.new_api_key(credits="0")
        state = gw.edge_state()
        reports = _counted_reports(state, monkeypatch)
        parked = SlowInit(internal.serve_init, held_first=False)
        monkeypatch.setattr(internal, "serve_init", parked)
        await _cancel_while_parked(gw, key, parked)
        assert reports == []
        assert (await gw.credits(key))["held"] == "0.000000"


async def test_clean_up_after_a_cancellation_runs_through_a_second_one() -> None:
    """`despite_cancellation`: the server cancels again (or anyio's shield is passed
    by a native `task.cancel()`) while a cancelled request gives its hold back; the
    giving back still runs to its end, and the cancellation is the request's end."""
    from stream_edge.cancellation import despite_cancellation

    started, release, done = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def give_back() -> None:
        started.set()
        await release.wait()
        done.set()

    async def request() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            await despite_cancellation(give_back())
            raise

    task = asyncio.create_task(request())
    await asyncio.sleep(0)
    task.cancel()
    await started.wait()
    task.cancel()  # again, while the clean-up runs
    await asyncio.sleep(0)
    assert not task.done()
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert done.is_set()
