"""Budgets, teams, threshold webhooks and tokens per minute (issue 16.3, 16.4).

Pure tables for the arithmetic (`budget_math`, `tpm` on a MemoryStore with explicit
instants), then one real control plane for the module (uvicorn, SQLite, in-memory
store) with a webhook receiver beside it: who may set budgets (a member, another
company's owner, an owner over an admin, a target in another company: all refused,
nothing written), inits refused with 402 ``budget_exceeded`` without holding a
thing, settlement moving held to spent, API-key and team budgets, the signed
``budget.threshold`` events, and 429 ``tpm_exceeded``. The 200-concurrent-inits
test on PostgreSQL is `test_budgets_concurrency.py`.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from cryptography.fernet import Fernet
from sqlalchemy import select
from sqlmodel import col
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from control_plane import budget_admin, budget_math, budgets, init_gate, tpm
from control_plane.errors import TpmExceeded
from control_plane.rate_limits import window_at
from control_plane.settings import ControlPlaneSettings
from control_plane.tables import Budget, BudgetEvent, BudgetPeriod, Reservation
from shared.pricing import cost_micro, estimate_input_tokens, format_credits
from shared.store_memory import MemoryStore
from shared.webhooks import verify
from tests.conftest import new_webhook_secret
from tests.test_control_plane import (
    CP,
    credits_of,
    data_of,
    error_of,
    micro,
    start_cp,
    usage_event,
)

MESSAGES = [{"role": "user", "content": "hi"}]
MAX_TOKENS = 16
TPM_PER_USER = 1000  # the default model's max output is 1024: one init can cross it
TPM_PER_COMPANY = 20000
D = datetime  # the table's rows stay on one line


# --- pure: periods, thresholds, bodies -------------------------------------------------

PERIODS = [
    # (period, now, its start, when it resets)
    (
        "day",
        D(2026, 3, 4, 23, 59, 59, tzinfo=UTC),
        D(2026, 3, 4, tzinfo=UTC),
        D(2026, 3, 5, tzinfo=UTC),
    ),
    (
        "day",
        D(2026, 3, 5, 0, 0, 0, tzinfo=UTC),
        D(2026, 3, 5, tzinfo=UTC),
        D(2026, 3, 6, tzinfo=UTC),
    ),
    # 2026-03-08 is a Sunday: its week began on Monday the 2nd.
    (
        "week",
        D(2026, 3, 8, 23, 0, tzinfo=UTC),
        D(2026, 3, 2, tzinfo=UTC),
        D(2026, 3, 9, tzinfo=UTC),
    ),
    (
        "week",
        D(2026, 3, 9, 0, 0, tzinfo=UTC),
        D(2026, 3, 9, tzinfo=UTC),
        D(2026, 3, 16, tzinfo=UTC),
    ),
    (
        "month",
        D(2026, 12, 31, 23, 0, tzinfo=UTC),
        D(2026, 12, 1, tzinfo=UTC),
        D(2027, 1, 1, tzinfo=UTC),
    ),
    (
        "month",
        D(2026, 2, 28, 12, 0, tzinfo=UTC),
        D(2026, 2, 1, tzinfo=UTC),
        D(2026, 3, 1, tzinfo=UTC),
    ),
    ("none", D(2026, 2, 28, 12, 0, tzinfo=UTC), budget_math.NO_PERIOD_START, None),
]


@pytest.mark.parametrize(("period", "now", "start", "resets"), PERIODS)
def test_periods_are_utc_calendar_periods(
    period: str, now: datetime, start: datetime, resets: datetime | None
) -> None:
    assert budget_math.period_start(period, now) == start
    assert budget_math.resets_at(period, start) == resets
    # A time given in another zone is the same instant.
    east = now.astimezone(timezone(timedelta(hours=9)))
    assert budget_math.period_start(period, east) == start


@pytest.mark.parametrize(
    ("amount", "spent", "sent", "due"),
    [
        (100, 79, set(), []),
        (100, 80, set(), [80]),
        (100, 100, set(), [80, 100]),
        (100, 99, {80}, []),  # 80 was told before: once per period
        (100, 150, {80}, [100]),
        (100, 120, {80, 100}, []),
        (0, 0, set(), []),
        (3, 3, set(), [80, 100]),
        (50, 140, set(), [80, 100]),  # an amount lowered under the spend: told too
    ],
)
def test_thresholds_are_told_once_when_reached(
    amount: int, spent: int, sent: set[int], due: list[int]
) -> None:
    assert budget_math.due(amount, spent, sent) == due


def test_fits_counts_holds_like_the_balance() -> None:
    assert budget_math.fits(amount=10, spent=4, held=3, hold=3)
    assert not budget_math.fits(amount=10, spent=4, held=3, hold=4)
    assert budget_math.available(10, 4, 3) == 3
    assert budget_math.available(10, 12, 0) == 0  # an amount lowered below the spend


# --- pure: company webhook URLs (no SSRF inward) ------------------------------------


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        ("https://hooks.example.com/budget", True),
        ("http://8.8.8.8:8080/x", True),
        ("http://127.0.0.1:9000/hook", False),
        ("http://[::1]/hook", False),
        ("http://169.254.169.254/latest/meta-data/", False),  # cloud metadata
        ("http://10.1.2.3/", False),
        ("http://192.168.0.1/", False),
        ("http://100.64.0.1/", False),  # shared address space
        ("http://localhost:8080/", False),
        ("http://api.localhost./", False),
        ("ftp://example.com/", False),
        ("https:///nohost", False),
        ("https://exa mple.com/", False),
        ("https://hooks.example.com:8443/budget", True),
        ("http://example.com:99999/hook", False),  # every delivery would fail, for ever
        ("http://example.com:0/hook", False),
        ("http://example.com:http/hook", False),
    ],
)
def test_company_webhook_urls_never_point_inward(url: str, allowed: bool) -> None:
    from control_plane.company_webhooks import parse_url
    from control_plane.errors import ValidationFailed

    if allowed:
        assert parse_url(url) == url
    else:
        with pytest.raises(ValidationFailed):
            parse_url(url)
    if url.startswith("http://127."):
        assert parse_url(url, allow_private=True) == url  # LLMGW_COMPANY_WEBHOOKS_ALLOW_PRIVATE


def test_a_name_resolving_inward_is_not_posted_to() -> None:
    from control_plane.company_webhooks import resolve
    from control_plane.host_lookups import HostLookups

    lookups = HostLookups()
    try:
        for url in ("http://localhost:9/hook", "http://127.0.0.1:9/hook"):
            assert asyncio.run(resolve(httpx.URL(url), lookups)) is None
            assert asyncio.run(resolve(httpx.URL(url), lookups, allow_private=True)) is not None
    finally:
        lookups.close()


# --- pure: tokens per minute -------------------------------------------------------------


def test_tpm_counts_refuses_and_corrects_in_the_init_window() -> None:
    store = MemoryStore(clock=lambda: 0.0)
    limits = tpm.TpmLimits(per_user=100, per_company=150)
    t0 = 1_800_000_000.0  # a window start (divisible by 60)
    settings = ControlPlaneSettings.from_env(
        {
            "LLMGW_WEBHOOK_SECRET": new_webhook_secret(),
            "LLMGW_ENCRYPTION_KEY": Fernet.generate_key().decode(),
            "LLMGW_TPM_PER_USER": str(limits.per_user),
            "LLMGW_TPM_PER_COMPANY": str(limits.per_company),
        }
    )
    assert tpm.TpmLimits.of(settings) == limits

    async def gate(now: float) -> None:
        """Init's check before any hold: the live one, `init_gate.enter`."""
        at = init_gate.Moment(rate_now=now, tpm_now=now, wall_now=now)
        await init_gate.enter(
            store, settings, user_id="u", company_id="c", jti=uuid.uuid4().hex,
            expires_at=now + 60, at=at, cache=None,
        )  # fmt: skip

    async def run() -> None:
        await tpm.take(store, limits, user_id="u", company_id="c", tokens=60, now=t0 + 1)
        with pytest.raises(TpmExceeded) as refused:
            await tpm.take(store, limits, user_id="u", company_id="c", tokens=41, now=t0 + 20)
        assert refused.value.retry_after == 40 and refused.value.code == "tpm_exceeded"
        # The refused tokens were taken back from every counter.
        assert await store.get(f"tpm:user:u:{int(t0)}") == b"60"
        assert await store.get(f"tpm:company:c:{int(t0)}") == b"60"
        # Another user of the company: its own limit, the company's shared one.
        await tpm.take(store, limits, user_id="v", company_id="c", tokens=80, now=t0 + 30)
        with pytest.raises(TpmExceeded, match="company"):
            await tpm.take(store, limits, user_id="v", company_id="c", tokens=20, now=t0 + 31)
        # Settlement: the first stream used 10 tokens, not 60; the window still runs.
        await tpm.correct(
            store, limits, user_id="u", company_id="c", held_tokens=60, used_tokens=10,
            counted_at=t0 + 1, now=t0 + 50,
        )  # fmt: skip
        assert await store.get(f"tpm:user:u:{int(t0)}") == b"10"
        assert await store.get(f"tpm:company:c:{int(t0)}") == b"90"
        # A reservation whose id carries no instant (made before ids did): its window
        # is unknown, nothing is corrected.
        await tpm.correct(
            store, limits, user_id="u", company_id="c", held_tokens=10, used_tokens=0,
            counted_at=None, now=t0 + 50,
        )  # fmt: skip
        assert await store.get(f"tpm:user:u:{int(t0)}") == b"10"
        await gate(t0 + 55)
        await tpm.take(store, limits, user_id="z", company_id="c", tokens=60, now=t0 + 56)
        # Now the company is full: refused before any hold.
        with pytest.raises(TpmExceeded, match="company") as refused:
            await gate(t0 + 57)
        assert refused.value.retry_after == 3
        # A correction after its window ended changes nothing; the next window is empty.
        await tpm.correct(
            store, limits, user_id="u", company_id="c", held_tokens=10, used_tokens=0,
            counted_at=t0 + 1, now=t0 + 60,
        )  # fmt: skip
        assert await store.get(f"tpm:user:u:{int(t0)}") == b"10"
        await gate(t0 + 61)
        # Off: no limit, nothing counted.
        off = tpm.TpmLimits()
        await tpm.take(store, off, user_id="w", company_id="x", tokens=10**9, now=t0)
        assert await store.get(f"tpm:user:w:{int(t0)}") is None

    asyncio.run(run())


