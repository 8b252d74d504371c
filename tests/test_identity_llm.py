"""Per-company LLM configuration: provider keys (encrypted, never returned), model
overrides and additions, the company's catalog, and what init does with them."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from cryptography.fernet import Fernet
from sqlalchemy import select

from control_plane.chat_init import plan_hold
from control_plane.company_llm import company_catalog, merge_model, parse_models, replace_models
from control_plane.errors import ValidationFailed
from control_plane.tables import CompanyModel, CompanyProvider, SigningKey
from shared.catalog import CatalogError, load_catalog
from shared.key_pool import key_id
from shared.pricing import estimate_input_tokens
from shared.route_claim import CLAIM, route_ciphers, unseal
from tests.test_control_plane import (
    CP,
    cp,
    data_of,
    error_of,
    sqlite_only,
)
from tests.test_identity_owners import _at_once, pg_cp
from tests.token_claims import claims_of

__all__ = ["cp", "pg_cp"]  # the fixtures shared with test_control_plane, test_identity_owners

CATALOG = load_catalog(None)


def _route(cp: CP, init: dict[str, Any]) -> Any:
    claims = claims_of(init["stream_token"])
    if CLAIM not in claims:
        return None
    keys = [k.reveal() for k in cp.settings.encryption_keys]
    return unseal(claims[CLAIM], route_ciphers(keys))


# --- pure -----------------------------------------------------------------------------


def test_merge_model_overrides_fields_and_prices() -> None:
    base = CATALOG.models["gpt-4o-mini"]
    merged = merge_model(base, base.id, "openrouter", {"price": {"input_per_mtok": "0.2"}})
    assert merged.provider == "openrouter" and merged.upstream_model == "gpt-4o-mini"
    assert str(merged.price.input_per_mtok) == "0.2"
    assert merged.price.output_per_mtok == base.price.output_per_mtok
    with pytest.raises(CatalogError, match="context_length"):
        merge_model(None, "new", "openai", {"max_output_tokens": 5, "price": {}})


@pytest.mark.parametrize(
    ("models", "field"),
    [
        ([], "models"),
        ({"x y": {}}, "models.x y"),
        ({"m": []}, "models.m"),
        ({"m": {"colour": "red"}}, "models.m.colour"),
        ({"mock-fast": {"provider": "openai"}}, "models.mock-fast.provider"),
        ({"mock-fast": {"context_length": -1}}, "models.mock-fast"),
        ({"mock-fast": {"enabled": "no"}}, "models.mock-fast.enabled"),
        ({"brand-new": {"context_length": 10}}, "models.brand-new"),  # no price
        ({"mock-fast": {"price": {"input_per_mtok": "x"}}}, "models.mock-fast"),
    ],
)
def test_parse_models_rejects(models: Any, field: str) -> None:
    with pytest.raises(ValidationFailed) as info:
        parse_models(models, "mock", CATALOG)
    assert info.value.field == field


def test_company_catalog_merges_adds_and_hides() -> None:
    rows = [
        CompanyModel(model_id="mock-fast", provider="mock", spec={"context_length": 4096}),
        CompanyModel(model_id="mock-chat", provider="mock", spec={"enabled": False}),
        CompanyModel(
            model_id="mine",
            provider="openai",
            spec={
                "upstream_model": "gpt-x",
                "context_length": 1000,
                "max_output_tokens": 100,
                "features": ["streaming", "tools"],
                "price": {"input_per_mtok": 1, "output_per_mtok": 2},
            },
        ),
    ]
    view = company_catalog(CATALOG, rows, "mock-chat", frozenset({"openai"}))
    assert view.models["mock-fast"].context_length == 4096
    assert "mock-chat" not in view.models and view.disabled == {"mock-chat"}
    assert view.models["mine"].upstream_model == "gpt-x"
    assert view.custom == {"mock-fast", "mine"}
    assert view.default_model == CATALOG.default_model  # its default is hidden
    # Without the company's own openai key its model is not there; limits still apply.
    view = company_catalog(CATALOG, rows, None)
    assert "mine" not in view.models and view.models["mock-fast"].context_length == 4096


# --- over HTTP ------------------------------------------------------------------------


def test_provider_key_is_encrypted_never_returned_and_routes_the_stream(cp: CP) -> None:
    client, company_id = cp.owner_client("10")
    secret_key = "sk-company-own-" + "z" * 20
    r = client.put(
        f"/v1/admin/companies/{company_id}/providers/openai", json={"api_key": secret_key}
    )
    data = data_of(r)
    assert data == {
        "provider": "openai",
        "has_key": True,
        # A key shows by its id (a hash prefix) and state only (issue 16.1).
        "keys": [{"id": key_id(secret_key), "state": "ok"}],
        "default_model": "mock-fast",
        "models": [],
    }
    assert secret_key not in r.text
    listed = client.get(f"/v1/admin/companies/{company_id}/providers")
    assert secret_key not in listed.text
    assert data_of(listed)["items"][0]["has_key"] is True

    # Stored encrypted.
    db = cp.app.state.db
    rows = cp.on_loop(lambda: db.transaction(lambda s: list(s.scalars(select(CompanyProvider)))))
    assert rows and all(secret_key not in (r.api_key_encrypted or "") for r in rows)

    # A model of that provider gets the sealed route with the company's key ...
    init = data_of(
        client.post(
            "/v1/chat/init",
            json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
        ),
        201,
    )
    route = _route(cp, init)
    assert route.api_key == secret_key and route.provider == "openai"
    assert route.base_url == "https://api.openai.com/v1" and route.upstream_model == "gpt-4o-mini"
    assert secret_key not in init["stream_token"]
    # ... a model of another provider does not.
    init = data_of(client.post("/v1/chat/init", json={"query": "hi"}), 201)
    assert _route(cp, init) is None

    # Removing the key: back to the platform's.
    r = client.put(f"/v1/admin/companies/{company_id}/providers/openai", json={"api_key": None})
    assert data_of(r)["has_key"] is False
    init = data_of(client.post("/v1/chat/init", json={"model": "gpt-4o-mini", "query": "x"}), 201)
    assert _route(cp, init) is None


def test_two_provider_changes_at_once_both_answer(pg_cp: CP) -> None:
    """Attack: an owner sends the same provider change twice at once (a double click,
    a retrying script). Each found no row for the provider (or the model) and added
    one: the second insert broke the unique constraint and answered 500 (measured on
    PostgreSQL: 200 and 500 ``internal_error``). The changes now queue on the
    company's row, so the second sees the first's rows and updates them."""
    client, company_id = pg_cp.owner_client("10")
    path = f"/v1/admin/companies/{company_id}/providers/openai"
    own = {"upstream_model": "gpt-4o", "context_length": 1000, "max_output_tokens": 100}
    own["price"] = {"input_per_mtok": "1", "output_per_mtok": "2"}
    body = {"api_key": "sk-company-own-" + "z" * 20, "models": {"mine": own}}
    body["default_model"] = "mine"  # the company's row: both requests meet it
    answers = _at_once(pg_cp, company_id, [lambda: client.put(path, json=body)] * 2)
    assert [r.status_code for r in answers] == [200, 200], [r.text for r in answers]
    (view,) = data_of(client.get(f"/v1/admin/companies/{company_id}/providers"))["items"]
    assert view["has_key"] is True and [m["id"] for m in view["models"]] == ["mine"]


@sqlite_only
def test_company_models_default_model_and_init_checks(cp: CP) -> None:
    client, company_id = cp.owner_client("10")
    other, _ = cp.owner_client("10")
    body = {
        "api_key": "sk-company-mock-key",
        "default_model": "house",
        "models": {
            "house": {
                "upstream_model": "mock-chat",
                "context_length": 300,
                "max_output_tokens": 64,
                "features": ["streaming"],
                "price": {"input_per_mtok": "1", "output_per_mtok": "1"},
            },
            "mock-chat": {"enabled": False},
        },
    }
    data = data_of(client.put(f"/v1/admin/companies/{company_id}/providers/mock", json=body))
    assert data["has_key"] is True and data["default_model"] == "house"
    assert {m["id"]: m["enabled"] for m in data["models"]} == {"house": True, "mock-chat": False}

    models = data_of(client.get("/v1/models"))
    ids = [m["id"] for m in models["models"]]
    assert models["default_model"] == "house" and "house" in ids and "mock-chat" not in ids
    assert [m["id"] for m in data_of(client.get("/v1/models?provider=openai"))["models"]] == [
        "gpt-4o-mini"
    ]
    # Other companies see the packaged catalog.
    assert "house" not in [m["id"] for m in data_of(other.get("/v1/models"))["models"]]
    error_of(
        other.post("/v1/chat/init", json={"model": "house", "query": "x"}), 404, "model_not_found"
    )

    # The company's default is its own model, routed by a sealed claim with its key.
    init = data_of(client.post("/v1/chat/init", json={"query": "hello"}), 201)
    assert init["model"] == "house" and init["max_tokens"] == 64
    route = _route(cp, init)
    assert route.upstream_model == "mock-chat" and route.api_key == "sk-company-mock-key"
    assert route.base_url == "http://127.0.0.1:8002/v1"

    # A hidden model is refused; a feature the model lacks is refused.
    error_of(
        client.post("/v1/chat/init", json={"model": "mock-chat", "query": "x"}),
        403,
        "model_not_allowed",
    )
    tools = [{"type": "function", "function": {"name": "f"}}]
    error_of(
        client.post("/v1/chat/init", json={"query": "x", "tools": tools}),
        422,
        "unsupported_feature",
    )
    error_of(
        client.post("/v1/chat/init", json={"query": "x", "features": ["vision"]}),
        422,
        "unsupported_feature",
    )
    ok = data_of(
        client.post("/v1/chat/init", json={"model": "gpt-4o-mini", "query": "x", "tools": tools}),
        201,
    )
    assert ok["model"] == "gpt-4o-mini"

    # The input is fitted to the context: a long session history is trimmed from the
    # oldest turn, the default output budget shrinks to what is left.
    first = data_of(client.post("/v1/chat/init", json={"query": "a" * 750}), 201)
    estimate = estimate_input_tokens([{"role": "user", "content": "a" * 750}])
    assert first["max_tokens"] == 300 - estimate < 64
    error_of(client.post("/v1/chat/init", json={"query": "b" * 900}), 413, "input_too_large")
    follow = data_of(
        client.post("/v1/chat/init", json={"query": "c" * 500, "session_id": first["session_id"]}),
        201,
    )
    assert follow["session_id"] == first["session_id"]

    # Validation and permissions.
    error_of(
        client.put(f"/v1/admin/companies/{company_id}/providers/nope", json={}), 404, "not_found"
    )
    error_of(
        client.put(f"/v1/admin/companies/{company_id}/providers/mock", json={"default_model": "x"}),
        422,
        "validation_error",
    )
    error_of(
        client.put(f"/v1/admin/companies/{company_id}/providers/mock", json={"api_key": 5}),
        422,
        "validation_error",
    )
    error_of(
        other.put(f"/v1/admin/companies/{company_id}/providers/mock", json={"api_key": "k"}),
        404,
        "not_found",
    )
    member = cp.user(company_id, role="member", password=None)
    member_client = cp.client(cp.api_key(member["id"]))
    error_of(
        member_client.put(f"/v1/admin/companies/{company_id}/providers/mock", json={}),
        404,
        "not_found",
    )
    # Deleting the provider's configuration restores the packaged view.
    assert client.delete(f"/v1/admin/companies/{company_id}/providers/mock").status_code == 204
    assert "mock-chat" in [m["id"] for m in data_of(client.get("/v1/models"))["models"]]


@sqlite_only
def test_encryption_key_rotation_reencrypts_stored_secrets(cp: CP) -> None:
    client, company_id = cp.owner_client("10")
    data_of(
        client.put(
            f"/v1/admin/companies/{company_id}/providers/openai", json={"api_key": "sk-old-key"}
        )
    )
    # Platform admin only.
    error_of(client.post("/v1/admin/encryption-keys/rotate"), 403, "forbidden")
    # Put a new key first (as an operator would in LLMGW_ENCRYPTION_KEY) and rotate.
    from cryptography.fernet import MultiFernet

    old = cp.app.state.deps.fernet
    new_key = Fernet(Fernet.generate_key())
    cp.app.state.deps.fernet = MultiFernet([new_key, *old._fernets])
    done = data_of(cp.admin.post("/v1/admin/encryption-keys/rotate"), 201)
    assert done["provider_keys"] == 1 and done["signing_keys"] >= 1 and done["failed"] == []
    db = cp.app.state.db

    def rows(s: Any) -> list[str]:
        keys = [r.api_key_encrypted for r in s.scalars(select(CompanyProvider))]
        keys += [r.private_key_encrypted for r in s.scalars(select(SigningKey))]
        return keys

    # Everything now decrypts with the new key alone.
    for token in cp.on_loop(lambda: db.transaction(rows)):
        new_key.decrypt(token.encode())
    cp.app.state.deps.fernet = MultiFernet([new_key])
    init = data_of(client.post("/v1/chat/init", json={"model": "gpt-4o-mini", "query": "x"}), 201)
    assert _route(cp, init).api_key == "sk-old-key"


# --- limits a reservation cannot hold (review 3A, finding 6) ------------------------

HUGE = [2**31, 2**53, 2**63 - 1, 2**64 - 1]


def _put_limits(client: Any, company_id: str, provider: str, model: str, value: int) -> Any:
    """Both limits at `value` (raw JSON: an integer past 2**63 goes as written); on
    openai with the company's own key."""
    body = b'{"api_key": "sk-own-openai-key", ' if provider == "openai" else b"{"
    body += b'"models": {"%s": {"max_output_tokens": %d, "context_length": %d}}}' % (
        model.encode(),
        value,
        value,
    )
    return client.put(
        f"/v1/admin/companies/{company_id}/providers/{provider}",
        content=body,
        headers={"content-type": "application/json"},
    )


