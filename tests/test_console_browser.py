"""The console (issue 17) as people use it: Debian's chromium driven by playwright
against a real control plane on a socket (usage comes from real inits settled by
signed webhooks, as the edge sends them). Each page is screenshotted and checked
non-blank, and checked by axe-core (vendored in tests/fixtures/axe, injected into
the page: the console never ships it). Never downloads a browser."""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from tests.chromium import assert_not_blank, browser, watched_page
from tests.polling import wait_until
from tests.test_console_api import SECRET_PROVIDER_KEY, _stream
from tests.test_console_heavy_reads import ADMITTED, SUMMARY, _fire, _gate, _locked, _waiting_on
from tests.test_control_plane import (
    ADMIN_TOKEN,
    CP,
    PASSWORD,
    _settings,
    data_of,
    error_of,
    serve_cp,
    start_cp,
    usage_event,
)

__all__ = ["browser"]  # the fixture, used by name

AXE = Path(__file__).parent / "fixtures" / "axe" / "axe.min.js"
TABS = ("usage", "credits", "users", "keys", "providers", "audit")


@pytest.fixture(scope="module")
def cp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CP]:
    database = tmp_path_factory.mktemp("console-browser") / "cp.db"
    with serve_cp(_settings(f"sqlite:///{database}")) as handle:
        yield handle


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    # bypass_csp: only so the test can inject axe-core; the page itself loads no
    # script of another origin.
    with watched_page(browser, 1280, 900) as page:
        yield page


class Company:
    """A company with an owner, a member and some usage, as the API sees it."""

    def __init__(self, cp: CP) -> None:
        self.id = cp.company("20")
        self.owner = cp.user(self.id, "owner")
        self.member = cp.user(self.id, "member")
        self.owner_key = cp.api_key(self.owner["id"])
        owner_client = cp.client(self.owner_key)
        token = data_of(
            cp.client().post(
                "/v1/auth/login", json={"email": self.member["email"], "password": PASSWORD}
            )
        )["access_token"]
        member_client = cp.client(token)
        _stream(cp, owner_client, self.id, 120, ttft=180)
        _stream(cp, owner_client, self.id, 40, ttft=90)
        _stream(cp, member_client, self.id, 300, ttft=240)
        self.owner_api = owner_client


@pytest.fixture(scope="module")
def company(cp: CP) -> Company:
    return Company(cp)


def sign_in(page: Any, cp: CP, email: str, path: str = "/console") -> None:
    page.goto(cp.url + path)
    page.fill("#email", email)
    page.fill("#password", PASSWORD)
    page.click("#sign-in")


def open_tab(page: Any, name: str) -> None:
    page.click(f".tab[data-tab={name}]")
    page.wait_for_selector(f"body[data-loaded={name}]")


def check_page(page: Any, browser: Any, tmp_path: Path, name: str) -> None:
    """A screenshot that is not blank, and no axe-core violation (WCAG 2 A/AA)."""
    shot = page.screenshot(path=str(tmp_path / f"console-{name}.png"), full_page=True)
    assert_not_blank(browser, shot)
    if not page.evaluate("typeof axe !== 'undefined'"):
        page.add_script_tag(path=str(AXE))
    result = page.evaluate(
        """async () => {
            const r = await axe.run(document, {runOnly: ['wcag2a', 'wcag2aa']});
            return {passes: r.passes.length, violations: r.violations.map(v =>
                `${v.id}: ${v.nodes.map(n => n.target.join(' ')).join(', ')}`)};
        }"""
    )
    assert result["passes"] > 10, result  # axe really ran its rules on this page
    assert result["violations"] == [], f"{name}: {result['violations']}"


def test_a_member_does_not_see_the_console(
    cp: CP, company: Company, page: Any, browser: Any, tmp_path: Path
) -> None:
    asked: list[str] = []
    page.on("request", lambda r: asked.append(r.url) if "/v1/" in r.url else None)
    page.goto(cp.url + "/console")
    check_page(page, browser, tmp_path, "sign-in")
    sign_in(page, cp, company.member["email"])
    page.wait_for_selector("#denied", state="visible")
    check_page(page, browser, tmp_path, "denied")
    assert not page.is_visible("#app") and not page.is_visible("#signin")
    # Nothing beyond sign-in and /v1/me was even asked for.
    assert {url.split("?")[0].removeprefix(cp.url) for url in asked} == {
        "/v1/auth/login",
        "/v1/me",
    }


