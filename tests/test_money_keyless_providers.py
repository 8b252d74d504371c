"""A made-up "own key" for an in-house backend (review 3A, finding 1).

Price, upstream model and added models apply only where the company stores its own
key (`company_llm`). An in-house backend authenticated by the platform's
`X-Service-Token` (`service_token_env`) never checks that key: any string would
pass, unlock a zero price, and the edge would still send the platform's service
token. A backend called with no key at all (as the packaged mock) still takes a
company's key, as DESIGN §4 says: it guards nothing the platform pays for. Real
servers: control plane, edge, and a backend that serves the in-house path only with
the service token.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from cryptography.fernet import Fernet, MultiFernet
from sqlalchemy import create_engine
from sqlalchemy.orm import Session
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route as HttpRoute

from control_plane import company_llm
from control_plane.app import create_app as control_plane_app
from llm_gateway.dev import settings_from_env
from shared.route_claim import CLAIM as ROUTE_CLAIM
from shared.store_memory import MemoryStore
from shared.tokens import StreamGrant
from stream_edge.admission import Route
from stream_edge.app import create_app as edge_app
from stream_edge.attempts import Attempt, upstream_call
from stream_edge.settings import EdgeSettings
from tests.harness import ServerGroup, bind_free_socket, url_of
from tests.stack import Client, base_env, micro
from tests.token_claims import claims_of

SERVICE_TOKEN = "inhouse-service-secret-0123456789"
MADE_UP = "not-a-real-key"
FREE = {"price": {"input_per_mtok": "0", "output_per_mtok": "0"}}
# The backend reports this usage; at 5/15 per million it costs 0.080000.
USAGE = {"prompt_tokens": 1000, "completion_tokens": 5000, "total_tokens": 6000}
PLATFORM_COST = "0.080000"
# Our model id → the provider that serves it.
MODELS = {"house-large": "inhouse", "open-large": "open"}


class Backend:
    """One OpenAI-compatible backend behind two providers: `/inhouse` serves only with
    the platform's service token, `/open` serves anyone. Records each call."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    async def chat(self, request: Request) -> Response:
        body = orjson.loads(await request.body())
        self.calls.append(
            {
                "path": request.url.path,
                "authorization": request.headers.get("authorization"),
                "service_token": request.headers.get("x-service-token"),
                "model": body["model"],
            }
        )
        if request.url.path.startswith("/inhouse") and (
            request.headers.get("x-service-token") != SERVICE_TOKEN
        ):
            return JSONResponse({"error": {"message": "no"}}, status_code=401)

        def chunk(choices: list[Any], **extra: Any) -> bytes:
            doc = {"id": "c", "object": "chat.completion.chunk", "model": body["model"]}
            return b"data: " + orjson.dumps({**doc, "choices": choices, **extra}) + b"\n\n"

        frames = [
            chunk([{"index": 0, "delta": {"role": "assistant", "content": "answer"}}]),
            chunk([{"index": 0, "delta": {}, "finish_reason": "stop"}]),
            chunk([], usage=USAGE),
            b"data: [DONE]\n\n",
        ]
        return Response(b"".join(frames), media_type="text/event-stream")


@dataclasses.dataclass
class Gateway:
    client: Client
    backend: Backend
    database_url: str
    fernet: MultiFernet
    edge_settings: EdgeSettings


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    tmp: Path = tmp_path_factory.mktemp("keyless")
    backend_sock, cp_sock, edge_sock = (bind_free_socket() for _ in range(3))
    backend_url = url_of(backend_sock)
    model = "{provider: %s, context_length: 32000, max_output_tokens: 8000,"
    model += " price: {input_per_mtok: 5.0, output_per_mtok: 15.0}}"
    (tmp / "models.yaml").write_text(
        "default_model: house-large\n"
        "providers:\n"
        f"  inhouse: {{api_type: openai_chat, base_url: '{backend_url}/inhouse/v1',"
        " service_token_env: KEYLESS_TEST_INHOUSE_TOKEN}\n"
        f"  open: {{api_type: openai_chat, base_url: '{backend_url}/open/v1'}}\n"
        "models:\n" + "".join(f"  {m}: {model % p}\n" for m, p in MODELS.items())
    )
    database_url = f"sqlite:///{tmp}/gw.db"
    env = {
        **base_env(database_url),
        "LLMGW_CONTROL_PLANE_URL": url_of(cp_sock),
        "LLMGW_EDGE_PUBLIC_URL": url_of(edge_sock),
        "LLMGW_MODELS_FILE": str(tmp / "models.yaml"),
        "KEYLESS_TEST_INHOUSE_TOKEN": SERVICE_TOKEN,
        "LLMGW_UPSTREAM_RETRIES": "0",
    }
    settings, edge_settings = settings_from_env(env)
    backend = Backend()
    store = MemoryStore()
    routes = [
        HttpRoute(f"/{p}/v1/chat/completions", backend.chat, methods=["POST"])
        for p in ("inhouse", "open")
    ]
    apps = [
        (Starlette(routes=routes), backend_sock),
        (control_plane_app(settings, store), cp_sock),
        (edge_app(edge_settings, store), edge_sock),
    ]
    client = Client(url_of(cp_sock), url_of(edge_sock), backend_url, env["LLMGW_WEBHOOK_SECRET"])
    fernet = MultiFernet([Fernet(k.reveal()) for k in settings.encryption_keys])
    with ServerGroup(apps):
        try:
            yield Gateway(client, backend, database_url, fernet, edge_settings)
        finally:
            client.close()


