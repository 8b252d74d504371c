"""Hostile ids in paths, cursors and days in query strings (review 3): each is a 4xx,
never a 500, and a refused request writes nothing, not even a key in the store. One
control plane on PostgreSQL + Redis for the whole module (Redis is where a stray
key would stay for a week)."""

from __future__ import annotations

import base64
import uuid
from collections.abc import Iterator

import httpx
import orjson
import pytest
import redis

from tests.conftest import REDIS_URL
from tests.test_control_plane import CP, data_of, error_of, pg_settings, serve_cp


@pytest.fixture(scope="module")
def cp(pg_server: str) -> Iterator[CP]:
    with pg_settings(pg_server) as settings, serve_cp(settings) as handle:
        yield handle


def _member(cp: CP, company_id: str) -> httpx.Client:
    return cp.client(cp.api_key(cp.user(company_id, role="member", password=None)["id"]))


def _version_keys(cp: CP) -> list[bytes]:
    """Every LLM-config version key the control plane wrote (`catalog_cache.version_key`)."""
    client = redis.Redis.from_url(REDIS_URL)
    try:
        return list(client.scan_iter(match=f"{cp.settings.redis_prefix}llm:config:version:*"))
    finally:
        client.close()


# --- ids in paths: a refused provider change writes nothing to the store -----------


def test_a_refused_provider_change_writes_no_store_key(cp: CP) -> None:
    company_id = cp.company("0")
    member = _member(cp, company_id)  # the attack needs no more than this
    owner, own_company = cp.owner_client("1")
    huge = uuid.uuid4().hex + "x" * 40_000  # a week-long 40 KB key per request, before
    refused: list[tuple[httpx.Client, str, str]] = [
        (member, "DELETE", f"/v1/admin/companies/{huge}/providers/openai"),
        (member, "PUT", f"/v1/admin/companies/{huge}/providers/openai"),
        (member, "DELETE", f"/v1/admin/companies/{company_id}/providers/openai"),
        (owner, "DELETE", f"/v1/admin/companies/{company_id}/providers/openai"),
        (cp.admin, "DELETE", f"/v1/admin/companies/{huge}/providers/openai"),
        (cp.admin, "DELETE", f"/v1/admin/companies/{uuid.uuid4().hex}/providers/openai"),
        (cp.admin, "PUT", f"/v1/admin/companies/{uuid.uuid4().hex}/providers/openai"),
    ]
    for who, method, path in refused:
        r = who.request(method, path, json={"default_model": None})
        error_of(r, 404, "not_found")
    assert _version_keys(cp) == []
    # The owner's own change, committed, is what moves its company's version.
    assert owner.delete(f"/v1/admin/companies/{own_company}/providers/openai").status_code == 204
    assert [k.decode().rsplit(":", 1)[1] for k in _version_keys(cp)] == [own_company]


def test_ids_in_admin_paths_longer_than_any_id_are_404(cp: CP) -> None:
    huge = "x" * 40_000
    for method, path, body in [
        ("GET", f"/v1/admin/companies/{huge}/providers", None),
        ("GET", f"/v1/admin/companies/{huge}/agents", None),
        ("GET", f"/v1/admin/companies/{huge}/budgets", None),
        ("POST", f"/v1/admin/companies/{huge}/credits", {"amount": "1"}),
        ("PATCH", f"/v1/admin/users/{huge}", {"role": "member"}),
        ("DELETE", f"/v1/admin/api-keys/{huge}", None),
        ("DELETE", f"/v1/admin/revocations/{huge}", None),
    ]:
        error_of(cp.admin.request(method, path, json=body), 404, "not_found")


# --- cursors: a forged one is a 422 on every keyset listing ------------------------


def _cursor(moment: str) -> str:
    return base64.urlsafe_b64encode(orjson.dumps([moment, "a"])).decode().rstrip("=")


# Aware, and inside `datetime`'s range, but not once moved to UTC.
FORGED = [_cursor("0001-01-01T00:00:00+14:00"), _cursor("9999-12-31T23:59:59-14:00")]


