"""A backend's own usage-webhook secret (DESIGN §11, LLMGW_BACKEND_WEBHOOK_SECRETS):
rotatable, and scoped so that it settles only reservations routed to its provider.
Through a real control plane (uvicorn socket, SQLite)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from shared.webhooks import sign
from tests.conftest import new_webhook_secret
from tests.test_control_plane import (
    CP,
    assert_books_balance,
    credits_of,
    data_of,
    error_of,
    start_cp,
    usage_event,
)

MOCK_NEW, MOCK_OLD, OPENAI = (new_webhook_secret() for _ in range(3))


@pytest.fixture
def cp(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[CP]:
    secrets = f"mock={MOCK_NEW},mock={MOCK_OLD},openai={OPENAI}"
    extra = {"LLMGW_BACKEND_WEBHOOK_SECRETS": secrets}
    with start_cp(request, tmp_path, "sqlite", extra) as handle:
        yield handle


def post(cp: CP, body: bytes, headers: dict[str, str]) -> httpx.Response:
    return httpx.post(f"{cp.url}/v1/webhooks/usage", content=body, headers=headers)


def test_a_backend_secret_settles_only_its_own_providers_reservations(cp: CP) -> None:
    client, company_id = cp.owner_client("10")
    init = data_of(client.post("/v1/chat/init", json={"model": "mock-fast", "query": "hi"}), 201)
    before = credits_of(client)
    assert before["held"] == init["reserved_credits"]
    # The attack: another provider's backend reports the stream as failed (billed 0).
    forged = usage_event(init, company_id, status="failed", output_tokens=0, content=None)
    body = forged.body()
    error_of(
        post(cp, body, sign(OPENAI, forged.webhook_id, body)), 403, "webhook_provider_mismatch"
    )
    # A secret nobody configured is a bad signature, as before.
    error_of(
        post(cp, body, sign(new_webhook_secret(), forged.webhook_id, body)),
        401,
        "invalid_signature",
    )
    assert credits_of(client) == before  # nothing settled, nothing recorded
    assert data_of(client.get("/v1/usage"))["items"] == []
    # The routed provider's backend, with the older of its two secrets (mid-rotation).
    event = usage_event(init, company_id, output_tokens=10)
    body = event.body()
    settled = data_of(post(cp, body, sign(MOCK_OLD, event.webhook_id, body)))
    assert settled["settled"] is True
    # The edge's later report of the same stream (platform secret) is a duplicate.
    again = sign(cp.settings.webhook_secret.reveal(), event.webhook_id, body)
    assert data_of(post(cp, body, again)) == {"duplicate": True}
    assert credits_of(client)["held"] == "0.000000"
    assert_books_balance(cp, company_id, client)


def test_a_backend_secret_cannot_settle_at_another_providers_fallback(cp: CP) -> None:
    """The reservation is routed to `mock`, with an `openai` model in its chain: the
    mock's backend may not report that fallback as served (it did not serve it), nor
    may openai's backend settle a reservation routed elsewhere; the edge may."""
    client, company_id = cp.owner_client("10")
    chain = {"models": {"mock-fast": {"fallbacks": ["gpt-4o-mini"]}}}
    put = client.put(f"/v1/admin/companies/{company_id}/providers/mock", json=chain)
    assert put.status_code == 200, put.text
    init = data_of(client.post("/v1/chat/init", json={"model": "mock-fast", "query": "hi"}), 201)
    before = credits_of(client)
    served = usage_event(init, company_id, model="gpt-4o-mini", provider="openai",
                         fallback_from="mock-fast", output_tokens=3)  # fmt: skip
    body = served.body()
    for secret in (MOCK_NEW, OPENAI):
        refused = post(cp, body, sign(secret, served.webhook_id, body))
        error_of(refused, 403, "webhook_provider_mismatch")
    assert credits_of(client) == before
    assert data_of(client.get("/v1/usage"))["items"] == []
    edge = sign(cp.settings.webhook_secret.reveal(), served.webhook_id, body)
    assert data_of(post(cp, body, edge))["settled"] is True
    [record] = data_of(client.get("/v1/usage"))["items"]
    assert record["model"] == "gpt-4o-mini"
    assert_books_balance(cp, company_id, client)
