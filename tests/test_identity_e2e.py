"""End to end through a real edge: a company's own provider key and its own model
reach the backend through the sealed `upr` claim; revocation ends access; the
answer lands in the chat session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from control_plane.app import create_app as control_plane_app
from llm_gateway.dev import settings_from_env
from mock_llm.app import create_app as mock_app
from shared.store_memory import MemoryStore
from stream_edge.app import create_app as edge_app
from tests.harness import ServerGroup, bind_free_socket, url_of
from tests.stack import Client, base_env

COMPANY_KEY = "sk-company-own-mock-key"


@pytest.fixture
def client(tmp_path: Path) -> Iterator[Client]:
    """Control plane + edge + a mock backend that demands `COMPANY_KEY`; the platform
    has no key for it, so only the company's own key gets through."""
    socks = [bind_free_socket() for _ in range(3)]
    mock_sock, cp_sock, edge_sock = socks
    env = {
        **base_env(f"sqlite:///{tmp_path}/gw.db"),
        "LLMGW_CONTROL_PLANE_URL": url_of(cp_sock),
        "LLMGW_EDGE_PUBLIC_URL": url_of(edge_sock),
        "LLMGW_UPSTREAM_RETRIES": "0",
    }
    settings, edge_settings = settings_from_env(env, mock_url=f"{url_of(mock_sock)}/v1")
    store = MemoryStore()
    apps = [
        (mock_app(api_key=COMPANY_KEY), mock_sock),
        (control_plane_app(settings, store), cp_sock),
        (edge_app(edge_settings, store), edge_sock),
    ]
    handle = Client(
        url_of(cp_sock), url_of(edge_sock), url_of(mock_sock), env["LLMGW_WEBHOOK_SECRET"]
    )
    with ServerGroup(apps):
        try:
            yield handle
        finally:
            handle.close()


def _stream(client: Client, init: dict[str, Any], query: str) -> str:
    api = client.openai(init["stream_token"], max_retries=0)
    chunks = api.chat.completions.create(
        model=init["model"], messages=[{"role": "user", "content": query}], stream=True
    )
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_company_key_and_model_reach_the_backend(client: Client) -> None:
    company_id = client.new_company("10")
    token = client.new_user(company_id, role="owner")

    # The platform has no key for this backend: refused upstream.
    init = client.init_ok(token, {"query": "hello"})
    with pytest.raises(openai.APIStatusError) as info:
        _stream(client, init, "hello")
    assert info.value.status_code == 502

    # With the company's own key and its own model, the stream goes through.
    r = client.as_user(
        token,
        "PUT",
        f"/v1/admin/companies/{company_id}/providers/mock",
        json={
            "api_key": COMPANY_KEY,
            "default_model": "house",
            "models": {
                "house": {
                    "upstream_model": "mock-chat",
                    "context_length": 4096,
                    "max_output_tokens": 64,
                    "price": {"input_per_mtok": "1", "output_per_mtok": "1"},
                }
            },
        },
    )
    assert r.status_code == 200, r.text
    init = client.init_ok(token, {"query": "hello again"})
    assert init["model"] == "house" and init["max_tokens"] == 64
    text = _stream(client, init, "hello again")
    assert text
    usage = client.wait_usage(token, init["reservation_id"])
    assert usage["model"] == "house" and usage["status"] == "completed"

    # The answer is in the session's history.
    session = client.as_user(token, "GET", f"/v1/sessions/{init['session_id']}").json()["data"]
    assert [m["role"] for m in session["messages"]] == ["user", "assistant"]
    assert session["messages"][1]["content"] == text

    # Revoking the company: no new init, and the edge refuses an already-minted token.
    minted = client.init_ok(token, {"query": "one more"})
    r = client.admin("POST", "/v1/admin/revocations", json={"company_id": company_id})
    assert r.status_code == 201, r.text
    assert client.init(token, {"query": "x"}).status_code == 403
    with pytest.raises(openai.APIStatusError) as info:
        _stream(client, minted, "one more")
    assert info.value.status_code == 401