def test_an_owner_reads_its_usage_and_manages_keys_and_providers(
    cp: CP, company: Company, page: Any, browser: Any, tmp_path: Path
) -> None:
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.accept()))
    sign_in(page, cp, company.owner["email"])
    page.wait_for_selector("body[data-loaded=usage]")

    # The chart's numbers are the API's: its stacks add up to /v1/usage's records.
    usage = data_of(company.owner_api.get("/v1/usage", params={"limit": 200}))["items"]
    assert len(usage) == 3
    charted = page.evaluate(
        """() => Chart.getChart('spend-chart').data.datasets.map(d => [d.label,
               d.data.reduce((a, b) => a + b, 0)])"""
    )
    assert [label for label, _ in charted] == ["mock-fast"]
    expected = sum(Decimal(u["cost"]) for u in usage)
    assert round(Decimal(str(charted[0][1])), 6) == expected
    tokens = page.evaluate(
        "() => Chart.getChart('tokens-chart').data.datasets[0].data.reduce((a, b) => a + b, 0)"
    )
    assert tokens == sum(u["input_tokens"] + u["output_tokens"] for u in usage)
    assert f"{expected:.6f} credits" in page.inner_text("#usage-totals")
    top_users = page.locator("#top-users tbody tr td:first-child").all_inner_texts()
    assert sorted(top_users) == sorted([company.owner["email"], company.member["email"]])
    assert page.locator("#top-keys tbody tr").count() == 2  # the owner's key, and logins
    assert page.inner_text("#ttft tbody").split() == [
        "mock-fast",
        "3",
        "180",
        "ms",
        "240",
        "ms",
    ]
    # Split by user: one stack per person.
    page.select_option("#split", "user")
    page.click("#apply-range")
    page.wait_for_selector("body[data-loaded=usage]")
    labels = page.evaluate(
        "() => Chart.getChart('spend-chart').data.datasets.map(d => d.label).sort()"
    )
    assert labels == sorted([company.owner["email"], company.member["email"]])
    check_page(page, browser, tmp_path, "usage")

    # Credits: the balance and the ledger, as /v1/credits says.
    open_tab(page, "credits")
    credits = data_of(company.owner_api.get("/v1/credits"))
    assert page.inner_text("#credits-available") == credits["available"]
    assert page.locator("#ledger tbody tr").count() == len(credits["entries"])
    # A reservation's audit trail: its hold and its settlement, each with its actor.
    page.locator("#ledger tbody tr", has_text="charge").first.get_by_role("button").click()
    page.wait_for_selector("body[data-loaded=audit]")
    trail = page.locator("#audit tbody tr td:nth-child(2)").all_inner_texts()
    assert sorted(trail) == ["charge", "hold", "release"]
    actors = page.locator("#audit tbody tr td:nth-child(3)").all_inner_texts()
    assert "edge-webhook" in actors
    check_page(page, browser, tmp_path, "credits")

    # API keys: create one for the member (shown once), it works; revoke it after
    # the page asks, and it stops working.
    open_tab(page, "keys")
    page.select_option("#key-user", company.member["id"])
    page.click("#create-key")
    page.wait_for_selector("#new-key-box", state="visible")
    key = page.inner_text("#new-key")
    assert key.startswith("sk_")
    assert cp.client(key).get("/v1/me").status_code == 200
    check_page(page, browser, tmp_path, "keys")
    row = page.locator("#keys tbody tr", has_text=company.member["email"]).first
    row.get_by_role("button", name="Revoke").click()
    page.wait_for_selector("#keys tbody tr:has-text('revoked')")
    assert dialogs and "Revoke the key" in dialogs[-1]
    assert cp.client(key).get("/v1/me").status_code == 401

    # Providers: set the company's own key; the page never shows it back.
    open_tab(page, "providers")
    page.select_option("#provider", "openai")
    page.fill("#provider-key", SECRET_PROVIDER_KEY)
    page.click("#save-provider")
    page.wait_for_selector("#providers tbody tr:has-text('own key set')")
    assert page.input_value("#provider-key") == ""
    assert SECRET_PROVIDER_KEY not in page.content()
    listed = data_of(company.owner_api.get(f"/v1/admin/companies/{company.id}/providers"))
    assert [(p["provider"], p["has_key"]) for p in listed["items"]] == [("openai", True)]
    assert SECRET_PROVIDER_KEY not in str(listed)
    # A model override the platform's key may carry (a limit) is saved; a price on
    # the platform's key is refused by the API, inline, and changes nothing.
    page.select_option("#model-provider", "mock")
    page.fill("#model-id", "mock-fast")
    page.fill("#model-max-output", "512")
    page.click("#save-model")
    page.wait_for_selector("#overrides tbody tr:has-text('mock-fast')")
    models = data_of(company.owner_api.get("/v1/models"))["models"]
    assert {m["id"]: m["max_output_tokens"] for m in models}["mock-fast"] == 512
    page.select_option("#model-provider", "mock")
    page.fill("#model-id", "mock-fast")
    page.fill("#model-price-in", "0.0001")
    page.click("#save-model")
    page.wait_for_selector('#model-error:has-text("needs the company\'s own api_key")')
    models = data_of(company.owner_api.get("/v1/models"))["models"]
    price = {m["id"]: m["price"] for m in models}["mock-fast"]
    assert Decimal(price["input_per_mtok"]) == 1  # the packaged price stands
    check_page(page, browser, tmp_path, "providers")

    # Users: the API's validation error inline; acting above the owner's role is
    # refused by the API even when the form is tampered with.
    open_tab(page, "users")
    assert page.locator("#invite-role option").all_inner_texts() == ["member", "owner"]
    page.fill("#invite-email", "not-an-email")
    page.click("#invite")
    page.wait_for_selector("#invite-error:has-text('email: must be an email address')")
    climber = f"climb-{uuid.uuid4().hex[:6]}@example.com"
    page.evaluate("() => document.querySelector('#invite-role').add(new Option('admin', 'admin'))")
    page.fill("#invite-email", climber)
    page.select_option("#invite-role", "admin")
    page.click("#invite")
    page.wait_for_selector("#invite-error:has-text('role admin')")
    users = data_of(cp.admin.get(f"/v1/admin/users?company_id={company.id}"))["items"]
    assert climber not in {u["email"] for u in users}
    invited = f"new-{uuid.uuid4().hex[:6]}@example.com"
    page.fill("#invite-email", invited)
    page.select_option("#invite-role", "member")
    page.click("#invite")
    page.wait_for_selector(f"#users tbody tr:has-text('{invited}')")
    # A role change asks first and goes through the API; above the owner's rank it
    # is refused inline even with a tampered select.
    role_of = page.get_by_label(f"Role of {invited}")
    role_of.select_option("owner")
    page.wait_for_selector("#status:has-text('is now owner')")
    assert "Make " in dialogs[-1] and invited in dialogs[-1]
    role_of = page.get_by_label(f"Role of {invited}")
    role_of.evaluate("(s) => s.add(new Option('admin', 'admin'))")
    role_of.select_option("admin")
    page.wait_for_selector("#users-error:has-text('only a platform admin')")
    users = data_of(cp.admin.get(f"/v1/admin/users?company_id={company.id}"))["items"]
    assert {u["email"]: u["role"] for u in users}[invited] == "owner"
    # Disable (asks first), see the revocation, lift it; an unknown token: inline.
    page.get_by_role("button", name=f"Disable {invited}").click()
    page.wait_for_selector(f"#users tbody tr:has-text('{invited}'):has-text('disabled')")
    assert "Disable " in dialogs[-1]
    page.locator("#revocations tbody tr", has_text=invited).get_by_role("button").click()
    page.wait_for_selector(f"#revocations tbody tr:has-text('{invited}'):has-text('lifted')")
    page.fill("#revoke-jti", "no-such-token")
    page.click("#revoke-stream")
    page.wait_for_selector("#jti-error:has-text('No such token')")
    check_page(page, browser, tmp_path, "users")

    # Audit: the administration just done, with its actor.
    open_tab(page, "audit")
    page.select_option("#audit-kind", "admin.*")
    page.click("#audit-apply")
    page.wait_for_selector("body[data-loaded=audit]")
    kinds = page.locator("#audit tbody tr td:nth-child(2)").all_inner_texts()
    assert kinds[:8] == [
        "admin.revocation.lift",
        "admin.revocation.create",
        "admin.user.role",
        "admin.user.create",
        "admin.provider.set",
        "admin.provider.set",
        "admin.api_key.revoke",
        "admin.api_key.create",
    ]
    assert SECRET_PROVIDER_KEY not in page.content()
    check_page(page, browser, tmp_path, "audit")