@pytest.mark.parametrize("value", HUGE)
def test_limits_past_a_reservations_columns_are_refused(cp: CP, value: int) -> None:
    """Such a limit, once stored, made every later init on the model a 500 (integer
    out of range): refused at PUT, on the platform's key and on the company's own."""
    client, company_id = cp.owner_client("1000000")
    for provider, model in (("mock", "mock-fast"), ("openai", "gpt-4o-mini")):
        response = _put_limits(client, company_id, provider, model, value)
        message = error_of(response, 422, "validation_error")
        assert message.startswith(f"models.{model}") and str(2**31 - 1) in message
    assert data_of(client.get(f"/v1/admin/companies/{company_id}/providers"))["items"] == []
    init = data_of(client.post("/v1/chat/init", json={"query": "hi"}), 201)
    assert init["model"] == "mock-fast" and init["max_tokens"] == 1024


def test_the_largest_limits_on_a_companys_own_key_still_init(cp: CP) -> None:
    """At the cap, on the company's own key: the default output budget fits the
    reservation (the hold is huge, and paid for)."""
    client, company_id = cp.owner_client("1000000")
    data_of(_put_limits(client, company_id, "openai", "gpt-4o-mini", 2**31 - 1))
    init = data_of(client.post("/v1/chat/init", json={"model": "gpt-4o-mini", "query": "hi"}), 201)
    assert 2**31 - 100 < init["max_tokens"] < 2**31


