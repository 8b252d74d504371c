"""PostgreSQL refuses writes: a failover left the app's address on a server that is
now a standby (or a primary set read-only, ``default_transaction_read_only``, as
operators do on a full disk or during a switchover). Every write then fails with
SQLSTATE 25006 ``read_only_sql_transaction``. That is the database unable to run
the request, as an outage is: 503 ``database_unavailable`` with ``Retry-After``
(the edge's outbox retries the usage webhook), nothing changed, and the writes
succeed once the server takes them again.

A private cluster (`tests.private_postgres`), never the machine's shared server."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import psycopg
import pytest

from shared.webhooks import sign
from tests.database_outage import a_held_stream, split_on
from tests.private_postgres import PrivatePostgres, private_postgres
from tests.stack import SplitStack, micro

__all__ = ["private_postgres"]  # the fixture, used by name


@pytest.fixture
def split(private_postgres: PrivatePostgres, redis_prefix: str) -> Iterator[SplitStack]:
    with split_on(private_postgres, redis_prefix) as stack:
        yield stack


def _read_only(server: PrivatePostgres, on: bool) -> None:
    """The whole cluster refuses writes (or takes them again), its open sessions too
    (a reload applies to every backend)."""
    admin = f"postgresql://postgres@127.0.0.1:{server.port}/postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"ALTER SYSTEM SET default_transaction_read_only = {'on' if on else 'off'}")
        conn.execute("SELECT pg_reload_conf()")


def test_a_read_only_database_is_a_503_to_retry_and_the_webhook_settles_once_after(
    split: SplitStack, private_postgres: PrivatePostgres
) -> None:
    c = split.client
    company_id, access, _, before, event, body = a_held_stream(c)
    secret = split.env["LLMGW_WEBHOOK_SECRET"]

    def deliver() -> httpx.Response:
        return c.http.post(
            f"{c.cp_url}/v1/webhooks/usage",
            content=body,
            headers=sign(secret, event.webhook_id, body),
        )

    _read_only(private_postgres, True)
    try:
        answers = [
            c.init(access, {"query": "while read-only"}),
            deliver(),
            c.admin(
                "POST",
                f"/v1/admin/companies/{company_id}/credits",
                json={"amount": "1"},
                headers={"Idempotency-Key": "grant-while-read-only"},
            ),
        ]
        # Reads still work.
        assert c.credits(access) == before
    finally:
        _read_only(private_postgres, False)
    for answer in answers:
        assert answer.status_code == 503, answer.text
        assert answer.headers["retry-after"] == "1"
        assert answer.json()["error"]["code"] == "database_unavailable"
    assert c.credits(access) == before
    redelivered = deliver()
    assert redelivered.status_code == 200, redelivered.text
    assert redelivered.json()["data"]["settled"] is True
    again = deliver()
    assert again.json()["data"] == {"duplicate": True}
    after = c.credits(access)
    assert after["held"] == "0.000000"
    assert 0 < micro(before["balance"]) - micro(after["balance"]) < micro(before["held"])