def test_an_owner_cannot_see_another_company(cp: CP, company: Company, page: Any) -> None:
    other = cp.company("5")
    sign_in(page, cp, company.owner["email"], path=f"/console?company={other}")
    page.wait_for_selector("body[data-loaded=usage]")
    assert "owner, for its own company" in page.inner_text("#usage-error")
    assert page.inner_text("#top-users tbody") == ""
    open_tab(page, "users")
    assert page.inner_text("#users-error") == "No such company."
    assert page.locator("#users tbody tr").count() == 0


def test_the_platform_admin_sees_every_company(
    cp: CP, company: Company, page: Any, browser: Any, tmp_path: Path
) -> None:
    # More companies than the console's (shrunk) cap: its picker and table say so.
    while len(data_of(cp.admin.get("/v1/admin/companies", params={"limit": 200}))["items"]) <= CAP:
        cp.company("1")
    shrink_paging(page)
    page.goto(cp.url + "/console")
    page.click("summary")
    page.fill("#token", ADMIN_TOKEN)
    page.click("#use-token")
    page.wait_for_selector("body[data-loaded=usage]")
    assert page.is_visible("#company-picker")
    # Across companies: at least this company's spend.
    total = page.evaluate(
        """() => Chart.getChart('spend-chart').data.datasets
                 .reduce((s, d) => s + d.data.reduce((a, b) => a + b, 0), 0)"""
    )
    usage = data_of(company.owner_api.get("/v1/usage", params={"limit": 200}))["items"]
    assert Decimal(str(total)) >= sum(Decimal(u["cost"]) for u in usage)
    open_tab(page, "credits")
    companies = data_of(cp.admin.get("/v1/admin/companies", params={"limit": 200}))["items"]
    assert rows(page, "companies") == CAP
    assert page.locator("#company option").all_inner_texts()[-1] == f"Show {CAP} more companies…"
    # The picker's own last choice walks further and keeps the company chosen.
    everyone = len(data_of(cp.admin.get("/v1/admin/companies", params={"limit": 200}))["items"])
    options = 1 + min(everyone, 2 * CAP) + (everyone > 2 * CAP)
    page.select_option("#company", "more")
    page.wait_for_function(
        f"() => document.querySelectorAll('#company option').length == {options}"
    )
    assert page.input_value("#company") == ""
    while page.locator(".partial[data-list=companies]").count():
        shown = rows(page, "companies")
        show_more(page, "companies", "companies", min(shown + CAP, len(companies)))
    assert len(page.locator("#company option").all_inner_texts()) == len(companies) + 1
    balances = dict(
        zip(
            page.locator("#companies tbody tr td:first-child").all_inner_texts(),
            page.locator("#companies tbody tr td:last-child").all_inner_texts(),
            strict=True,
        )
    )
    assert balances == {c["name"]: c["credits"] for c in companies}
    page.select_option("#company", company.id)
    page.wait_for_selector("body[data-loaded=credits]")
    open_tab(page, "keys")
    assert page.locator("#keys tbody tr:not(.empty)").count() >= 1
    check_page(page, browser, tmp_path, "admin-keys")


