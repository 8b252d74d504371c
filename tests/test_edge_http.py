"""Edge HTTP details on a real socket: CORS preflight for a browser's POST with
`Authorization`, request ids, readiness, metrics, and OpenAI-shaped 404s."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.stack import InProcessStack, base_env
from tests.token_claims import claims_of

ORIGIN = "http://app.example"


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[InProcessStack]:
    env = {**base_env(f"sqlite:///{tmp_path}/gw.db"), "LLMGW_CORS_ORIGINS": ORIGIN}
    with InProcessStack(env) as running:
        yield running


def test_cors_preflight_for_post_with_authorization(stack: InProcessStack) -> None:
    response = httpx.options(
        f"{stack.client.edge_url}/v1/chat/completions",
        headers={
            "Origin": ORIGIN,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type",
        },
    )
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == ORIGIN
    allowed = response.headers["access-control-allow-headers"].lower()
    assert "authorization" in allowed and "content-type" in allowed
    refused = httpx.options(
        f"{stack.client.edge_url}/v1/chat/completions",
        headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"},
    )
    assert "access-control-allow-origin" not in refused.headers


def test_stream_carries_cors_and_the_init_request_id(stack: InProcessStack) -> None:
    c = stack.client
    token = c.new_user(c.new_company("5"))
    grant = c.init_ok(token, {"query": "cors [[mock tokens=2]]"})
    response = httpx.get(grant["stream_url"], headers={"Origin": ORIGIN})
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == ORIGIN
    claims = claims_of(grant["stream_token"])
    assert response.headers["x-request-id"] == claims["request_id"]


def test_ops_endpoints_and_unknown_paths(stack: InProcessStack) -> None:
    edge = stack.client.edge_url
    assert httpx.get(f"{edge}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{edge}/readyz").json() == {"status": "ok"}
    metrics = httpx.get(f"{edge}/metrics").text
    assert "llmgw_edge_streams_active" in metrics
    missing = httpx.get(f"{edge}/nope", headers={"X-Request-Id": "abc-123"})
    assert missing.status_code == 404
    assert set(missing.json()["error"]) == {"message", "type", "code"}
    assert missing.headers["x-request-id"] == "abc-123"
