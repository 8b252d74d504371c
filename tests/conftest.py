"""Fixtures for the real PostgreSQL and Redis on this machine.

Each test session gets its own PostgreSQL database and Redis key prefix and removes
them at the end. Without the services the tests that need them skip locally and fail
under CI (`CI=true`), where a missing service is a broken machine, not a reason to
pass.
"""

from __future__ import annotations

import base64
import contextlib
import os
import secrets
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import redis

PG_ADMIN_DSN = os.environ.get("LLMGW_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("LLMGW_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def _unavailable(what: str, exc: Exception) -> None:
    message = f"{what} is not reachable: {exc}"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


def new_webhook_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


@pytest.fixture(scope="session")
def pg_server() -> str:
    try:
        with psycopg.connect(PG_ADMIN_DSN, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        _unavailable("PostgreSQL", exc)
    return PG_ADMIN_DSN


@contextlib.contextmanager
def fresh_pg_database(server: str) -> Iterator[str]:
    name = f"llmgw_t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(server, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def fresh_redis_prefix() -> Iterator[str]:
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3)
    try:
        client.ping()
    except redis.RedisError as exc:
        client.close()
        _unavailable("Redis", exc)
    prefix = f"llmgw_t_{uuid.uuid4().hex[:12]}:"
    try:
        yield prefix
    finally:
        keys = list(client.scan_iter(match=prefix + "*", count=500))
        if keys:
            client.delete(*keys)
        client.close()


@pytest.fixture
def pg_database_url(pg_server: str) -> Iterator[str]:
    """A fresh, empty database for one test, dropped afterwards."""
    with fresh_pg_database(pg_server) as url:
        yield url


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    """A unique key prefix on the real Redis; every key under it is deleted afterwards."""
    with fresh_redis_prefix() as prefix:
        yield prefix


@pytest.fixture(scope="module", params=["embedded", "postgres"])
def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Any]:
    """The whole gateway on SQLite + memory, then on PostgreSQL + Redis (one per module)."""
    from tests.stack import InProcessStack, base_env, postgres_env

    with contextlib.ExitStack() as resources:
        if request.param == "embedded":
            path = tmp_path_factory.mktemp("db") / "gateway.db"
            env = base_env(f"sqlite:///{path}")
        else:
            env = resources.enter_context(postgres_env(request.getfixturevalue("pg_server")))
        yield resources.enter_context(InProcessStack(env))
