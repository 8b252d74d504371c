"""The console's API (issue 17): the usage aggregates (`GET /v1/usage/summary`,
`GET /v1/usage/ttft`, computed in SQL on SQLite and PostgreSQL), the audit of
admin actions (`admin.*` events with actor, target, before/after, request id, no
secret) and the audit's filters. One control plane per backend for the module."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import delete

from control_plane import usage_summary
from control_plane.app import create_app
from control_plane.audit import REDACTED, redact
from control_plane.errors import ValidationFailed
from control_plane.settings import ControlPlaneSettings
from control_plane.tables import UsageRecord, new_id
from control_plane.usage_events import ttft_ms
from tests.test_control_plane import (
    CP,
    PASSWORD,
    _settings,
    data_of,
    error_of,
    pg_settings,
    serve_cp,
    usage_event,
)

SECRET_PROVIDER_KEY = "sk-live-" + "s3cr3t" * 6
# Tests whose SQL is the same on both databases run on SQLite only (time budget).
sqlite_only = pytest.mark.parametrize("cp", ["sqlite"], indirect=True)

# --- pure -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("started", "first", "expected"),
    [
        ("2026-11-30T10:00:00Z", "2026-11-30T10:00:00.250Z", 250),
        ("2026-11-30T10:00:00+00:00", "2026-11-30T11:00:00+01:00", 0),  # same instant
        ("2026-11-30T10:00:00Z", None, None),  # no token came
        ("", "2026-11-30T10:00:00Z", None),
        ("2026-11-30T10:00:01Z", "2026-11-30T10:00:00Z", None),  # a bad clock: negative
        ("2026-11-30T10:00:00Z", "2026-11-30T12:00:00Z", None),  # over an hour: not real
        ("yesterday", "2026-11-30T10:00:00Z", None),
    ],
)
def test_ttft_ms_from_the_webhook_timestamps(
    started: str, first: str | None, expected: int | None
) -> None:
    assert ttft_ms(started, first) == expected


def test_redact_hides_secret_fields_at_any_depth() -> None:
    doc = {
        "api_key": "sk-x",
        "Password": "pw",
        "models": {"m": {"price": "1"}},
        "keys": [{"key": "sk-y", "prefix": "sk_ab"}],
        "has_key": True,
    }
    assert redact(doc) == {
        "api_key": REDACTED,
        "Password": REDACTED,
        "models": {"m": {"price": "1"}},
        "keys": [{"key": REDACTED, "prefix": "sk_ab"}],
        "has_key": True,
    }
    assert redact(None) is None


TODAY = date(2026, 11, 30)


@pytest.mark.parametrize(
    ("params", "problem"),
    [
        ({"group_by": "day,colour"}, "group_by"),
        ({"group_by": "day,day"}, "group_by"),
        ({"group_by": "company"}, "group_by"),  # across companies only
        ({"from": "2026-11-31"}, "from"),
        ({"from": "30/11/2026"}, "from"),
        ({"to": "2026-11-3"}, "to"),
        ({"from": "2026-12-01", "to": "2026-11-30"}, "from"),
        ({"from": "2024-01-01", "to": "2026-11-30"}, "from"),  # over 366 days
        ({"order": "random"}, "order"),
        # Days whose arithmetic (30 days before `to`, the day after it) overflows `date`.
        ({"to": "0001-01-01"}, "to"),
        ({"to": "0001-12-31"}, "to"),
        ({"from": "0001-12-31", "to": "0002-01-01"}, "from"),
        ({"from": "9999-12-30", "to": "9999-12-31"}, "to"),
        ({"from": "9998-12-31", "to": "9999-01-01"}, "to"),
    ],
)
def test_summary_query_rejects(params: dict[str, str], problem: str) -> None:
    with pytest.raises(ValidationFailed) as info:
        usage_summary.parse_query(params, TODAY, across_companies=False)
    assert info.value.field == problem


def test_summary_query_reaches_the_first_and_last_days_allowed() -> None:
    first = usage_summary.parse_query({"to": "0002-01-01"}, TODAY, across_companies=False)
    assert (first.start, first.since.year) == (date(1, 12, 3), 1)
    last = {"from": "9998-12-31", "to": "9998-12-31"}
    assert usage_summary.parse_query(last, TODAY, across_companies=False).until.year == 9999


def test_summary_query_defaults_to_the_last_30_days() -> None:
    query = usage_summary.parse_query({"group_by": "day,model"}, TODAY, across_companies=False)
    assert (query.start, query.end, query.group_by) == (
        date(2026, 11, 1),
        TODAY,
        ("day", "model"),
    )
    assert query.until == datetime(2026, 12, 1, tzinfo=UTC)


# --- one control plane per backend ------------------------------------------------------


@contextlib.contextmanager
def _settings_on(
    kind: str, request: pytest.FixtureRequest, tmp: Path
) -> Iterator[ControlPlaneSettings]:
    if kind == "sqlite":
        yield _settings(f"sqlite:///{tmp}/cp.db")
        return
    with pg_settings(request.getfixturevalue("pg_server")) as settings:
        yield settings


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def cp(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CP]:
    tmp = tmp_path_factory.mktemp("console")
    with _settings_on(request.param, request, tmp) as settings, serve_cp(settings) as handle:
        yield handle


def _login(cp: CP, email: str) -> httpx.Client:
    r = cp.client().post("/v1/auth/login", json={"email": email, "password": PASSWORD})
    return cp.client(data_of(r)["access_token"])


def _stream(
    cp: CP, client: httpx.Client, company_id: str, output_tokens: int, ttft: int | None
) -> None:
    """One init and its settling webhook: a usage record, as the edge makes them."""
    init = data_of(client.post("/v1/chat/init", json={"query": "hi", "max_tokens": 100}), 201)
    event = usage_event(init, company_id, output_tokens=output_tokens)
    started = datetime.now(UTC) - timedelta(seconds=2)
    event = replace(
        event,
        started_at=started.isoformat(),
        first_token_at=None
        if ttft is None
        else (started + timedelta(milliseconds=ttft)).isoformat(),
    )
    assert cp.webhook(event).status_code == 200


def _sum(items: list[dict[str, Any]], field: str) -> Decimal | int:
    if field == "cost":
        return sum((Decimal(i["cost"]) for i in items), Decimal(0))
    return sum(int(i[field]) for i in items)


def test_summary_matches_usage_per_model_user_and_key(cp: CP) -> None:
    company_id = cp.company("10")
    owner = cp.user(company_id, "owner")
    member = cp.user(company_id, "member")
    owner_key = cp.api_key(owner["id"])
    owner_by_key = cp.client(owner_key)
    member_client = _login(cp, member["email"])
    _stream(cp, owner_by_key, company_id, 40, ttft=100)
    _stream(cp, owner_by_key, company_id, 10, ttft=300)
    _stream(cp, member_client, company_id, 20, ttft=200)
    _stream(cp, member_client, company_id, 5, ttft=None)  # no first token measured
    # Another company's streams never show in this owner's numbers.
    other_id = cp.company("10")
    other = cp.user(other_id, "owner")
    _stream(cp, cp.client(cp.api_key(other["id"])), other_id, 70, ttft=50)

    owner_client = _login(cp, owner["email"])
    usage = data_of(owner_client.get("/v1/usage", params={"limit": 200}))["items"]
    assert len(usage) == 4

    total = data_of(owner_client.get("/v1/usage/summary"))["items"]
    assert len(total) == 1 and set(total[0]) == {
        "streams",
        "input_tokens",
        "output_tokens",
        "cost",
    }
    for field in ("input_tokens", "output_tokens", "cost"):
        assert _sum(total, field) == _sum(usage, field), field
    assert total[0]["streams"] == 4

    by_day_model = data_of(owner_client.get("/v1/usage/summary?group_by=day,model"))
    [row] = by_day_model["items"]
    assert row["day"] == datetime.now(UTC).date().isoformat() and row["model"] == "mock-fast"
    assert "user_id" not in row and row["cost"] == total[0]["cost"]

    by_user_answer = owner_client.get("/v1/usage/summary?group_by=user&order=cost").json()
    by_user = by_user_answer["data"]["items"]
    emails = by_user_answer["meta"]["labels"]["user_id"]
    # An item holds only its grouped keys and totals (DESIGN §11); its id is named beside.
    totals = {"streams", "input_tokens", "output_tokens", "cost"}
    assert all(set(r) == {"user_id", *totals} for r in by_user)
    assert {emails[r["user_id"]]: r["streams"] for r in by_user} == {
        owner["email"]: 2,
        member["email"]: 2,
    }
    assert Decimal(by_user[0]["cost"]) >= Decimal(by_user[1]["cost"])  # top spender first

    by_key_answer = owner_client.get("/v1/usage/summary?group_by=api_key&order=cost").json()
    keyed = {r["api_key_id"]: r for r in by_key_answer["data"]["items"]}
    assert keyed[None]["streams"] == 2  # the member's logins carry no key
    [(key_id, key_row)] = [(k, v) for k, v in keyed.items() if k is not None]
    prefixes = by_key_answer["meta"]["labels"]["api_key_id"]
    assert owner_key.startswith(prefixes[key_id]) and key_row["output_tokens"] == 50
    assert "prefix" not in key_row

    ttft = data_of(owner_client.get("/v1/usage/ttft"))["items"]
    assert ttft == [{"model": "mock-fast", "streams": 3, "p50_ms": 200, "p95_ms": 300}]

    # Pagination of a listing: one group per page, then nothing more.
    first = data_of(owner_client.get("/v1/usage/summary?group_by=user&limit=1"))
    assert len(first["items"]) == 1 and first["next_cursor"]
    second = data_of(
        owner_client.get(
            "/v1/usage/summary",
            params={"group_by": "user", "limit": 1, "cursor": first["next_cursor"]},
        )
    )
    assert second["next_cursor"] is None
    assert first["items"][0]["user_id"] != second["items"][0]["user_id"]

    # The platform admin: one company on request, or every company by company.
    one = data_of(cp.admin.get(f"/v1/usage/summary?company_id={company_id}"))["items"]
    assert one == total
    everyone = data_of(cp.admin.get("/v1/usage/summary?group_by=company&limit=200"))["items"]
    mine = {r["company_id"]: r for r in everyone}
    assert mine[company_id]["cost"] == total[0]["cost"] and mine[other_id]["streams"] == 1


@sqlite_only
def test_a_member_or_another_company_sees_no_aggregates(cp: CP) -> None:
    """Attack: a member asks for its company's spend; an owner asks for another
    company's; an owner's chat-only key asks; none gets a number."""
    company_id = cp.company("10")
    owner = cp.user(company_id, "owner")
    member = cp.user(company_id, "member")
    other_id = cp.company("10")
    member_client = _login(cp, member["email"])
    owner_client = _login(cp, owner["email"])
    chat_key = cp.client(cp.api_key(owner["id"], ["llm:chat:send", "llm:chat:read"]))
    for path in ("/v1/usage/summary", "/v1/usage/ttft"):
        error_of(member_client.get(path), 403, "forbidden")
        error_of(chat_key.get(path), 403, "forbidden")
        error_of(owner_client.get(path, params={"company_id": other_id}), 403, "forbidden")
    # Across companies is the platform admin's alone.
    error_of(owner_client.get("/v1/usage/summary?group_by=company"), 422, "validation_error")
    error_of(owner_client.get("/v1/usage/summary?from=2026-02-30"), 422, "validation_error")
    error_of(owner_client.get("/v1/usage/summary?cursor=nonsense"), 422, "validation_error")


def test_days_ranges_and_percentiles_are_computed_in_sql(cp: CP) -> None:
    """Records placed on exact UTC instants: the day boundaries, the range's ends and
    nearest-rank percentiles agree on both databases."""
    company_id = cp.company("1")
    owner = cp.user(company_id, "owner")
    db = cp.app.state.db
    day = date(2026, 6, 10)
    midnight = datetime(2026, 6, 10, tzinfo=UTC)
    placed = [
        (midnight - timedelta(microseconds=1), "m-a", 10),  # 06-09, outside the range
        (midnight, "m-a", 20),  # 06-10 starts
        (midnight + timedelta(hours=23, minutes=59, seconds=59), "m-a", 30),
        (midnight + timedelta(days=1), "m-b", 40),  # 06-11
        (midnight + timedelta(days=2), "m-b", 50),  # 06-12, outside the range
    ]
    ttfts = [None, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100]

    def insert(session: Any) -> None:
        for moment, model, cost in placed:
            session.add(_record(company_id, owner["id"], moment, model, cost, None))
        for value in ttfts:
            session.add(_record(company_id, owner["id"], midnight, "m-t", 1, value))

    cp.on_loop(lambda: db.transaction(insert))
    client = _login(cp, owner["email"])
    params = {"group_by": "day,model", "from": day.isoformat(), "to": "2026-06-11"}
    items = data_of(client.get("/v1/usage/summary", params=params))["items"]
    assert [(i["day"], i["model"], i["streams"], i["cost"]) for i in items] == [
        ("2026-06-10", "m-a", 2, "0.000050"),
        ("2026-06-10", "m-t", 11, "0.000011"),
        ("2026-06-11", "m-b", 1, "0.000040"),
    ]
    ttft = data_of(client.get("/v1/usage/ttft", params=params))["items"]
    # Ten measured values 10..100: nearest rank p50 = the 5th, p95 = the 10th.
    assert ttft == [{"model": "m-t", "streams": 10, "p50_ms": 50, "p95_ms": 100}]

    cp.on_loop(
        lambda: db.transaction(
            lambda s: s.execute(delete(UsageRecord).where(UsageRecord.company_id == company_id))
        )
    )


def _record(
    company_id: str, user_id: str, moment: datetime, model: str, cost: int, ttft: int | None
) -> UsageRecord:
    return UsageRecord(
        id=new_id(),
        reservation_id=new_id(),
        jti=new_id(),
        company_id=company_id,
        user_id=user_id,
        session_id=new_id(),
        model=model,
        provider="mock",
        status="completed",
        finish_reason="stop",
        input_tokens=1,
        output_tokens=1,
        usage_source="upstream",
        cost_micro=cost,
        created_at=moment,
        ttft_ms=ttft,
    )


# --- the audit of administration -----------------------------------------------------------


def test_admin_actions_are_audited_with_actor_target_and_no_secret(cp: CP) -> None:
    company_id = cp.company("5")
    owner = cp.user(company_id, "owner")
    client = _login(cp, owner["email"])
    rid = f"req-{uuid.uuid4().hex[:8]}"
    headers = {"X-Request-Id": rid}

    member = data_of(
        client.post(
            "/v1/admin/users",
            json={
                "company_id": company_id,
                "email": f"m-{rid}@example.com",
                "password": "pw-12345",
            },
            headers=headers,
        ),
        201,
    )
    key = data_of(
        client.post("/v1/admin/api-keys", json={"user_id": member["id"]}, headers=headers), 201
    )
    assert client.delete(f"/v1/admin/api-keys/{key['id']}", headers=headers).status_code == 204
    assert client.delete(f"/v1/admin/api-keys/{key['id']}").status_code == 204  # no-op: no event
    data_of(
        client.put(
            f"/v1/admin/companies/{company_id}/providers/openai",
            json={"api_key": SECRET_PROVIDER_KEY},
            headers=headers,
        )
    )
    revocation = data_of(
        client.post("/v1/admin/revocations", json={"user_id": member["id"]}, headers=headers), 201
    )
    assert client.delete(f"/v1/admin/revocations/{revocation['id']}").status_code == 204

    # The owner's own actions (the platform admin's creating the company and the
    # owner are audited too, under the admin token).
    r = client.get("/v1/admin/audit", params={"kind": "admin.*", "actor": owner["id"]})
    assert SECRET_PROVIDER_KEY not in r.text and key["key"] not in r.text
    assert "pw-12345" not in r.text
    events = data_of(r)["items"]
    assert [e["kind"] for e in events] == [
        "admin.revocation.lift",
        "admin.revocation.create",
        "admin.provider.set",
        "admin.api_key.revoke",
        "admin.api_key.create",
        "admin.user.create",
    ]
    assert all(e["actor"] == owner["id"] and e["company_id"] == company_id for e in events)
    assert all(e["request_id"] == rid for e in events[1:])
    by_kind = {e["kind"]: e for e in events}
    assert by_kind["admin.user.create"]["target"] == f"user:{member['id']}"
    created = by_kind["admin.api_key.create"]
    assert created["target"] == f"api_key:{key['id']}"
    assert created["details"]["after"]["prefix"] == key["prefix"]
    revoked = by_kind["admin.api_key.revoke"]["details"]
    assert revoked["before"]["revoked_at"] is None and revoked["after"]["revoked_at"]
    provider = by_kind["admin.provider.set"]["details"]
    assert provider["before"]["has_key"] is False and provider["after"]["has_key"] is True
    lift = by_kind["admin.revocation.lift"]["details"]
    assert lift["before"]["lifted_at"] is None and lift["after"]["lifted_at"]

    # Filters: by target, by actor, by day, and the money kinds stay apart.
    target = data_of(client.get("/v1/admin/audit", params={"target": f"api_key:{key['id']}"}))
    assert [e["kind"] for e in target["items"]] == ["admin.api_key.revoke", "admin.api_key.create"]
    setup = data_of(client.get("/v1/admin/audit", params={"actor": "admin-token"}))["items"]
    assert {e["kind"] for e in setup} == {"admin.company.create", "admin.user.create", "grant"}
    grants = data_of(client.get("/v1/admin/audit", params={"kind": "grant"}))["items"]
    assert [e["kind"] for e in grants] == ["grant"]
    today = datetime.now(UTC).date()
    future = data_of(
        client.get("/v1/admin/audit", params={"from": (today + timedelta(days=1)).isoformat()})
    )
    assert future["items"] == []
    error_of(client.get("/v1/admin/audit?from=tomorrow"), 422, "validation_error")
    # LIKE wildcards in a prefix are literal: `%*` does not match everything.
    for wild in ("%*", "_*", "admin._pi_key*"):
        assert data_of(client.get("/v1/admin/audit", params={"kind": wild}))["items"] == []

    # The platform admin sees them too; another company's owner does not.
    assert data_of(cp.admin.get("/v1/admin/audit", params={"request_id": rid}))["items"]
    stranger_company = cp.company("1")
    stranger = _login(cp, cp.user(stranger_company, "owner")["email"])
    error_of(stranger.get("/v1/admin/audit", params={"company_id": company_id}), 403, "forbidden")
    assert data_of(stranger.get("/v1/admin/audit", params={"target": f"user:{member['id']}"})) == {
        "items": [],
        "next_cursor": None,
    }


@sqlite_only
def test_refused_admin_actions_write_no_audit_event(cp: CP) -> None:
    """Attack: an owner tries to mint a key for another company's user, to create an
    admin, to set another company's provider key. Each is refused and leaves no
    trace that it happened as an action."""
    company_id = cp.company("5")
    owner = cp.user(company_id, "owner")
    client = _login(cp, owner["email"])
    other_company = cp.company("5")
    victim = cp.user(other_company, "owner")
    assert client.post("/v1/admin/api-keys", json={"user_id": victim["id"]}).status_code == 404
    r = client.post(
        "/v1/admin/users",
        json={
            "company_id": company_id,
            "email": f"a-{uuid.uuid4().hex[:6]}@example.com",
            "role": "admin",
        },
    )
    assert r.status_code == 403
    r = client.put(
        f"/v1/admin/companies/{other_company}/providers/openai",
        json={"api_key": SECRET_PROVIDER_KEY},
    )
    assert r.status_code == 404
    events = data_of(cp.admin.get("/v1/admin/audit", params={"actor": owner["id"]}))
    assert events["items"] == []


@sqlite_only
def test_listing_users_stays_within_the_company_and_below_the_caller(cp: CP) -> None:
    """Attack: an owner lists its company's users hoping to find the platform admin
    who sits in it, and lists another company's users."""
    company_id = cp.company("1")
    owner = cp.user(company_id, "owner")
    member = cp.user(company_id, "member", password=None)
    platform_admin = cp.user(company_id, "admin")
    client = _login(cp, owner["email"])
    listed = data_of(client.get("/v1/admin/users"))["items"]
    assert {u["id"] for u in listed} == {owner["id"], member["id"]}
    assert all("password_hash" not in u for u in listed)
    assert {u["id"]: u["has_password"] for u in listed} == {owner["id"]: True, member["id"]: False}
    assert platform_admin["id"] in {
        u["id"] for u in data_of(cp.admin.get(f"/v1/admin/users?company_id={company_id}"))["items"]
    }
    other_id = cp.company("1")
    error_of(client.get(f"/v1/admin/users?company_id={other_id}"), 404, "not_found")
    member_client = cp.client(cp.api_key(member["id"]))
    error_of(member_client.get("/v1/admin/users"), 404, "not_found")
    error_of(cp.admin.get("/v1/admin/users"), 422, "validation_error")