def test_agents_teams_and_budgets_through_the_console(
    cp: CP, company: Company, page: Any, browser: Any, tmp_path: Path
) -> None:
    """An owner creates an agent, a team and a team budget from the console, through
    the real admin API (DESIGN §11 shapes), and deletes the agent after a question."""
    sign_in(page, cp, company.owner["email"])
    page.wait_for_selector("body[data-loaded=usage]")
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.accept()))
    open_tab(page, "plans")
    assert page.is_visible("#agent-form") and not page.is_visible("#agents-off")

    page.fill("#agent-name", "support")
    page.select_option("#agent-model", "mock-fast")
    page.fill("#agent-max-tokens", "300")
    page.fill("#agent-prompt", "Be brief.")
    page.click("#create-agent")
    page.wait_for_selector("#agents tbody tr:has-text('support')")
    page.fill("#team-name", "night shift")
    page.select_option("#team-users", [company.member["id"]])
    page.click("#create-team")
    page.wait_for_selector("#teams tbody tr:has-text('night shift')")
    base = f"/v1/admin/companies/{company.id}"
    teams = data_of(company.owner_api.get(f"{base}/teams"))["items"]
    team = next(t for t in teams if t["name"] == "night shift")
    assert company.member["id"] in team["user_ids"]
    page.select_option("#budget-scope", "team")
    page.select_option("#budget-target", team["id"])
    page.fill("#budget-amount", "12.5")
    page.select_option("#budget-period", "week")
    page.click("#create-budget")
    page.wait_for_selector("#budgets tbody tr:has-text('night shift')")
    check_page(page, browser, tmp_path, "plans")
    budgets = data_of(company.owner_api.get(f"{base}/budgets"))["items"]
    assert [(b["scope"], b["target_id"], b["period"]) for b in budgets] == [
        ("team", team["id"], "week")
    ]
    agent = data_of(company.owner_api.get(f"{base}/agents/support"))
    assert (agent["model"], agent["system_prompt"], agent["max_tokens"]) == (
        "mock-fast",
        "Be brief.",
        300,
    )
    page.get_by_role("button", name="Delete agent support").click()
    page.wait_for_selector("#agents tbody tr.empty")
    assert dialogs == ["Delete agent support?"]
    assert company.owner_api.get(f"{base}/agents/support").status_code == 404


# Markup that runs a script wherever it is parsed as HTML (the CSP is set aside by the
# `page` fixture, so only the rendering stands between it and the page).
HOSTILE = "<img/src/onerror=window.pwned=1>"