def test_platform_key_limits_stay_within_the_packaged_models(cp: CP) -> None:
    client, company_id = cp.owner_client("10")
    path = f"/v1/admin/companies/{company_id}/providers/mock"
    for field, value in (("max_output_tokens", 1025), ("context_length", 8193)):
        r = client.put(path, json={"models": {"mock-fast": {field: value}}})
        message = error_of(r, 422, "validation_error")
        assert message.startswith(f"models.mock-fast.{field}") and "platform's key" in message
    assert data_of(client.get(f"/v1/admin/companies/{company_id}/providers"))["items"] == []
    limits = {"max_output_tokens": 1024, "context_length": 4096}
    data_of(client.put(path, json={"models": {"mock-fast": limits}}))
    init = data_of(client.post("/v1/chat/init", json={"query": "hi"}), 201)
    assert init["max_tokens"] == 1024


@pytest.mark.parametrize("value", [2**31 - 1, *HUGE])
def test_limits_stored_before_the_caps_do_not_break_init(cp: CP, value: int) -> None:
    """Rows an older version accepted: on the platform's key the packaged limits
    apply; past the columns the override is ignored. Init answers either way."""
    client, company_id = cp.owner_client("10")
    limits = {"max_output_tokens": value, "context_length": value}

    def store(session: Any) -> None:
        replace_models(session, company_id, "mock", {"mock-fast": limits})

    cp.on_loop(lambda: cp.app.state.db.transaction(store))
    init = data_of(client.post("/v1/chat/init", json={"query": "hi"}), 201)
    assert init["model"] == "mock-fast" and init["max_tokens"] == 1024
    listed = data_of(client.get("/v1/models"))["models"]
    (fast,) = [m for m in listed if m["id"] == "mock-fast"]
    assert (fast["context_length"], fast["max_output_tokens"]) == (8192, 1024)


def test_the_default_output_budget_fits_a_reservation_whatever_the_model() -> None:
    huge = dataclasses.replace(
        CATALOG.models["mock-fast"], context_length=2**62, max_output_tokens=2**62
    )
    plan = plan_hold(huge, [{"role": "user", "content": "hi"}], None)
    assert plan.max_tokens == 2**31 - 1