@sqlite_only
def test_roles_change_only_within_the_callers_rank(cp: CP) -> None:
    """Attack: an owner promotes a member (or itself) to platform admin, demotes the
    company's admin, changes another company's user; a member promotes itself. Only
    the owner's own-rank change goes through, and it is audited."""
    company_id = cp.company("1")
    owner = cp.user(company_id, "owner")
    member = cp.user(company_id, "member")
    platform_admin = cp.user(company_id, "admin")
    stranger = cp.user(cp.company("1"), "member")
    client = _login(cp, owner["email"])
    member_client = _login(cp, member["email"])

    def patch(who: httpx.Client, user_id: str, role: str) -> httpx.Response:
        return who.patch(f"/v1/admin/users/{user_id}", json={"role": role})

    error_of(patch(client, member["id"], "admin"), 403, "forbidden")
    error_of(patch(client, owner["id"], "admin"), 403, "forbidden")
    error_of(patch(client, owner["id"], "member"), 403, "forbidden")  # not its own
    error_of(patch(client, platform_admin["id"], "member"), 404, "not_found")
    error_of(patch(client, stranger["id"], "owner"), 404, "not_found")
    error_of(patch(member_client, member["id"], "owner"), 404, "not_found")
    error_of(patch(client, member["id"], "boss"), 422, "validation_error")
    r = client.patch(f"/v1/admin/users/{member['id']}", json={"role": "owner", "x": 1})
    error_of(r, 422, "validation_error")
    roles = {
        u["id"]: u["role"]
        for u in data_of(cp.admin.get(f"/v1/admin/users?company_id={company_id}"))["items"]
    }
    assert roles == {owner["id"]: "owner", member["id"]: "member", platform_admin["id"]: "admin"}
    assert data_of(client.get("/v1/admin/audit", params={"kind": "admin.user.role"}))["items"] == []

    assert data_of(patch(client, member["id"], "owner"))["role"] == "owner"
    # The promoted member's own session now carries the owner's power …
    assert member_client.get("/v1/usage/summary").status_code == 200
    # … and a demotion takes it away at once, keys included.
    promoted_key = cp.client(cp.api_key(member["id"]))
    assert promoted_key.get("/v1/usage/summary").status_code == 200
    assert data_of(patch(client, member["id"], "member"))["role"] == "member"
    error_of(promoted_key.get("/v1/usage/summary"), 403, "forbidden")
    events = data_of(client.get("/v1/admin/audit", params={"kind": "admin.user.role"}))["items"]
    assert [(e["details"]["before"], e["details"]["after"]) for e in events] == [
        ({"role": "owner"}, {"role": "member"}),
        ({"role": "member"}, {"role": "owner"}),
    ]
    assert all(e["actor"] == owner["id"] and e["target"] == f"user:{member['id']}" for e in events)


# --- the page itself ----------------------------------------------------------------------


@sqlite_only
def test_the_console_serves_only_its_own_files(cp: CP) -> None:
    """Attack: reach other files through the console's path (traversal, the vendor
    notes, the package's code); frame the console elsewhere."""
    page = httpx.get(f"{cp.url}/console")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "frame-ancestors 'none'" in policy
    assert "/console/vendor/chart.umd.min.js" in page.text  # no CDN
    script = httpx.get(f"{cp.url}/console/vendor/chart.umd.min.js")
    assert script.status_code == 200 and "Chart.js v4" in script.text[:200]
    for path in (
        "/console/../control_plane/tables.py",
        "/console/%2e%2e/routes/console.py",
        "/console/vendor/README.md",
        "/console/index.html",
        "/console/vendor/",
    ):
        r = httpx.get(f"{cp.url}{path}")
        assert r.status_code == 404, path
        assert r.json()["success"] is False


async def test_the_console_can_be_switched_off(tmp_path: Path) -> None:
    settings = _settings(f"sqlite:///{tmp_path}/off.db", {"LLMGW_SERVE_CONSOLE": "0"})
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://cp") as client:
            for path in ("/console", "/console/console.js"):
                r = await client.get(path)
                assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