def test_hostile_names_render_as_text_on_every_tab(cp: CP, page: Any) -> None:
    """Attack: an owner (or a company the platform admin created) puts markup in
    every string the console shows another owner or the platform admin: emails, the
    company's name, model ids, agent and team names, revocation and grant reasons,
    the audit's details, the usage chart's series."""
    company_id = data_of(
        cp.admin.post("/v1/admin/companies", json={"name": f"co{HOSTILE}", "credits": "50"}), 201
    )["id"]
    owner_email = f"{HOSTILE}-{uuid.uuid4().hex[:6]}@x.co"
    owner = data_of(
        cp.admin.post(
            "/v1/admin/users",
            json={
                "company_id": company_id,
                "email": owner_email,
                "password": PASSWORD,
                "role": "owner",
            },
        ),
        201,
    )
    api = cp.client(cp.api_key(owner["id"]))
    base = f"/v1/admin/companies/{company_id}"
    model = f"m{HOSTILE}"
    data_of(
        api.put(
            f"{base}/providers/openai",
            json={
                "api_key": SECRET_PROVIDER_KEY,
                "models": {
                    model: {
                        "context_length": 8000,
                        "max_output_tokens": 500,
                        "price": {"input_per_mtok": "1", "output_per_mtok": "1"},
                    }
                },
            },
        )
    )
    data_of(api.post(f"{base}/agents", json={"name": "bot", "model": model}), 201)
    team = data_of(api.post(f"{base}/teams", json={"name": f"t{HOSTILE}", "user_ids": []}), 201)
    data_of(
        api.post(
            f"{base}/budgets",
            json={"scope": "team", "target_id": team["id"], "amount": "1", "period": "month"},
        ),
        201,
    )
    member = cp.user(company_id, "member")
    data_of(
        api.post("/v1/admin/revocations", json={"user_id": member["id"], "reason": f"r{HOSTILE}"}),
        201,
    )
    data_of(
        cp.admin.post(
            f"{base}/credits",
            json={"amount": "1", "reason": f"g{HOSTILE}"},
            headers={"Idempotency-Key": uuid.uuid4().hex},
        ),
        201,
    )
    init = data_of(
        api.post("/v1/chat/init", json={"query": "hi", "model": model, "max_tokens": 10}), 201
    )
    first_token = (datetime.now(UTC) - timedelta(seconds=2)).isoformat()
    event = usage_event(init, company_id, provider="openai", first_token_at=first_token)
    assert cp.webhook(event).status_code == 200

    def nothing_ran(tab: str) -> None:
        injected = page.evaluate(
            """() => [window.pwned, document.querySelectorAll(
                'main img, main svg, main iframe, main object, main embed').length]"""
        )
        assert injected == [None, 0], tab

    def use_token(token: str) -> None:
        page.goto(cp.url + "/console")
        page.click("summary")
        page.fill("#token", token)
        page.click("#use-token")
        page.wait_for_selector("body[data-loaded=usage]")

    use_token(cp.api_key(owner["id"]))
    assert HOSTILE in page.text_content("#who")
    assert page.evaluate("() => Chart.getChart('spend-chart').data.datasets[0].label") == model
    assert HOSTILE in page.text_content("#ttft")
    nothing_ran("usage")
    page.select_option("#split", "user")
    page.click("#apply-range")
    page.wait_for_selector("body[data-loaded=usage]")
    assert HOSTILE in page.text_content("#spend-table")
    nothing_ran("usage by user")
    for tab in ("credits", "users", "keys", "providers", "plans", "audit"):
        open_tab(page, tab)
        assert HOSTILE in page.text_content(f"#tab-{tab}"), tab
        nothing_ran(tab)
    # The platform admin: every company's name, in the picker and the balances.
    page.click("#sign-out")
    page.wait_for_selector("#signin", state="visible")
    use_token(ADMIN_TOKEN)
    open_tab(page, "credits")
    assert f"co{HOSTILE}" in page.text_content("#companies")
    assert f"co{HOSTILE}" in page.locator("#company option").all_inner_texts()
    nothing_ran("admin credits")
    # A link naming a tab that is no tab (an Object.prototype member) opens the usage.
    for tab in ("__proto__", "constructor"):
        page.goto(f"{cp.url}/console?tab={tab}")
        page.wait_for_selector("body[data-loaded=usage]")
        assert page.is_visible("#tab-usage")


def test_sign_out_ends_the_token_on_the_server(cp: CP, company: Company, page: Any) -> None:
    """The console's *Sign out* ends its access token (`POST /v1/auth/logout`), not
    only its own copy: a copy taken before (a lost laptop's) is refused after."""
    sign_in(page, cp, company.owner["email"])
    page.wait_for_selector("body[data-loaded=usage]")
    token = page.evaluate("() => window.llmgwConsole.token")
    assert data_of(cp.client(token).get("/v1/me"))["user"]["id"] == company.owner["id"]
    page.click("#sign-out")
    page.wait_for_selector("#signin", state="visible")
    assert page.evaluate("() => sessionStorage.length") == 0
    assert error_of(cp.client(token).get("/v1/me"), 401, "signed_out")


# sha256 of `package/dist/chart.umd.min.js` in `npm pack chart.js@4.6.1` (the release
# vendor/README.md names); an update changes both this and the page's `integrity`.
CHART_JS_4_6_1 = "87364cc2b2a76a6684929e7d6b80b18a897794db38400caff1fcf1791c6925d2"


def test_a_tampered_chart_library_never_runs(cp: CP, company: Company, page: Any) -> None:
    """Attack: the vendored 200 KB minified library, which no reviewer reads, is
    swapped for one that also reads the owner's token (a hostile update, a cache or
    proxy in between). The page pins its hash (Subresource Integrity): the browser
    refuses any other bytes, and the console works on without charts."""
    vendored = Path(__file__).parents[1] / "control_plane/console/vendor/chart.umd.min.js"
    original = vendored.read_bytes()
    assert hashlib.sha256(original).hexdigest() == CHART_JS_4_6_1
    # It ran: on a later sign-in it could read `sessionStorage` as well.
    tampered = original + b"\n;window.pwned = 'ran';"
    page.route(
        cp.url + "/console/vendor/chart.umd.min.js",
        lambda route: route.fulfill(body=tampered, content_type="text/javascript"),
    )
    sign_in(page, cp, company.owner["email"])
    page.wait_for_selector("body[data-loaded=usage]")
    assert page.evaluate("[window.pwned, typeof Chart]") == [None, "undefined"]
    assert "credits from" in page.inner_text("#usage-totals")  # the numbers remain


# The console walks lists `size` rows a request, `pages` requests at a time; the
# tests shrink both instead of creating 4,001 rows (the walk is the same code).
# A chart stacks its `series` costliest series and one "Other": shrunk the same way.
PAGING = {"size": 2, "pages": 2, "series": 3}
CAP = PAGING["size"] * PAGING["pages"]


