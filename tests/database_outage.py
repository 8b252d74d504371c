"""The split gateway (control plane and edge as separate apps, `tests.stack`) on a
database of a private PostgreSQL server the test may stop, silence or make
read-only, and a stream held before that happens, whose report comes after."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from shared.webhooks import UsageEvent
from tests.conftest import REDIS_URL
from tests.private_postgres import PrivatePostgres
from tests.stack import Client, SplitStack, base_env
from tests.test_control_plane import usage_event


@contextlib.contextmanager
def split_on(server: PrivatePostgres, redis_prefix: str, **env: str) -> Iterator[SplitStack]:
    """The split gateway on a new database of `server`, its Redis keys under
    `redis_prefix`, with the settings `env` over the base ones."""
    with SplitStack({**base_env(server.new_database(), REDIS_URL, redis_prefix), **env}) as stack:
        yield stack


def a_held_stream(
    c: Client,
) -> tuple[str, str, dict[str, Any], dict[str, str], UsageEvent, bytes]:
    """A new company's user with a stream held (init done): the company's id, the
    user's token, the grant, the user's credits once held, and the stream's usage
    report (3 input, 5 output tokens) with the body the edge would sign."""
    company_id = c.new_company("5")
    access = c.new_user(company_id)
    grant = c.init_ok(access, {"query": "before"})
    before = c.credits(access)
    event = usage_event(grant, company_id, input_tokens=3, output_tokens=5)
    return company_id, access, grant, before, event, event.body()
