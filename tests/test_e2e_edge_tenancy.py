"""The edge's side of tenancy: revocations end running streams within 2 s and refuse
new ones, and a company's own upstream route (sealed in the token) is used without
asking the control plane (PostgreSQL + Redis)."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from shared.revocations import revoke
from shared.route_claim import UpstreamRoute, route_ciphers, seal
from shared.sse import SSEDecoder
from shared.store_redis import RedisStore
from shared.tokens import sign_token
from shared.webhooks import secret_bytes
from tests.conftest import REDIS_URL
from tests.stack import SplitStack, postgres_env
from tests.token_claims import claims_of


@pytest.fixture(scope="module")
def split(pg_server: str) -> Iterator[SplitStack]:
    env_extra = {"LLMGW_WEBHOOK_RETRY_BASE_SECONDS": "0.05"}
    with postgres_env(pg_server) as env, SplitStack({**env, **env_extra}) as stack:
        yield stack


def store_revoke(split: SplitStack, kind: str, value: str, company_id: str) -> None:
    async def go() -> None:
        store = RedisStore.from_url(REDIS_URL, prefix=split.env["LLMGW_REDIS_PREFIX"])
        try:
            await revoke(store, kind, value, company_id, 600)
        finally:
            await store.close()

    asyncio.run(go())


@pytest.mark.parametrize("kind", ["jti", "user", "company"])
def test_revocation_ends_a_running_stream_within_two_seconds(split: SplitStack, kind: str) -> None:
    c = split.client
    token = c.new_user(c.new_company("5"))
    grant = c.init_ok(token, {"query": "long [[mock tokens=500 delay_ms=20]]"})
    claims = claims_of(grant["stream_token"])
    value = {"jti": claims["jti"], "user": claims["sub"], "company": claims["company_id"]}[kind]
    decoder = SSEDecoder()
    events = []
    revoked_at = None
    with httpx.stream("GET", grant["stream_url"], timeout=10) as response:
        for raw in response.iter_raw():
            events.extend(decoder.feed(raw))
            if revoked_at is None and sum(e.event == "chunk" for e in events) >= 5:
                store_revoke(split, kind, value, claims["company_id"])
                revoked_at = time.monotonic()
    assert revoked_at is not None
    assert time.monotonic() - revoked_at < 2.0
    assert events[-1].event == "error"
    assert json.loads(events[-1].data)["code"] == "revoked"
    record = c.wait_usage(token, grant["reservation_id"])
    assert record["status"] == "revoked"
    assert 5 <= record["output_tokens"] < 500  # what was relayed is billed

    # A new stream for the same user/company (or the same token) is refused at once.
    if kind != "jti":
        before = c.mock_stats()["requests"]
        fresh = c.init(token, {"query": "again"})
        if fresh.status_code == 201:  # the control plane may refuse first; the edge must
            response = c.http.get(fresh.json()["data"]["stream_url"])
            assert response.status_code == 401
            assert response.json()["error"]["code"] == "revoked"
        assert c.mock_stats()["requests"] == before


@pytest.mark.parametrize("kind", ["jti", "user", "company"])
def test_a_revocation_ends_a_resumed_stream_on_another_edge_too(
    split: SplitStack, kind: str
) -> None:
    """Attack: the client drops and resumes (here on the second edge), then its user,
    company or token is revoked. Before the fix the follower had no grant for the
    watcher to check, and the producer, its client gone, ignored the revocation: the
    follower read 991 more events over 31 s and the answer was billed `completed`.
    Now both end at the next check, the follower with the producer's `revoked` event."""
    c = split.client
    token = c.new_user(c.new_company("5"))
    grant = c.init_ok(token, {"query": "resume me [[mock tokens=1000 delay_ms=30]]"})
    claims = claims_of(grant["stream_token"])
    value = {"jti": claims["jti"], "user": claims["sub"], "company": claims["company_id"]}[kind]
    cancelled_before = c.mock_stats()["cancelled"]
    split.start("edge2")
    try:
        decoder = SSEDecoder()
        head: list[Any] = []
        with httpx.stream("GET", grant["stream_url"], timeout=10) as first:
            for raw in first.iter_raw():
                head.extend(decoder.feed(raw))
                if sum(e.event == "chunk" for e in head) >= 5:
                    break
        other = grant["stream_url"].replace(c.edge_url, split.url("edge2"))
        decoder = SSEDecoder()
        tail: list[Any] = []
        after_revocation = None
        with httpx.stream("GET", other, headers={"Last-Event-ID": head[-1].id}, timeout=10) as r:
            assert r.status_code == 200
            for raw in r.iter_raw():
                tail.extend(decoder.feed(raw))
                if after_revocation is None and len(tail) >= 5:
                    if kind == "jti":  # through the control plane's API, as an owner would
                        answer = c.admin("POST", "/v1/admin/revocations", json={"jti": value})
                        assert answer.status_code == 201, answer.text
                    else:
                        store_revoke(split, kind, value, claims["company_id"])
                    after_revocation = len(tail)
        assert after_revocation is not None
        # Ended at the next check (1 s, ~33 tokens), far from the ~30 s left to run.
        assert len(tail) - after_revocation < 200
        assert tail[-1].event == "error"
        assert json.loads(tail[-1].data)["code"] == "revoked"
        assert int(tail[-1].id) == int(tail[-2].id) + 1  # numbered on, like the producer's
        record = c.wait_usage(token, grant["reservation_id"]) if kind == "jti" else None
        if record is not None:
            assert record["status"] == "revoked"
            assert record["output_tokens"] < 1000
        # The backend was stopped, not left to run its answer out for nobody.
        deadline = time.monotonic() + 10
        while c.mock_stats()["cancelled"] == cancelled_before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert c.mock_stats()["cancelled"] == cancelled_before + 1
        # The revoked token cannot resume again, on either edge.
        again = c.http.get(other, headers={"Last-Event-ID": tail[-1].id})
        assert again.status_code == 401 and again.json()["error"]["code"] == "revoked"
    finally:
        split.stop("edge2")