class LargeCompany:
    """A company holding one row more than the console's (shrunk) cap of every list it
    walks: users, API keys, budgets, and usage groups per day and user."""

    def __init__(self, cp: CP) -> None:
        self.id = cp.company("20")
        self.owner = cp.user(self.id, "owner")
        members = [cp.user(self.id, "member", password=None) for _ in range(CAP)]
        self.users = [self.owner, *members]
        self.keys = [cp.api_key(u["id"]) for u in self.users]
        self.api = cp.client(self.keys[0])
        base = f"/v1/admin/companies/{self.id}"
        for user in self.users:
            body = {"scope": "user", "target_id": user["id"], "amount": "5", "period": "month"}
            data_of(self.api.post(f"{base}/budgets", json=body), 201)
        for key in self.keys:
            _stream(cp, cp.client(key), self.id, 50, ttft=100)


@pytest.fixture(scope="module")
def large(cp: CP) -> LargeCompany:
    return LargeCompany(cp)


def shrink_paging(page: Any, paging: dict[str, int] = PAGING) -> None:
    page.add_init_script(f"window.llmgwConsolePaging = {json.dumps(paging)}")


def rows(page: Any, table: str) -> int:
    return int(page.locator(f"#{table} tbody tr:not(.empty)").count())


def show_more(page: Any, name: str, table: str, expected: int) -> None:
    """Click the notice's button for list `name`; wait for `table` to hold `expected` rows."""
    page.locator(f".partial[data-list={name}]").get_by_role("button").click()
    page.wait_for_function(
        "([table, n]) => document.querySelectorAll(`#${table} tbody tr:not(.empty)`).length === n"
        " && document.body.dataset.loaded !== ''",
        arg=[table, expected],
    )


def test_a_large_company_is_never_silently_cut_short(
    cp: CP, large: LargeCompany, page: Any, browser: Any, tmp_path: Path
) -> None:
    """Attack (a demanding owner of a large company): every list the console shows
    stopped after its cap of pages (20 x 200: a company's 4,001st budget, user or key,
    its usage groups past 4,000) with no word; the charts' totals too. Now each says it
    shows the first part, and a button loads the next."""
    shrink_paging(page)
    sign_in(page, cp, large.owner["email"])
    page.wait_for_selector("body[data-loaded=usage]")
    total = len(large.users)
    page.select_option("#split", "user")
    page.click("#apply-range")
    page.wait_for_selector("body[data-loaded=usage]")
    assert f"first {CAP} " in page.inner_text(".partial[data-list=series]")
    assert page.inner_text("#usage-totals").startswith(f"{CAP} streams")
    show_more(page, "series", "spend-table", total)
    assert page.inner_text("#usage-totals").startswith(f"{total} streams")
    assert page.locator(".partial[data-list=series]").count() == 0

    open_tab(page, "users")
    assert rows(page, "users") == CAP
    assert f"first {CAP} users" in page.inner_text(".partial[data-list=users]")
    show_more(page, "users", "users", total)
    assert page.locator(".partial[data-list=users]").count() == 0

    open_tab(page, "keys")
    assert rows(page, "keys") == CAP
    show_more(page, "keys", "keys", total)

    open_tab(page, "plans")
    assert rows(page, "budgets") == CAP
    assert f"first {CAP} budgets" in page.inner_text(".partial[data-list=budgets]")
    check_page(page, browser, tmp_path, "plans-partial")
    show_more(page, "budgets", "budgets", total)
    # Every budget names its user: the pickers' list of users was walked further too.
    targets = page.locator("#budgets tbody tr td:first-child").all_inner_texts()
    assert sorted(targets) == sorted(f"user {u['email']}" for u in large.users)


def use_admin_token(page: Any, cp: CP, path: str = "/console") -> None:
    page.goto(cp.url + path)
    page.click("summary")
    page.fill("#token", ADMIN_TOKEN)
    page.click("#use-token")


def test_a_walk_that_fails_part_way_never_leaves_a_table_that_looks_whole(
    cp: CP, large: LargeCompany, page: Any
) -> None:
    """Attack (the network, a proxy, a restart): one request of a tab's several walks
    fails on its second page. A table kept what it showed before (the previously chosen
    company's users, with their Disable buttons, under the new company's name), and a
    list the Agents tab needs (its API keys) failed with no word at all."""
    small = cp.company("1")
    small_users = [cp.user(small, "member", password=None) for _ in range(PAGING["size"] + 1)]
    shrink_paging(page)
    # The company picker's walk drops on its second page: it says so, not "no company".
    while len(data_of(cp.admin.get("/v1/admin/companies"))["items"]) <= PAGING["size"]:
        cp.company("1")
    page.route(
        lambda url: "/v1/admin/companies" in url and "cursor=" in url, lambda route: route.abort()
    )
    use_admin_token(page, cp, f"/console?company={large.id}&tab=users")
    page.wait_for_selector("body[data-loaded=users]")
    assert rows(page, "users") == CAP
    choices = page.locator("#company option").all_inner_texts()
    assert "Companies could not be listed: The control plane cannot be reached." in choices
    page.unroute_all()
    page.reload()  # the token is kept for the tab: the console starts again, whole
    page.wait_for_selector("body[data-loaded=users]")
    # Every second page of the users' walks drops on the way.
    page.route(
        lambda url: "/v1/admin/users" in url and "cursor=" in url, lambda route: route.abort()
    )
    page.select_option("#company", small)
    page.wait_for_selector("body[data-loaded=users]")
    assert page.inner_text("#users-error") == "The control plane cannot be reached."
    shown = page.locator("#users tbody").inner_text()
    assert not any(u["email"] in shown for u in large.users), shown
    assert rows(page, "users") == 0
    page.unroute_all()

    # The Agents tab walks five lists at once: its API keys' second page drops.
    assert len(small_users) > PAGING["size"]
    for user in small_users:
        cp.api_key(user["id"])
    page.route(
        lambda url: "/v1/admin/api-keys" in url and "cursor=" in url, lambda route: route.abort()
    )
    open_tab(page, "plans")
    assert page.inner_text("#plans-error") == "The control plane cannot be reached."


