"""The control plane through PgBouncer in transaction mode (issue 14.5): each
transaction may run on a different server connection, so a server-side prepared
statement made in one transaction is missing in the next. The whole flow, the
exactly-once settlement and a burst of concurrent inits run through a private
PgBouncer (a pool of 4 server connections) in front of the machine's PostgreSQL.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

import httpx
import pytest
from sqlalchemy.engine import make_url

from control_plane.migrate import upgrade
from shared.pricing import cost_micro, estimate_input_tokens, format_credits
from tests import test_e2e_flow as flow
from tests.conftest import REDIS_URL, fresh_pg_database, fresh_redis_prefix
from tests.scale_servers import pgbouncer
from tests.stack import InProcessStack, base_env, micro

BURST, COVERED = 60, 13
MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def bounced(request: pytest.FixtureRequest) -> Iterator[InProcessStack]:
    server = request.getfixturevalue("pg_server")
    with contextlib.ExitStack() as resources:
        direct = resources.enter_context(fresh_pg_database(server))
        port = resources.enter_context(pgbouncer())
        url = make_url(direct).set(port=port).render_as_string(hide_password=False)
        prefix = resources.enter_context(fresh_redis_prefix())
        # Migrations take a session-level advisory lock, which transaction pooling
        # cannot hold across transactions: they run against PostgreSQL directly
        # (docs/operations.md), the services through PgBouncer.
        upgrade(direct)
        env = {
            **base_env(url, REDIS_URL, prefix),
            "LLMGW_DATABASE_PGBOUNCER": "1",
            "LLMGW_AUTO_MIGRATE": "0",
        }
        yield resources.enter_context(InProcessStack(env))


def test_stream_is_billed_exactly_through_pgbouncer(bounced: InProcessStack) -> None:
    # Many transactions per connection: psycopg would have prepared the hot queries.
    for _ in range(3):
        flow.test_openai_client_stream_is_billed_exactly(bounced)


def test_duplicate_webhooks_charge_once_through_pgbouncer(bounced: InProcessStack) -> None:
    flow.test_webhook_duplicates_charge_once_and_bad_signature_is_401(bounced)


async def _burst(url: str, token: str) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=BURST, max_keepalive_connections=0)
    async with httpx.AsyncClient(
        base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60, limits=limits
    ) as http:
        body = {"messages": MESSAGES, "max_tokens": 16}
        return list(
            await asyncio.gather(*(http.post("/v1/chat/init", json=body) for _ in range(BURST)))
        )


def test_concurrent_inits_conserve_credits_through_pgbouncer(bounced: InProcessStack) -> None:
    c = bounced.client
    price = bounced.settings.catalog.models[bounced.settings.catalog.default_model].price
    hold = cost_micro(estimate_input_tokens(MESSAGES), 16, price)
    token = c.new_user(c.new_company(format_credits(COVERED * hold)), role="owner")

    codes = [r.status_code for r in asyncio.run(_burst(c.cp_url, token))]

    assert codes.count(201) == COVERED and codes.count(402) == BURST - COVERED, sorted(codes)
    assert c.credits(token) == {
        "balance": format_credits(COVERED * hold),
        "held": format_credits(COVERED * hold),
        "available": "0.000000",
    }
    assert micro(c.credits(token)["available"]) >= 0