def test_a_sealed_company_route_is_used_with_the_companys_key(split: SplitStack) -> None:
    c = split.client
    token = c.new_user(c.new_company("5"))
    grant = c.init_ok(token, {"query": "my own key [[mock tokens=3]]"})
    kid, key = split.apps["cp"].state.keyring.active()
    cipher = route_ciphers(split.env["LLMGW_ENCRYPTION_KEY"].split(","))
    route = UpstreamRoute(
        provider="acme-openai",
        api_type="openai_chat",
        base_url=split.mock_url,
        upstream_model="mock-fast",
        api_key="sk-company-own-key",
    )
    claims = {**claims_of(grant["stream_token"]), "upr": seal(route, cipher)}
    sealed_token = sign_token(claims, key, kid)
    response = c.http.get(f"{c.edge_url}/v1/stream", params={"token": sealed_token})
    assert response.status_code == 200 and b"event: complete" in response.content
    recorded = c.http.get(f"{split.mock_url.removesuffix('/v1')}/_mock/requests").json()
    last = recorded["requests"][-1]
    assert last["headers"]["authorization"] == "Bearer sk-company-own-key"
    assert "sk-company-own-key" not in json.dumps(claims_of(sealed_token))  # sealed, unreadable
    record = c.wait_usage(token, grant["reservation_id"])
    assert (record["status"], record["output_tokens"]) == ("completed", 3)