def test_a_session_ended_mid_use_returns_to_sign_in(cp: CP, large: LargeCompany, page: Any) -> None:
    """Attack: the owner's access token ends while the console is open (it expired, an
    admin disabled the owner, it was signed out elsewhere). Each tab then said only
    "…" inline, kept showing the company's users and keys from before, and kept the
    dead token in the tab's storage. Now the first 401 clears the page and asks to sign
    in again."""
    sign_in(page, cp, large.owner["email"])
    page.wait_for_selector("body[data-loaded=usage]")
    open_tab(page, "users")
    assert large.owner["email"] in page.inner_text("#users")
    token = page.evaluate("() => window.llmgwConsole.token")
    assert cp.client(token).post("/v1/auth/logout").status_code == 200
    page.click(".tab[data-tab=keys]")
    page.wait_for_selector("#signin", state="visible")
    assert page.inner_text("#signin-error").startswith("Your session ended")
    assert not page.is_visible("#app")
    assert large.owner["email"] not in page.inner_text("main")
    assert page.evaluate("() => [sessionStorage.length, window.llmgwConsole.token]") == [0, None]


def test_a_slow_answer_for_the_company_left_never_lands_on_the_one_chosen(
    cp: CP, large: LargeCompany, page: Any
) -> None:
    """Attack (a slow network, a busy control plane): the platform admin opens company
    A's users and, before they come, picks company B. B's came first and A's late
    answer was then drawn over them: A's users, with their *Disable* buttons, under
    B's name in the picker, and A's walk went on asking for its every page (a usage
    series: up to 20 heavy reads). Now a load that a later one superseded draws
    nothing and asks for nothing more."""
    small = cp.company("1")
    small_user = cp.user(small, "member", password=None)
    held: list[Any] = []
    asked: list[str] = []

    def hold_the_first(route: Any) -> None:
        asked.append(route.request.url)
        if len(asked) == 1:
            held.append(route)
        else:
            route.continue_()

    # One user a page: A's walk is 5 pages long.
    shrink_paging(page, {"size": 1, "pages": 20})
    page.route(lambda url: "/v1/admin/users" in url and large.id in url, hold_the_first)
    use_admin_token(page, cp, f"/console?company={large.id}&tab=users")
    page.wait_for_selector("#company-picker", state="visible")
    page.wait_for_function("() => document.body.dataset.loaded === ''")
    page.select_option("#company", small)
    page.wait_for_selector(f"#users tbody tr:has-text('{small_user['email']}')")
    assert held, "the first company's users were asked for"
    for route in held:
        route.continue_()
    page.wait_for_function("() => window.llmgwConsole.superseded >= 1")
    assert len(asked) == 1, asked
    shown = page.inner_text("#users tbody")
    assert small_user["email"] in shown
    assert not any(u["email"] in shown for u in large.users), shown
    assert page.input_value("#company") == small


def test_a_busy_companys_console_waits_its_turn_instead_of_failing(
    request: pytest.FixtureRequest, tmp_path: Path, page: Any
) -> None:
    """Attack (a demanding owner whose colleagues, or whose own scripts, keep the
    company's heavy-read places full): the usage tab's four aggregates were answered
    429 `too_many_heavy_reads` with `Retry-After: 2`, and the tab gave up with that
    message and empty charts. Now a GET answered 429 with a short Retry-After is asked
    again after it (a few times, while its tab is the one open)."""
    with start_cp(request, tmp_path, "postgres") as pg:
        _gate(pg).timeout_ms = 300_000
        scripts, company_id = pg.owner_client("10")
        owner = pg.user(company_id, "owner")
        with ThreadPoolExecutor(ADMITTED) as pool, _locked(pg, "usage_records") as watcher:
            reads = _fire(pool, scripts, SUMMARY, ADMITTED)
            wait_until(lambda: _waiting_on(watcher, "usage_records") >= 1, "no read waits")
            wait_until(
                lambda: _gate(pg)._companies[company_id].callers == ADMITTED, "places not full"
            )
            with page.expect_response(lambda r: r.status == 429):
                sign_in(page, pg, owner["email"])
        assert all(r.result().status_code == 200 for r in reads)
        page.wait_for_selector("body[data-loaded=usage]")
        assert page.inner_text("#usage-error") == ""
        assert page.inner_text("#usage-totals").startswith("0 streams")


