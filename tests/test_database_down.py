"""PostgreSQL goes away (a restart, a failover) and comes back: while it is gone every
request gets a clear 503 with `Retry-After`, as a store outage does, never a 500
"internal_error" for what no client did; nothing changes; and the first requests
after it is back succeed (the pool's dead connections are replaced, not handed out)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.database_outage import split_on
from tests.private_postgres import PrivatePostgres, private_postgres
from tests.stack import SplitStack, micro

__all__ = ["private_postgres"]  # the fixture, used by name


@pytest.fixture
def split(private_postgres: PrivatePostgres, redis_prefix: str) -> Iterator[SplitStack]:
    with split_on(private_postgres, redis_prefix) as stack:
        yield stack


def test_a_database_outage_is_a_503_to_retry_and_the_first_requests_after_it_work(
    split: SplitStack, private_postgres: PrivatePostgres
) -> None:
    c = split.client
    access = c.new_user(c.new_company("5"))
    before = c.credits(access)
    private_postgres.stop()
    try:
        answers = [
            c.as_user(access, "GET", "/v1/me"),
            c.init(access, {"query": "hello"}),
            c.admin("POST", "/v1/admin/companies", json={"name": "during", "credits": "1"}),
        ]
    finally:
        private_postgres.start()
    for answer in answers:
        assert answer.status_code == 503, answer.text
        assert answer.headers["retry-after"] == "1"
        assert answer.json()["error"]["code"] == "database_unavailable"
    # Back: the pooled connections the restart killed are never handed out.
    assert c.credits(access) == before
    grant = c.init_ok(access, {"query": "hello again"})
    assert micro(c.credits(access)["held"]) == micro(grant["reserved_credits"]) > 0
