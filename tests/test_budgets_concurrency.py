"""A budget under load (issue 16.3), on PostgreSQL + Redis over real HTTP: 200
concurrent ``POST /v1/chat/init`` by one user whose budget covers exactly N holds
(the company's balance covers all 200) give exactly N x 201 and (200 - N) x 402
``budget_exceeded``; then the N streams settle concurrently and the budget shows
their spend, nothing held, and the books balance."""

from __future__ import annotations

import asyncio

import httpx

from control_plane import budgets
from shared.pricing import cost_micro, estimate_input_tokens, format_credits
from tests.test_control_plane import (
    CP,
    assert_books_balance,
    credits_of,
    data_of,
    micro,
    usage_event,
)
from tests.test_credits_concurrency import MAX_TOKENS, MESSAGES, TOTAL, _settle_all, cp

__all__ = ["cp"]  # the fixture (postgres) shared with test_credits_concurrency

N = 23


async def _burst(url: str, key: str) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=TOTAL, max_keepalive_connections=0)
    async with httpx.AsyncClient(
        base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60, limits=limits
    ) as http:
        body = {"messages": MESSAGES, "max_tokens": MAX_TOKENS}
        return list(
            await asyncio.gather(*(http.post("/v1/chat/init", json=body) for _ in range(TOTAL)))
        )


def test_200_concurrent_inits_never_overshoot_a_budget(cp: CP) -> None:
    price = cp.settings.catalog.models[cp.settings.catalog.default_model].price
    hold = cost_micro(estimate_input_tokens(MESSAGES), MAX_TOKENS, price)
    company_id = cp.company(format_credits(10 * TOTAL * hold))
    user = cp.user(company_id, "member", password=None)
    key = cp.api_key(user["id"])
    budget = {
        "scope": "user",
        "target_id": user["id"],
        "amount": format_credits(N * hold),
        "period": "day",
    }
    data_of(cp.admin.post(f"/v1/admin/companies/{company_id}/budgets", json=budget), 201)

    results = asyncio.run(_burst(cp.url, key))

    codes = [r.status_code for r in results]
    assert codes.count(201) == N and codes.count(402) == TOTAL - N, sorted(set(codes))
    refused = {r.json()["error"]["code"] for r in results if r.status_code == 402}
    assert refused == {"budget_exceeded"}
    client = cp.client(key)
    [mine] = data_of(client.get("/v1/me"))["budgets"]
    assert (micro(mine["held"]), micro(mine["spent"]), micro(mine["available"])) == (
        N * hold,
        0,
        0,
    )
    assert micro(credits_of(client)["held"]) == N * hold
    db = cp.app.state.db
    assert cp.on_loop(lambda: db.transaction(lambda s: budgets.check(s, company_id))) == []

    inits = [r.json()["data"] for r in results if r.status_code == 201]
    events = [usage_event(i, company_id, input_tokens=2, output_tokens=3) for i in inits]
    assert asyncio.run(_settle_all(cp, events)) == [200] * N
    charge = cost_micro(2, 3, price)
    [mine] = data_of(client.get("/v1/me"))["budgets"]
    assert (micro(mine["held"]), micro(mine["spent"])) == (0, N * charge)
    assert micro(mine["available"]) == N * (hold - charge)
    assert_books_balance(cp, company_id, client)
    assert cp.on_loop(lambda: db.transaction(lambda s: budgets.check(s, company_id))) == []