def test_a_forged_cursor_at_the_edge_of_time_is_422_on_every_listing(cp: CP) -> None:
    owner, company_id = cp.owner_client("1")
    member = _member(cp, company_id)
    listings = [
        (member, "/v1/usage"),
        (member, "/v1/credits"),
        (member, "/v1/sessions"),
        (owner, "/v1/admin/users"),
        (owner, "/v1/admin/api-keys"),
        (owner, "/v1/admin/revocations"),
        (owner, "/v1/admin/audit"),
    ]
    for who, path in listings:
        data_of(who.get(path))  # the listing itself answers
        for cursor in FORGED:
            message = error_of(who.get(path, params={"cursor": cursor}), 422, "validation_error")
            assert "cursor" in message, (path, message)


# --- days: the edges of the calendar are a 422 -------------------------------------


@pytest.mark.parametrize(
    ("path", "params"),
    [
        ("/v1/admin/audit", {"to": "9999-12-31"}),  # the day after `to` overflowed
        ("/v1/admin/audit", {"from": "0001-01-01"}),
        ("/v1/usage/summary", {"to": "0001-01-01"}),  # 30 days before `to` overflowed
        ("/v1/usage/summary", {"from": "9999-12-30", "to": "9999-12-31"}),
        ("/v1/usage/ttft", {"to": "0001-01-02"}),
        ("/v1/usage/ttft", {"from": "9999-12-31", "to": "9999-12-31"}),
    ],
)
def test_days_past_the_calendars_margins_are_422(cp: CP, path: str, params: dict[str, str]) -> None:
    owner, _ = cp.owner_client("1")
    for who in (owner, cp.admin):
        message = error_of(who.get(path, params=params), 422, "validation_error")
        assert "from" in message or "to" in message, message


def test_an_audit_range_ending_before_it_starts_is_a_422_not_an_empty_page(cp: CP) -> None:
    """The aggregates refused it; the audit answered an empty page, which reads as "no
    money moved" to whoever typed the days the wrong way round."""
    owner, _ = cp.owner_client("1")
    days = {"from": "2026-02-01", "to": "2026-01-31"}
    for who in (owner, cp.admin):
        message = error_of(who.get("/v1/admin/audit", params=days), 422, "validation_error")
        assert "from" in message, message
        one_day = {"from": "2026-01-31", "to": "2026-01-31"}
        assert data_of(who.get("/v1/admin/audit", params=one_day)) is not None


def test_the_first_and_last_days_allowed_still_answer(cp: CP) -> None:
    owner, _ = cp.owner_client("1")
    for first, last in [("0002-01-01", "0002-01-01"), ("9998-12-31", "9998-12-31")]:
        days = {"from": first, "to": last}
        assert data_of(owner.get("/v1/admin/audit", params=days))["items"] == []
        assert data_of(owner.get("/v1/usage/summary", params=days))["items"]
        assert data_of(owner.get("/v1/usage/ttft", params=days)) is not None
    assert data_of(owner.get("/v1/usage/summary", params={"to": "0002-01-30"}))["items"]


# --- integer cursors: a position past the columns' range is a 422 ------------------


def _seq_cursor(seq: int) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(["seq", seq])).decode().rstrip("=")


def test_a_forged_message_cursor_past_an_integer_column_is_422(cp: CP) -> None:
    """A session's messages are paged by their `seq`, an `integer` column: a forged
    cursor past 2^31 - 1 overflowed on PostgreSQL as it was bound (500)."""
    owner, _ = cp.owner_client("1")
    init = data_of(owner.post("/v1/chat/init", json={"model": "mock-fast", "query": "hi"}), 201)
    path = f"/v1/sessions/{init['session_id']}"
    last = data_of(owner.get(path, params={"cursor": _seq_cursor(2**31 - 1)}))
    assert last["messages"] == [] and last["next_cursor"] is None
    for seq in (2**31, 2**40, 2**62 - 1):
        for listing in (path, "/v1/usage/summary"):
            message = error_of(
                owner.get(listing, params={"cursor": _seq_cursor(seq)}), 422, "validation_error"
            )
            assert "cursor" in message, (listing, message)
