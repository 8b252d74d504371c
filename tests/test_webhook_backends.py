"""A backend's own usage-webhook secret (DESIGN §11, LLMGW_BACKEND_WEBHOOK_SECRETS):
rotatable, and scoped so that it settles only reservations routed to its provider,
and takes no other stream's webhook id. Through a real control plane (uvicorn socket,
SQLite + memory store, and PostgreSQL + Redis, whose lone webhook records its id and
settles in one statement)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from shared.pricing import MICRO
from shared.webhooks import sign
from tests.conftest import new_webhook_secret
from tests.test_control_plane import (
    CP,
    assert_books_balance,
    credits_of,
    data_of,
    error_of,
    micro,
    start_cp,
    usage_event,
)
from tests.token_claims import jti_of

MOCK_NEW, MOCK_OLD, OPENAI = (new_webhook_secret() for _ in range(3))


@pytest.fixture(params=["sqlite", "postgres"])
def cp(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[CP]:
    secrets = f"mock={MOCK_NEW},mock={MOCK_OLD},openai={OPENAI}"
    extra = {"LLMGW_BACKEND_WEBHOOK_SECRETS": secrets}
    with start_cp(request, tmp_path, request.param, extra) as handle:
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


def _routed_to_mock_with_an_openai_fallback(
    cp: CP,
) -> tuple[httpx.Client, str, dict[str, Any], dict[str, str]]:
    """A new company whose `mock-fast` falls back to openai's `gpt-4o-mini`, and an
    init of it: the owner's client, the company's id, the init, its credits after."""
    client, company_id = cp.owner_client("10")
    chain = {"models": {"mock-fast": {"fallbacks": ["gpt-4o-mini"]}}}
    put = client.put(f"/v1/admin/companies/{company_id}/providers/mock", json=chain)
    assert put.status_code == 200, put.text
    init = data_of(client.post("/v1/chat/init", json={"model": "mock-fast", "query": "hi"}), 201)
    return client, company_id, init, credits_of(client)


def test_a_backend_secret_cannot_settle_at_another_providers_fallback(cp: CP) -> None:
    """The reservation is routed to `mock`, with an `openai` model in its chain: the
    mock's backend may not report that fallback as served (it did not serve it), nor
    may openai's backend settle a reservation routed elsewhere; the edge may."""
    client, company_id, init, before = _routed_to_mock_with_an_openai_fallback(cp)
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


def test_a_backend_cannot_squat_another_streams_webhook_id(cp: CP) -> None:
    """The `mock` backend reports its own stream (routed to it) under the id the edge
    will use for another company's stream, `usage_<that jti>`. Before the fix this
    settled its own stream and recorded the id for it: the edge's real report of the
    victim's stream was then a 409 (dead-lettered by the edge's outbox), the sweeper
    released the victim's hold unbilled at the deadline (or billed its checkpoint
    only) and the reply never reached the victim's session."""
    victim, victim_company = cp.owner_client("10")
    own, own_company = cp.owner_client("10")
    target = data_of(victim.post("/v1/chat/init", json={"query": "hi"}), 201)
    init = data_of(own.post("/v1/chat/init", json={"query": "hi"}), 201)
    held = credits_of(own)
    squatting = usage_event(init, own_company, output_tokens=1)
    body = squatting.body()
    for secret in (MOCK_NEW, MOCK_OLD):
        squat = post(cp, body, sign(secret, f"usage_{jti_of(target['stream_token'])}", body))
        error_of(squat, 422, "validation_error")
    assert credits_of(own) == held  # refused: nothing settled, no id recorded
    # The edge's report of the victim's stream settles, with its reply.
    report = usage_event(target, victim_company, output_tokens=64, content="Hello victim")
    settled = data_of(cp.webhook(report))
    assert settled["settled"] is True
    assert micro(credits_of(victim)["balance"]) < 10 * MICRO
    messages = data_of(victim.get(f"/v1/sessions/{target['session_id']}"))["messages"]
    assert messages[-1]["content"] == "Hello victim"
    # The backend's report under its own stream's id is still taken (DESIGN §7).
    assert data_of(post(cp, body, sign(MOCK_NEW, squatting.webhook_id, body)))["settled"]
    assert_books_balance(cp, victim_company, victim)
    assert_books_balance(cp, own_company, own)


def test_a_backend_cannot_preempt_a_fallback_the_edge_reports(cp: CP) -> None:
    """The reservation is routed to `mock` with an `openai` model in its chain. The
    mock backend failed its attempt (or said so) and reports the stream as failed,
    billed 0, under the stream's own id; the edge fell back to openai, which answered.
    Before the fix the backend's report settled first at 0 and the edge's report of
    the fallback's whole answer was a duplicate: a free answer from another provider.
    A backend settles only streams that nobody else can have served."""
    client, company_id, init, before = _routed_to_mock_with_an_openai_fallback(cp)
    failed = usage_event(init, company_id, status="failed", finish_reason=None,
                         input_tokens=0, output_tokens=0, content=None)  # fmt: skip
    body = failed.body()
    refused = post(cp, body, sign(MOCK_NEW, failed.webhook_id, body))
    error_of(refused, 403, "webhook_provider_mismatch")
    assert credits_of(client) == before
    served = usage_event(init, company_id, model="gpt-4o-mini", provider="openai",
                         fallback_from="mock-fast", output_tokens=64)  # fmt: skip
    assert data_of(cp.webhook(served))["settled"] is True
    assert micro(credits_of(client)["balance"]) < 10 * MICRO
    [record] = data_of(client.get("/v1/usage"))["items"]
    assert (record["model"], record["output_tokens"]) == ("gpt-4o-mini", 64)
    assert_books_balance(cp, company_id, client)