def test_a_route_claim_not_sealed_by_us_is_refused(split: SplitStack) -> None:
    c = split.client
    token = c.new_user(c.new_company("5"))
    grant = c.init_ok(token, {"query": "forged route"})
    kid, key = split.apps["cp"].state.keyring.active()
    foreign = route_ciphers([Fernet.generate_key().decode()])
    route = UpstreamRoute("evil", "openai_chat", "http://127.0.0.1:9/v1", "x", "k")
    claims = {**claims_of(grant["stream_token"]), "upr": seal(route, foreign)}
    before = c.mock_stats()["requests"]
    response = c.http.get(f"{c.edge_url}/v1/stream", params={"token": sign_token(claims, key, kid)})
    assert response.status_code == 401
    assert c.mock_stats()["requests"] == before


def webhook_secret_cipher(webhook_secret: str) -> Fernet:
    """What a holder of the webhook secret can derive (the key `upr` once used)."""
    key = HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None, info=b"llm-gateway upstream route"
    ).derive(secret_bytes(webhook_secret))
    return Fernet(base64.urlsafe_b64encode(key))


def test_the_webhook_secret_neither_opens_nor_forges_a_route(split: SplitStack) -> None:
    """11.3: the webhook secret is shared with whoever signs usage events; it must not
    open a company's provider key from a token, nor seal a route the edge accepts."""
    c = split.client
    token = c.new_user(c.new_company("5"))
    grant = c.init_ok(token, {"query": "webhook secret holder"})
    kid, key = split.apps["cp"].state.keyring.active()
    attacker = webhook_secret_cipher(split.env["LLMGW_WEBHOOK_SECRET"])
    route = UpstreamRoute("evil", "openai_chat", "http://127.0.0.1:9/v1", "x", "k")
    claims = {**claims_of(grant["stream_token"]), "upr": seal(route, attacker)}
    before = c.mock_stats()["requests"]
    response = c.http.get(f"{c.edge_url}/v1/stream", params={"token": sign_token(claims, key, kid)})
    assert response.status_code == 401
    assert c.mock_stats()["requests"] == before
    # The other way: a route our control plane sealed does not open with it.
    real = seal(route, route_ciphers(split.env["LLMGW_ENCRYPTION_KEY"].split(",")))
    with pytest.raises(InvalidToken):
        attacker.decrypt(real.encode())


def test_tenant_chosen_model_and_provider_names_never_become_metric_labels(
    split: SplitStack,
) -> None:
    """11.16: a company names its own models and providers; as label values they
    would let one tenant mint unbounded Prometheus series. They show as `custom`."""
    c = split.client
    token = c.new_user(c.new_company("5"))
    kid, key = split.apps["cp"].state.keyring.active()
    cipher = route_ciphers(split.env["LLMGW_ENCRYPTION_KEY"].split(","))
    tenant_names = []

    def reported() -> float:
        text = c.http.get(f"{c.edge_url}/metrics").text
        lines = [line for line in text.splitlines() if line.startswith("llmgw_edge_streams_total")]
        return sum(float(line.rsplit(" ", 1)[1]) for line in lines)

    for n, base_url in enumerate((split.mock_url, "http://127.0.0.1:9/v1")):  # ok, refused
        grant = c.init_ok(token, {"query": "labels [[mock tokens=2]]"})
        before = reported()
        provider, model = f"tenant-provider-{n}-{time.time_ns()}", f"tenant-model-{n}"
        tenant_names += [provider, model]
        route = UpstreamRoute(provider, "openai_chat", base_url, "mock-fast", "sk-own")
        claims = {**claims_of(grant["stream_token"]), "model": model, "upr": seal(route, cipher)}
        c.http.get(f"{c.edge_url}/v1/stream", params={"token": sign_token(claims, key, kid)})
        # The edge reported the stream. (Its webhook names a model the reservation never
        # had, which settlement refuses since issue 16.2: this token is forged.)
        deadline = time.monotonic() + 15
        while reported() == before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert reported() > before
    metrics = c.http.get(f"{c.edge_url}/metrics").text
    assert not [name for name in tenant_names if name in metrics]
    assert 'model="custom",provider="custom"' in metrics  # the TTFT of the first stream
    assert 'llmgw_edge_upstream_errors_total{kind="upstream_error",provider="custom"}' in metrics