def test_the_longest_names_the_api_takes_never_push_the_console_off_screen(
    cp: CP, page: Any, browser: Any, tmp_path: Path
) -> None:
    """Attack (an owner, a member, a careless import): the longest unbroken strings the
    API accepts, where the console shows them: a 200-character company name, a
    320-character email, a 500-character revocation reason, a team's name. Each tab
    must fit the window: no row, header or button pushed off to the right."""
    company_id = data_of(
        cp.admin.post("/v1/admin/companies", json={"name": "C" * 200, "credits": "5"}), 201
    )["id"]
    email = f"{'o' * 300}-{uuid.uuid4().hex[:6]}@x.co"
    owner = data_of(
        cp.admin.post(
            "/v1/admin/users",
            json={"company_id": company_id, "email": email, "password": PASSWORD, "role": "owner"},
        ),
        201,
    )
    api = cp.client(cp.api_key(owner["id"]))
    base = f"/v1/admin/companies/{company_id}"
    data_of(api.post(f"{base}/teams", json={"name": "T" * 200, "user_ids": [owner["id"]]}), 201)
    member = cp.user(company_id, "member")
    data_of(
        api.post("/v1/admin/revocations", json={"user_id": member["id"], "reason": "R" * 500}), 201
    )
    _stream(cp, api, company_id, 50, ttft=100)
    sign_in(page, cp, email)
    page.wait_for_selector("body[data-loaded=usage]")
    page.select_option("#split", "user")
    page.click("#apply-range")
    page.wait_for_selector("body[data-loaded=usage]")
    overflowing = {}
    for tab in ("usage", "credits", "users", "keys", "providers", "plans", "audit"):
        if tab != "usage":
            open_tab(page, tab)
        page.evaluate("() => document.querySelectorAll('details').forEach(d => d.open = true)")
        wide = page.evaluate("() => document.documentElement.scrollWidth - innerWidth")
        if wide > 0:
            overflowing[tab] = wide
    check_page(page, browser, tmp_path, "long-names")
    assert overflowing == {}


def test_a_chart_of_thousands_of_users_stacks_the_costliest_and_the_rest(
    cp: CP, large: LargeCompany, page: Any
) -> None:
    """Attack (the owner of a large company splits its usage by user): the charts drew
    one stack per user, each day's bar summed by scanning every group once per user
    and day (users x days x groups): 1,000 users over 4 days (4,000 groups, the walk's
    first cap) froze the tab for 53 s (measured), 4,000 users on one day for over 15
    minutes, and the legend listed them all. Now the charts stack the costliest
    `series` users and one "Other", summed in one pass; the table keeps every row."""
    shrink_paging(page)
    sign_in(page, cp, large.owner["email"])
    page.wait_for_selector("body[data-loaded=usage]")
    page.select_option("#split", "user")
    page.click("#apply-range")
    page.wait_for_selector("body[data-loaded=usage]")
    show_more(page, "series", "spend-table", len(large.users))
    labels = page.evaluate("() => Chart.getChart('spend-chart').data.datasets.map(d => d.label)")
    others = len(large.users) - PAGING["series"]
    assert len(labels) == PAGING["series"] + 1 and labels[-1] == f"Other ({others} users)"
    charted = page.evaluate(
        """() => Chart.getChart('spend-chart').data.datasets
                 .reduce((s, d) => s + d.data.reduce((a, b) => a + b, 0), 0)"""
    )
    totals = page.inner_text("#usage-totals")
    assert f"{charted:.6f} credits" in totals
    # At the scale the walk's cap allows: 1,000 users over 4 days, drawn within the
    # page's default wait.
    drawn = page.evaluate(
        """() => {
            const days = daysBetween('2026-11-03', '2026-12-02');
            const items = [];
            for (let u = 0; u < 1000; u++) for (let k = 0; k < 4; k++)
              items.push({day: days[(u + 7 * k) % 30], user_id: `u${u}`, cost: '0.000100',
                          input_tokens: 3, output_tokens: 4, streams: 1});
            drawCharts(items, days, 'user', (i) => i.user_id);
            return Chart.getChart('tokens-chart').data.datasets.map(d =>
                d.data.reduce((a, b) => a + b, 0));
        }"""
    )
    assert len(drawn) == PAGING["series"] + 1 and sum(drawn) == 4000 * 7


def test_more_of_the_audit_continues_the_rows_shown_whatever_the_form_says(
    cp: CP, large: LargeCompany, page: Any
) -> None:
    """Attack (an owner reading its audit a page at a time): it changes the filter's
    form but, before applying it, clicks *More*. The next page was read with the
    form's new filters and the old listing's cursor, and appended under the rows of
    the old listing as if one list (measured: a filter matching nothing appended no
    row and hid *More*: the listing stopped at 2 rows of 30-odd, with no word). Now
    *More* continues the listing on screen."""
    shrink_paging(page, {**PAGING, "more": 2})
    sign_in(page, cp, large.owner["email"])
    page.wait_for_selector("body[data-loaded=usage]")
    open_tab(page, "audit")
    assert rows(page, "audit") == 2
    page.select_option("#audit-kind", "admin.*")
    page.fill("#audit-actor", "nobody-at-all")
    page.click("#audit-more")
    page.wait_for_function(
        "() => document.querySelectorAll('#audit tbody tr').length !== 2"
        " || document.querySelector('#audit-more').hidden"
    )
    listed = data_of(large.api.get("/v1/admin/audit", params={"limit": 4}))["items"]
    kinds = page.locator("#audit tbody tr td:nth-child(2)").all_inner_texts()
    assert kinds == [e["kind"] for e in listed]