def _owner(gw: Gateway) -> tuple[str, str]:
    company_id = gw.client.new_company("10")
    return company_id, gw.client.new_user(company_id, role="owner")


def _put(gw: Gateway, token: str, company_id: str, provider: str, body: Any) -> Any:
    path = f"/v1/admin/companies/{company_id}/providers/{provider}"
    return gw.client.as_user(token, "PUT", path, json=body)


def _run(gw: Gateway, token: str, model: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Init and stream `model`; its usage row and the init's stream-token claims."""
    init = gw.client.init_ok(token, {"model": model, "query": "hi"})
    claims = claims_of(init["stream_token"])
    gw.backend.calls.clear()
    response = gw.client.http.get(init["stream_url"])
    assert "event: complete" in response.text, response.text
    return gw.client.wait_usage(token, init["reservation_id"]), claims


def _served_at_platform_terms(gw: Gateway, token: str, model: str) -> None:
    usage, claims = _run(gw, token, model)
    assert ROUTE_CLAIM not in claims  # no company route: the packaged entry serves
    assert usage["cost"] == PLATFORM_COST and usage["output_tokens"] == 5000
    (call,) = gw.backend.calls
    assert call["authorization"] is None and call["model"] == model
    assert call["service_token"] == (SERVICE_TOKEN if MODELS[model] == "inhouse" else None)


@pytest.mark.parametrize("model", ["house-large"])
@pytest.mark.parametrize("keys", [{"api_key": MADE_UP}, {"api_keys": [MADE_UP, "another-one"]}])
def test_a_made_up_key_for_a_provider_that_checks_none_is_refused(
    gw: Gateway, model: str, keys: dict[str, Any]
) -> None:
    company_id, token = _owner(gw)
    provider = MODELS[model]
    for body in ({**keys, "models": {model: FREE}}, keys):
        response = _put(gw, token, company_id, provider, body)
        assert response.status_code == 422, response.text
        doc = response.json()
        assert doc["error"]["code"] == "validation_error"
        assert doc["message"].startswith("api_key") and "takes no company key" in doc["message"]
    # Nothing was stored, and the model serves at the platform's price.
    listed = gw.client.as_user(token, "GET", f"/v1/admin/companies/{company_id}/providers")
    assert listed.json()["data"]["items"] == []
    _served_at_platform_terms(gw, token, model)
    # Clearing a key (back to the platform's) and the platform-key fields stay allowed.
    body = {"api_key": None, "models": {model: {"max_output_tokens": 6000}}}
    assert _put(gw, token, company_id, provider, body).status_code == 200


@pytest.mark.parametrize("model", ["house-large"])
def test_a_key_stored_before_the_rule_unlocks_nothing(gw: Gateway, model: str) -> None:
    """Rows an older version accepted (a made-up key and a zero price) stop applying:
    the packaged price serves, no company route is sealed, the made-up key is never
    sent, and no new override rides the stored key."""
    company_id, token = _owner(gw)
    provider = MODELS[model]
    engine = create_engine(gw.database_url)
    with Session(engine) as session:
        company_llm.set_provider_keys(session, gw.fernet, company_id, provider, [MADE_UP])
        company_llm.replace_models(session, company_id, provider, {model: FREE})
        session.commit()
    engine.dispose()
    _served_at_platform_terms(gw, token, model)
    models = gw.client.as_user(token, "GET", "/v1/models").json()["data"]["models"]
    (listed,) = [m for m in models if m["id"] == model]
    assert listed["price"]["input_per_mtok"] == "5.0"
    response = _put(gw, token, company_id, provider, {"models": {model: FREE}})
    assert response.status_code == 422, response.text
    assert "own api_key" in response.json()["message"]
    assert micro(gw.client.credits(token)["held"]) == 0


def test_a_provider_called_without_a_key_still_takes_a_companys_key(gw: Gateway) -> None:
    """DESIGN §4: a company brings its own key and overrides; a keyless backend (the
    packaged mock's kind) gets the key, never the platform's service token."""
    company_id, token = _owner(gw)
    body = {"api_key": MADE_UP, "models": {"open-large": FREE}}
    assert _put(gw, token, company_id, "open", body).status_code == 200
    usage, claims = _run(gw, token, "open-large")
    assert ROUTE_CLAIM in claims and usage["cost"] == "0.000000"
    (call,) = gw.backend.calls
    assert call["authorization"] == f"Bearer {MADE_UP}" and call["service_token"] is None


def test_the_service_token_never_rides_a_company_key(gw: Gateway) -> None:
    """The edge's own rule, whatever the control plane sealed: the platform's
    `X-Service-Token` goes with the platform's traffic only."""
    settings = gw.edge_settings
    model = settings.catalog.models["house-large"]
    provider = settings.catalog.providers["inhouse"]
    grant = StreamGrant(
        jti="j", user_id="u", company_id="c", role="member", scopes=("llm:chat:send",),
        session_id="s", model=model.id, max_tokens=50, max_input_tokens=30,
        reservation_id="r", request_id="q", issued_at=0, expires_at=0,
    )  # fmt: skip

    def sent_token(route: Route, key: str | None) -> str | None:
        attempt = Attempt(route, [], {}, 50, 5)
        return upstream_call(attempt, grant, settings, stream=True, key=key).service_token

    assert sent_token(Route(model, provider, None, max_tokens=50), None) == SERVICE_TOKEN
    own = Route(model, provider, MADE_UP, max_tokens=50)
    assert sent_token(own, MADE_UP) is None
    pool = Route(model, provider, MADE_UP, (MADE_UP, "another-one"), max_tokens=50)
    assert sent_token(pool, "another-one") is None