# --- one control plane for the module ---------------------------------------------------


@dataclass
class Receiver:
    """A company's webhook endpoint: records what arrives; fails the first `fail` posts."""

    fail: int = 0
    received: list[tuple[dict[str, str], bytes]] = field(default_factory=list)

    async def hook(self, request: Request) -> Response:
        body = await request.body()
        if self.fail > 0:
            self.fail -= 1
            return JSONResponse({"error": "try later"}, status_code=503)
        self.received.append((dict(request.headers), body))
        return JSONResponse({"ok": True})


@dataclass
class World:
    cp: CP
    receiver: Receiver
    receiver_url: str

    def new_company(self, credits: str = "100") -> str:
        return self.cp.company(credits)

    def user_key(self, company_id: str, role: str = "member", **kw: Any) -> tuple[str, str]:
        user = self.cp.user(company_id, role, password=None)
        return user["id"], self.cp.api_key(user["id"], **kw)

    def as_(self, key: str) -> httpx.Client:
        return self.cp.client(key)

    def db(self, fn: Any) -> Any:
        db = self.cp.app.state.db
        return self.cp.on_loop(lambda: db.transaction(fn))


@pytest.fixture(scope="module")
def world(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[World]:
    from tests.harness import ServerGroup, bind_free_socket, url_of

    receiver = Receiver()
    sock = bind_free_socket()
    hook_app = Starlette(routes=[Route("/hook", receiver.hook, methods=["POST"])])
    env = {
        "LLMGW_SWEEP_INTERVAL_SECONDS": "0.2",
        "LLMGW_TPM_PER_USER": str(TPM_PER_USER),
        "LLMGW_TPM_PER_COMPANY": str(TPM_PER_COMPANY),
        "LLMGW_COMPANY_WEBHOOKS_ALLOW_PRIVATE": "1",  # the receiver is on 127.0.0.1
    }
    tmp: Path = tmp_path_factory.mktemp("budgets")
    with (
        ServerGroup([(hook_app, sock)]),
        start_cp(request, tmp, "sqlite", env) as cp,
    ):
        yield World(cp, receiver, f"{url_of(sock)}/hook")


def _hold(cp: CP) -> int:
    price = cp.settings.catalog.models[cp.settings.catalog.default_model].price
    return cost_micro(estimate_input_tokens(MESSAGES), MAX_TOKENS, price)


def _init(client: httpx.Client) -> httpx.Response:
    return client.post("/v1/chat/init", json={"messages": MESSAGES, "max_tokens": MAX_TOKENS})


def _budget(client: httpx.Client, company_id: str, **body: Any) -> httpx.Response:
    return client.post(f"/v1/admin/companies/{company_id}/budgets", json=body)


def _budgets_of(w: World, company_id: str) -> list[dict[str, Any]]:
    r = w.cp.admin.get(f"/v1/admin/companies/{company_id}/budgets")
    return list(data_of(r)["items"])


def test_budget_bodies_are_validated_and_change_nothing(world: World) -> None:
    w = world
    company = w.new_company()
    owner_id, owner_key = w.user_key(company, "owner")
    owner = w.as_(owner_key)
    good = {"scope": "user", "target_id": owner_id, "amount": "1", "period": "day"}
    bad: list[tuple[dict[str, Any], int, str]] = [
        ({**good, "amount": 1.5}, 422, "validation_error"),  # a float is already inexact
        ({**good, "amount": "1e999999999"}, 422, "validation_error"),
        ({**good, "amount": "0.0000001"}, 422, "validation_error"),
        ({**good, "amount": "-1"}, 422, "validation_error"),
        ({**good, "amount": "1" * 70}, 422, "validation_error"),
        ({**good, "scope": "company"}, 422, "validation_error"),
        ({**good, "period": "year"}, 422, "validation_error"),
        ({**good, "target_id": ["x"]}, 422, "validation_error"),
        ({**good, "target_id": "a\u0000b"}, 400, "invalid_characters"),
        ({**good, "extra": 1}, 422, "validation_error"),
        ({k: v for k, v in good.items() if k != "period"}, 422, "validation_error"),
    ]
    for body, status, code in bad:
        error_of(_budget(owner, company, **body), status, code)
    error_of(
        owner.post(f"/v1/admin/companies/{company}/budgets", content=b"[1]"),
        422,
        "validation_error",
    )
    assert _budgets_of(w, company) == []
    created = data_of(_budget(owner, company, **good), 201)
    assert created["amount"] == "1.000000" and created["spent"] == "0.000000"
    path = f"/v1/admin/companies/{company}/budgets/{created['id']}"
    error_of(owner.patch(path, json={"scope": "team"}), 422, "validation_error")
    error_of(owner.patch(path, json={}), 422, "validation_error")
    error_of(owner.patch(path, json={"amount": "1e400"}), 422, "validation_error")
    assert [b["amount"] for b in _budgets_of(w, company)] == ["1.000000"]
    assert data_of(owner.patch(path, json={"amount": "2.5", "period": "none"}))["resets_at"] is None
    assert owner.delete(path).status_code == 204
    error_of(owner.delete(path), 404, "not_found")
    assert _budgets_of(w, company) == []


def test_nobody_budgets_outside_its_reach(world: World) -> None:
    """A member (403), another company's owner (404), an owner over an admin (403), a
    target in another company (422), a chat-only owner key (403): all refused, none
    writes a budget or a team."""
    w = world
    mine, other = w.new_company(), w.new_company()
    _, owner_key = w.user_key(mine, "owner")
    member_id, member_key = w.user_key(mine, "member")
    admin_user_id, _ = w.user_key(mine, "admin")
    _, chat_only_key = w.user_key(mine, "owner", scopes=["llm:chat:send", "llm:chat:read"])
    stranger_id, stranger_key = w.user_key(other, "member")
    _, other_owner_key = w.user_key(other, "owner")
    r = w.as_(other_owner_key).post(f"/v1/admin/companies/{other}/teams", json={"name": "t"})
    other_team = data_of(r, 201)["id"]
    owner, member = w.as_(owner_key), w.as_(member_key)
    on_member = {"scope": "user", "target_id": member_id, "amount": "0", "period": "day"}

    error_of(_budget(member, mine, **on_member), 403, "forbidden")
    error_of(_budget(w.as_(chat_only_key), mine, **on_member), 403, "forbidden")
    error_of(_budget(w.as_(other_owner_key), mine, **on_member), 404, "not_found")
    error_of(_budget(owner, other, **on_member), 404, "not_found")
    error_of(_budget(owner, mine, **{**on_member, "target_id": admin_user_id}), 403, "forbidden")
    for scope, target in (("user", stranger_id), ("api_key", "nope"), ("team", other_team)):
        body = {**on_member, "scope": scope, "target_id": target}
        error_of(_budget(owner, mine, **body), 422, "validation_error")
    stranger_key_id = data_of(w.as_(stranger_key).get("/v1/me"))["user"]["id"]
    assert stranger_key_id == stranger_id
    teams = f"/v1/admin/companies/{mine}/teams"
    error_of(
        owner.post(teams, json={"name": "x", "user_ids": [stranger_id]}), 422, "validation_error"
    )
    error_of(owner.post(teams, json={"name": "x", "user_ids": [admin_user_id]}), 403, "forbidden")
    error_of(member.post(teams, json={"name": "x", "user_ids": [member_id]}), 403, "forbidden")
    error_of(
        member.put(f"/v1/admin/companies/{mine}/webhook", json={"url": "http://a.b/"}),
        403,
        "forbidden",
    )
    error_of(
        owner.put(f"/v1/admin/companies/{other}/webhook", json={"url": "http://a.b/"}),
        404,
        "not_found",
    )
    assert _budgets_of(w, mine) == [] and _budgets_of(w, other) == []
    assert data_of(w.cp.admin.get(teams))["items"] == []
    # The owner may, on its own company's member: and the platform admin too.
    assert data_of(_budget(owner, mine, **on_member), 201)["scope"] == "user"
    assert data_of(_budget(w.cp.admin, mine, **{**on_member, "target_id": admin_user_id}), 201)
    error_of(member.get(f"/v1/admin/companies/{mine}/budgets"), 403, "forbidden")
    # Another company's budget and team, reached through one's own company's path or
    # theirs: not found, and unchanged.
    theirs = {"scope": "user", "target_id": stranger_id, "amount": "5", "period": "day"}
    their_budget = data_of(_budget(w.as_(other_owner_key), other, **theirs), 201)["id"]
    for company in (mine, other):
        path = f"/v1/admin/companies/{company}/budgets/{their_budget}"
        error_of(owner.patch(path, json={"amount": "1000"}), 404, "not_found")
        error_of(owner.delete(path), 404, "not_found")
        team_path = f"/v1/admin/companies/{company}/teams/{other_team}"
        error_of(owner.patch(team_path, json={"user_ids": [member_id]}), 404, "not_found")
        error_of(owner.delete(team_path), 404, "not_found")
    assert [b["amount"] for b in _budgets_of(w, other)] == ["5.000000"]
    their_teams = data_of(w.cp.admin.get(f"/v1/admin/companies/{other}/teams"))["items"]
    assert [t["user_ids"] for t in their_teams] == [[]]


def test_init_refused_over_a_budget_holds_nothing_and_settlement_moves_spend(world: World) -> None:
    w = world
    hold = _hold(w.cp)
    company = w.new_company("100")
    _, owner_key = w.user_key(company, "owner")
    user_id, key = w.user_key(company)
    client = w.as_(key)
    created = data_of(
        _budget(
            w.as_(owner_key), company,
            scope="user", target_id=user_id, amount=format_credits(2 * hold), period="day",
        ),
        201,
    )  # fmt: skip
    first, second = data_of(_init(client), 201), data_of(_init(client), 201)
    before = credits_of(client)
    sessions = data_of(client.get("/v1/sessions"))["items"]
    r = _init(client)
    error_of(r, 402, "budget_exceeded")
    assert data_of(client.get("/v1/sessions"))["items"] == sessions  # no session either
    details = r.json()["error"]["details"]
    tomorrow = budget_math.period_start("day", datetime.now(UTC)) + timedelta(days=1)
    assert details["budget_id"] == created["id"] and details["scope"] == "user"
    assert datetime.fromisoformat(details["resets_at"].replace("Z", "+00:00")) == tomorrow
    assert credits_of(client) == before  # the refusal held nothing
    assert micro(before["held"]) == 2 * hold
    [mine] = data_of(client.get("/v1/me"))["budgets"]
    assert set(mine) == {"id", "scope", "amount", "spent", "held", "available", "resets_at"}
    assert (micro(mine["held"]), micro(mine["spent"]), micro(mine["available"])) == (2 * hold, 0, 0)

    # The first stream used 2 input + 3 output tokens: its hold moves to spent.
    event = usage_event(first, company, input_tokens=2, output_tokens=3)
    assert w.cp.webhook(event).status_code == 200
    price = w.cp.settings.catalog.models[first["model"]].price
    charge = cost_micro(2, 3, price)
    [mine] = data_of(client.get("/v1/me"))["budgets"]
    assert (micro(mine["held"]), micro(mine["spent"])) == (hold, charge)
    assert micro(mine["available"]) == hold - charge
    # A duplicate delivery moves nothing twice.
    assert w.cp.webhook(event, webhook_id="another-id").json()["data"]["duplicate"] is True
    assert data_of(client.get("/v1/me"))["budgets"] == [mine]
    # A failed stream (nothing generated) releases its hold from the budget too.
    failed = usage_event(second, company, status="failed", output_tokens=0)
    assert w.cp.webhook(failed).status_code == 200
    [mine] = data_of(client.get("/v1/me"))["budgets"]
    assert (micro(mine["held"]), micro(mine["spent"])) == (0, charge)
    # Room again for one hold (2 holds - charge >= 1 hold), not two.
    data_of(_init(client), 201)
    error_of(_init(client), 402, "budget_exceeded")
    assert w.db(lambda s: budgets.check(s, company)) == []


def test_api_key_and_team_budgets_cap_only_their_targets(world: World) -> None:
    w = world
    hold = _hold(w.cp)
    company = w.new_company("100")
    _, owner_key = w.user_key(company, "owner")
    owner = w.as_(owner_key)
    alice, alice_key = w.user_key(company)
    alice_other_key = w.cp.api_key(alice)
    bob, bob_key = w.user_key(company)
    _, carol_key = w.user_key(company)
    key_id = data_of(w.cp.admin.get("/v1/admin/api-keys", params={"user_id": alice}))["items"]
    key_id = next(k["id"] for k in key_id if alice_key.startswith(k["prefix"]))
    _budget(owner, company, scope="api_key", target_id=key_id, amount="0", period="month")
    # The capped key is refused; the same user's other key is not.
    r = _init(w.as_(alice_key))
    error_of(r, 402, "budget_exceeded")
    assert r.json()["error"]["details"]["scope"] == "api_key"
    data_of(_init(w.as_(alice_other_key)), 201)
    # A team of Bob (and Alice), one hold's worth a week: Carol is not in it.
    team = data_of(
        owner.post(f"/v1/admin/companies/{company}/teams", json={"name": "ml", "user_ids": [bob]}),
        201,
    )
    error_of(
        owner.post(f"/v1/admin/companies/{company}/teams", json={"name": "ml"}), 409, "conflict"
    )
    patched = owner.patch(
        f"/v1/admin/companies/{company}/teams/{team['id']}", json={"user_ids": [bob, alice]}
    )
    assert sorted(data_of(patched)["user_ids"]) == sorted([bob, alice])
    _budget(
        owner, company, scope="team", target_id=team["id"], amount=format_credits(hold),
        period="week",
    )  # fmt: skip
    data_of(_init(w.as_(bob_key)), 201)
    r = _init(w.as_(alice_other_key))
    error_of(r, 402, "budget_exceeded")
    assert r.json()["error"]["details"]["scope"] == "team"
    data_of(_init(w.as_(carol_key)), 201)
    bobs = data_of(w.as_(bob_key).get("/v1/me"))["budgets"]
    assert [(b["scope"], micro(b["held"])) for b in bobs] == [("team", hold)]
    assert data_of(w.as_(carol_key).get("/v1/me"))["budgets"] == []
    # Deleting the team drops its budget.
    assert owner.delete(f"/v1/admin/companies/{company}/teams/{team['id']}").status_code == 204
    assert data_of(w.as_(bob_key).get("/v1/me"))["budgets"] == []


def test_a_stream_across_midnight_is_charged_to_the_day_it_was_held(world: World) -> None:
    """Direct calls with explicit instants: the hold at 23:59:59, the settlement the
    next day. The spend lands on the day of the hold; the new day starts at zero."""
    w = world
    company = w.new_company()
    _, owner_key = w.user_key(company, "owner")
    user_id, _ = w.user_key(company)
    budget_id = data_of(
        _budget(
            w.as_(owner_key), company, scope="user", target_id=user_id, amount="1", period="day"
        ),
        201,
    )["id"]
    evening = datetime(2026, 5, 31, 23, 59, 59, tzinfo=UTC)
    morning = evening + timedelta(seconds=2)
    rid = uuid.uuid4().hex

    def hold(session: Any) -> None:
        budgets.hold(
            session, reservation_id=rid, company_id=company, user_id=user_id,
            api_key_id=None, hold_micro=900_000, now=evening,
        )  # fmt: skip

    w.db(hold)
    w.db(lambda s: budgets.settle(s, rid, 700_000, morning))

    def rows(session: Any) -> list[tuple[datetime, int, int]]:
        stmt = select(BudgetPeriod).where(col(BudgetPeriod.budget_id) == budget_id)
        return [(p.period_start, p.spent_micro, p.held_micro) for p in session.scalars(stmt)]

    assert w.db(rows) == [(datetime(2026, 5, 31, tzinfo=UTC), 700_000, 0)]

    def standing(session: Any) -> tuple[int, int, str | None]:
        budget = session.get(Budget, budget_id)
        s = budgets.standing(session, budget, morning)
        return s.spent_micro, s.held_micro, s.resets_at

    assert w.db(standing) == (0, 0, "2026-06-02T00:00:00.000000Z")


def _wait(condition: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_threshold_webhooks_are_signed_and_sent_once_per_threshold(world: World) -> None:
    w = world
    hold = _hold(w.cp)
    company = w.new_company("100")
    _, owner_key = w.user_key(company, "owner")
    owner = w.as_(owner_key)
    hook = f"/v1/admin/companies/{company}/webhook"
    error_of(owner.put(hook, json={"url": "ftp://x/"}), 422, "validation_error")
    error_of(owner.get(hook), 404, "not_found")
    created = data_of(owner.put(hook, json={"url": w.receiver_url}), 201)
    secret = created["secret"]
    assert secret.startswith("whsec_")
    again = data_of(owner.put(hook, json={"url": w.receiver_url}))
    assert "secret" not in again and "secret" not in data_of(owner.get(hook))
    user_id, key = w.user_key(company)
    client = w.as_(key)
    amount = format_credits(2 * hold)
    body = {"scope": "user", "target_id": user_id, "amount": amount, "period": "month"}
    budget = data_of(_budget(owner, company, **body), 201)
    inits = [data_of(_init(client), 201) for _ in range(2)]
    # The receiver is down for the first delivery: the event is retried (at least once).
    w.receiver.fail = 1
    mine = [e for e in w.receiver.received if budget["id"] in e[1].decode()]
    assert mine == []
    # Each stream is charged its whole hold: 50% (nothing), then 100% (80 and 100).
    for init in inits:
        event = usage_event(init, company, input_tokens=10**6, output_tokens=10**6)
        assert w.cp.webhook(event).status_code == 200

    def delivered() -> list[tuple[dict[str, str], bytes]]:
        return [e for e in w.receiver.received if budget["id"] in e[1].decode()]

    _wait(lambda: len(delivered()) >= 2)
    percents = []
    for headers, body in delivered():
        verify([secret], body, headers)  # signed with the company's own secret
        doc = orjson.loads(body)
        assert doc["type"] == "budget.threshold" and doc["id"] == headers["webhook-id"]
        assert doc["data"]["budget"]["id"] == budget["id"]
        assert doc["data"]["budget"]["spent"] == format_credits(2 * hold)
        percents.append(doc["data"]["percent"])
    assert sorted(percents) == [80, 100]

    def events(session: Any) -> list[tuple[int, bool, int]]:
        stmt = select(BudgetEvent).where(col(BudgetEvent.budget_id) == budget["id"])
        rows = session.scalars(stmt)
        return sorted((e.percent, e.delivered_at is not None, e.attempts) for e in rows)

    _wait(lambda: [e[:2] for e in w.db(events)] == [(80, True), (100, True)])
    # One per threshold, and the refused first post was retried (one failed attempt).
    assert sum(e[2] for e in w.db(events)) == 1 and w.receiver.fail == 0


def test_a_budget_lowered_below_its_spend_still_sends_its_thresholds(world: World) -> None:
    """An owner lowers a monthly budget under what was already spent; the stream still
    open settles past it. The thresholds were counted only when a charge went from
    under one to over it, and the spend started above both: no 80 % nor 100 %
    webhook for the period, though its spend ended at four times the budget."""
    w = world
    hold = _hold(w.cp)
    company = w.new_company("100")
    _, owner_key = w.user_key(company, "owner")
    owner = w.as_(owner_key)
    data_of(owner.put(f"/v1/admin/companies/{company}/webhook", json={"url": w.receiver_url}), 201)
    user_id, key = w.user_key(company)
    client = w.as_(key)
    body = {"scope": "user", "target_id": user_id, "amount": format_credits(4 * hold)}
    budget = data_of(_budget(owner, company, **body, period="month"), 201)
    first, second = data_of(_init(client), 201), data_of(_init(client), 201)
    whole = {"input_tokens": 10**6, "output_tokens": 10**6}  # each charged its whole hold
    assert w.cp.webhook(usage_event(first, company, **whole)).status_code == 200  # 25 %
    path = f"/v1/admin/companies/{company}/budgets/{budget['id']}"
    lowered = data_of(owner.patch(path, json={"amount": format_credits(hold // 2)}))
    assert micro(lowered["available"]) == 0  # 200 %: no new stream fits
    assert w.cp.webhook(usage_event(second, company, **whole)).status_code == 200
    [mine] = data_of(client.get("/v1/me"))["budgets"]
    assert (micro(mine["spent"]), micro(mine["held"])) == (2 * hold, 0)

    def events(session: Any) -> list[tuple[int, str]]:
        stmt = select(BudgetEvent).where(col(BudgetEvent.budget_id) == budget["id"])
        rows = session.scalars(stmt)
        return sorted((e.percent, e.payload["data"]["budget"]["spent"]) for e in rows)

    spent = format_credits(2 * hold)
    assert w.db(events) == [(80, spent), (100, spent)]


def test_tokens_per_minute_refuse_with_retry_after_and_correct_at_settlement(
    world: World,
) -> None:
    w = world
    company = w.new_company("100")
    user_id, key = w.user_key(company)
    client = w.as_(key)
    deps = w.cp.app.state.deps
    # The init's window and the settlement's "is it still current" read the app's
    # clock (the store's): pinned, the correction always applies whatever minute the
    # test runs in.
    pinned, clock = time.time(), deps.clock
    deps.clock = lambda: pinned
    try:
        before = credits_of(client)
        big = {"messages": MESSAGES, "max_tokens": TPM_PER_USER + 1}
        r = client.post("/v1/chat/init", json=big)
        error_of(r, 429, "tpm_exceeded")
        assert 1 <= int(r.headers["retry-after"]) <= 60
        assert credits_of(client) == before  # the hold taken was released
        init = data_of(_init(client), 201)

        def reservation(session: Any) -> Reservation:
            return session.get(Reservation, init["reservation_id"])

        res = w.db(reservation)
        window = window_at(pinned)

        async def read() -> bytes | None:
            return await deps.store.get(tpm.tpm_key("user", user_id, window))

        assert w.cp.on_loop(read) == str(res.input_estimate + res.max_tokens).encode()
        event = usage_event(init, company, input_tokens=2, output_tokens=3)
        assert w.cp.webhook(event).status_code == 200
        assert w.cp.on_loop(read) == b"5"
    finally:
        deps.clock = clock


def test_cli_sets_budgets_teams_and_the_webhook(
    world: World, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """In-process (`cli.main`), against the module's control plane over HTTP."""
    from llm_gateway.cli import main
    from tests.test_control_plane import ADMIN_TOKEN

    monkeypatch.setenv("LLMGW_ADMIN_TOKEN", ADMIN_TOKEN)
    monkeypatch.setenv("LLMGW_CONTROL_PLANE_URL", world.cp.url)
    company = world.new_company()
    user_id, _ = world.user_key(company)

    def admin(*args: str) -> Any:
        capsys.readouterr()
        assert main(["admin", *args]) == 0, capsys.readouterr().err
        out = capsys.readouterr().out.strip()
        return "ok" if out == "ok" else orjson.loads(out)

    team = admin("create-team", company, "research", "--user-id", user_id)
    assert team["user_ids"] == [user_id]
    budget = admin("create-budget", company, "team", team["id"], "12.5", "--period", "week")
    assert (budget["scope"], budget["amount"], budget["period"]) == ("team", "12.500000", "week")
    changed = admin("update-budget", company, budget["id"], "--amount", "3")
    assert changed["amount"] == "3.000000" and changed["period"] == "week"
    assert [b["id"] for b in admin("list-budgets", company)["items"]] == [budget["id"]]
    renamed = admin("update-team", company, team["id"], "--name", "r&d")
    assert renamed["name"] == "r&d" and renamed["user_ids"] == [user_id]
    assert admin("set-webhook", company, world.receiver_url)["secret"].startswith("whsec_")
    assert admin("delete-budget", company, budget["id"]) == "ok"
    assert admin("delete-team", company, team["id"]) == "ok"
    assert admin("list-teams", company)["items"] == []
    capsys.readouterr()
    assert main(["admin", "create-budget", company, "user", user_id, "1.5e9999"]) == 1
    assert "amount" in capsys.readouterr().err


def test_company_webhook_secrets_are_encrypted_and_rotate(world: World) -> None:
    """Stored under the Fernet ring (never in clear), re-encrypted by the rotation so an
    older key can leave ``LLMGW_ENCRYPTION_KEY``."""
    from cryptography.fernet import Fernet, MultiFernet

    from control_plane.company_webhooks import rotate_secrets
    from control_plane.tables import CompanyWebhook

    company = world.new_company()
    url = "https://hooks.example.com/x"
    r = world.cp.admin.put(f"/v1/admin/companies/{company}/webhook", json={"url": url})
    secret = data_of(r, 201)["secret"]
    current = [Fernet(k.reveal()) for k in world.cp.settings.encryption_keys]
    retired = Fernet(Fernet.generate_key())

    def stored(session: Any) -> str:
        return str(session.get(CompanyWebhook, company).secret_encrypted)

    assert secret not in world.db(stored)
    assert MultiFernet(current).decrypt(world.db(stored).encode()).decode() == secret

    def under_retired_key(session: Any) -> None:
        row = session.get(CompanyWebhook, company)
        row.secret_encrypted = retired.encrypt(secret.encode()).decode()

    world.db(under_retired_key)
    done, failed = world.db(lambda s: rotate_secrets(s, MultiFernet([*current, retired])))
    assert done >= 1 and failed == []
    assert MultiFernet(current).decrypt(world.db(stored).encode()).decode() == secret


def test_an_owner_cannot_multiply_the_budgets_one_request_is_counted_against(
    world: World,
) -> None:
    """Every budget that caps a request costs its init and its settlement a few
    statements under the company's lock, on one of the control plane's database
    threads. Unbounded, an owner put thousands of budgets on one member (500 made
    each init and settlement take over a second; the cap allowed 10,000) and a
    handful of that member's inits held every database thread, for every tenant.
    One budget per target and period; a user in at most TEAMS_PER_USER_MAX teams."""
    w = world
    company = w.new_company()
    owner = w.as_(w.user_key(company, "owner")[1])
    member, member_key = w.user_key(company)
    on_member = {"scope": "user", "target_id": member, "amount": "50", "period": "day"}
    daily = data_of(_budget(owner, company, **on_member), 201)
    error_of(_budget(owner, company, **{**on_member, "amount": "60"}), 409, "conflict")
    weekly = data_of(_budget(owner, company, **{**on_member, "period": "week"}), 201)
    path = f"/v1/admin/companies/{company}/budgets/{weekly['id']}"
    error_of(owner.patch(path, json={"period": "day"}), 409, "conflict")
    assert {b["id"]: b["period"] for b in _budgets_of(w, company)} == {
        daily["id"]: "day",
        weekly["id"]: "week",
    }
    # Teams: each may carry its own budgets, so a user's teams are bounded too.
    teams = f"/v1/admin/companies/{company}/teams"
    for i in range(budget_admin.TEAMS_PER_USER_MAX):
        body = {"name": f"t{i}", "user_ids": [member]}
        team = data_of(owner.post(teams, json=body), 201)
        _budget(owner, company, scope="team", target_id=team["id"], amount="50", period="day")
    message = error_of(
        owner.post(teams, json={"name": "one-more", "user_ids": [member]}), 422, "validation_error"
    )
    assert "user_ids[0]" in message
    other = data_of(owner.post(teams, json={"name": "one-more"}), 201)
    refused = owner.patch(f"{teams}/{other['id']}", json={"user_ids": [member]})
    error_of(refused, 422, "validation_error")
    listed = {t["id"]: t["user_ids"] for t in data_of(owner.get(teams))["items"]}
    assert listed[other["id"]] == []
    # What the member's requests are counted against: 2 of its own, 1 per team.
    counted = data_of(w.as_(member_key).get("/v1/me"))["budgets"]
    assert len(counted) == 2 + budget_admin.TEAMS_PER_USER_MAX
    data_of(_init(w.as_(member_key)), 201)


def test_listing_a_companys_budgets_reads_their_counters_at_once(world: World) -> None:
    """A company may keep 10,000 budgets: its listing read each one's counters with a
    query of its own (2,000 budgets: 2.3 s of a database thread per GET, which an
    owner could repeat on every thread). The statements it sends do not grow with the
    budgets."""
    from sqlalchemy import event as sa_event

    w = world
    engine = w.cp.app.state.db.engine

    def statements_of_listing(company: str, owner: httpx.Client) -> int:
        sent: list[str] = []

        def count(*args: Any) -> None:
            # Only the listing's reads of the counters: the sweeper shares the engine
            # meanwhile, and its retention pass reads them too (against the holds).
            statement = str(args[2])
            if "budget_periods" in statement and "reservation_budgets" not in statement:
                sent.append(statement)

        sa_event.listen(engine, "before_cursor_execute", count)
        try:
            assert owner.get(f"/v1/admin/companies/{company}/budgets").status_code == 200
        finally:
            sa_event.remove(engine, "before_cursor_execute", count)
        return len(sent)

    counted = []
    for users in (1, 10):
        company = w.new_company()
        owner = w.as_(w.user_key(company, "owner")[1])
        for _ in range(users):
            member = w.user_key(company)[0]
            for period in budget_math.PERIODS:
                body = {"scope": "user", "target_id": member, "amount": "5", "period": period}
                data_of(_budget(owner, company, **body), 201)
        counted.append(statements_of_listing(company, owner))
    assert counted[1] == counted[0], counted


def test_listing_a_companys_teams_reads_their_members_at_once(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Teams were unbounded in number and their listing read each one's members with
    a query of its own; now at most TEAMS_PER_COMPANY_MAX, read in one SELECT."""
    from sqlalchemy import event as sa_event

    w = world
    monkeypatch.setattr(budget_admin, "TEAMS_PER_COMPANY_MAX", 12)  # the server's thread
    engine = w.cp.app.state.db.engine
    counted = []
    for teams in (1, 12):
        company = w.new_company()
        owner = w.as_(w.user_key(company, "owner")[1])
        member = w.user_key(company)[0]
        path = f"/v1/admin/companies/{company}/teams"
        for i in range(teams):
            data_of(owner.post(path, json={"name": f"t{i}", "user_ids": [member][: i % 2]}), 201)
        sent: list[str] = []

        def count(*args: Any, into: list[str] = sent) -> None:
            # Only the members' reads: the sweeper shares the engine meanwhile.
            if "team_members" in str(args[2]):
                into.append(str(args[2]))

        sa_event.listen(engine, "before_cursor_execute", count)
        try:
            listed = data_of(owner.get(path))["items"]
        finally:
            sa_event.remove(engine, "before_cursor_execute", count)
        assert {t["name"]: t["user_ids"] for t in listed} == {
            f"t{i}": [member][: i % 2] for i in range(teams)
        }
        counted.append(len(sent))
    assert counted[1] == counted[0], counted
    error_of(owner.post(path, json={"name": "one-more"}), 409, "conflict")
