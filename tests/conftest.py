"""Fixtures for the real PostgreSQL and Redis on this machine.

Each test session gets its own PostgreSQL database and Redis key prefix and removes
them at the end. Without the services the tests that need them skip locally and fail
under CI (`CI=true`), where a missing service is a broken machine, not a reason to
pass.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import logging
import os
import secrets
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
from argon2 import PasswordHasher

from tests.pg_spares import SpareDatabases, drop_database

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


def _pg_url(name: str) -> str:
    return f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"


# Per test process (each xdist worker has its own): a database migrated to head once,
# which `fresh_pg_database(migrated=True)` clones. A migration run costs ~1 s, a clone
# 0.1 to 0.6 s (most of it waiting on the disk), and most tests start a control plane
# on a fresh database. Clones and drops run in the background (`tests.pg_spares`).
_MIGRATED_TEMPLATES: dict[str, str] = {}
_TEMPLATES_MADE: list[tuple[str, str]] = []  # (server, name), to drop at the end
_SPARES: dict[str, SpareDatabases] = {}


def _drop_throwaway_databases() -> None:
    """At the process's exit: the spares and every queued drop first, then the
    templates (a clone still being made holds its template)."""
    for spares in _SPARES.values():
        spares.close()
    for server, name in _TEMPLATES_MADE:
        drop_database(server, name)


atexit.register(_drop_throwaway_databases)


def _spares(server: str) -> SpareDatabases:
    if server not in _SPARES:
        _SPARES[server] = SpareDatabases(server)
    return _SPARES[server]


def _migrated_template(server: str) -> str:
    name = _MIGRATED_TEMPLATES.get(server)
    if name is None:
        from control_plane.migrate import upgrade

        name = f"llmgw_t_tmpl_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(server, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        _TEMPLATES_MADE.append((server, name))
        upgrade(_pg_url(name))
        _MIGRATED_TEMPLATES[server] = name
    return name


@contextlib.contextmanager
def fresh_pg_database(server: str, *, migrated: bool = False) -> Iterator[str]:
    """A new database, dropped afterwards: empty, or `migrated` to head (a clone of
    this process's migrated template)."""
    spares = _spares(server)
    name = spares.take(_migrated_template(server) if migrated else None)
    try:
        yield _pg_url(name)
    finally:
        spares.give_back(name)


_MIGRATED_SQLITE: list[Path] = []


def migrated_sqlite(path: Path) -> str:
    """A SQLite database at `path`, migrated to head: a copy of this process's
    migrated file (a migration run costs ~0.3 s)."""
    if not _MIGRATED_SQLITE:
        from control_plane.migrate import upgrade

        template = Path(tempfile.mkdtemp(prefix="llmgw-t-sqlite-")) / "migrated.db"
        upgrade(f"sqlite:///{template}")
        atexit.register(shutil.rmtree, template.parent, True)
        _MIGRATED_SQLITE.append(template)
    shutil.copyfile(_MIGRATED_SQLITE[0], path)
    return f"sqlite:///{path}"


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
def migrated_pg_url(pg_server: str) -> Iterator[str]:
    """A fresh database already migrated to head (a clone of the template), dropped
    afterwards: for a test that would migrate an empty one first (`upgrade`, or a
    control plane's LLMGW_AUTO_MIGRATE), ~1 s a run; the app's own migration then
    finds nothing to do. Migrating from empty keeps its own tests
    (test_migration_safety, test_e2e_processes, the ops process stacks)."""
    with fresh_pg_database(pg_server, migrated=True) as url:
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


# argon2id with argon2-cffi's defaults costs ~0.23 s of CPU per hash and per verify
# (t=3, m=64 MiB, p=4), and most tests create and sign in users only to reach what
# they test: measured, 40-50 % of test_e2e_flow's and test_console_api's time. In the
# test processes the control plane hashes with the cheapest argon2id instead (what
# a stored hash verifies against is in the hash itself), except in the modules
# marked `real_password_hashes`: the tests of the hashing's cost and its bounds.
# Services started as subprocesses always hash with the defaults.
CHEAP_PASSWORD_HASHER = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
_REAL_PASSWORD_HASHER: list[PasswordHasher] = []


def _hash_passwords_with(hasher: PasswordHasher) -> None:
    from control_plane import credentials

    credentials._hasher = hasher
    credentials._dummy_hash.cache_clear()  # unknown emails verify against one of its own


@pytest.fixture(scope="session", autouse=True)
def _cheap_password_hashes() -> Iterator[None]:
    from control_plane import credentials

    _REAL_PASSWORD_HASHER.append(credentials._hasher)
    _hash_passwords_with(CHEAP_PASSWORD_HASHER)
    yield
    _hash_passwords_with(_REAL_PASSWORD_HASHER[0])


@pytest.fixture(scope="module", autouse=True)
def _real_password_hashes_where_marked(
    request: pytest.FixtureRequest, _cheap_password_hashes: None
) -> Iterator[None]:
    """Module scope, so that a marked module's own module fixtures (users made once
    for all its tests) already hash with the defaults."""
    if request.node.get_closest_marker("real_password_hashes") is None:
        yield
        return
    _hash_passwords_with(_REAL_PASSWORD_HASHER[0])
    try:
        yield
    finally:
        _hash_passwords_with(CHEAP_PASSWORD_HASHER)


@pytest.fixture(autouse=True)
def _root_logging_restored() -> Iterator[None]:
    """A test that runs the CLI in-process (`llm_gateway.cli.main`) installs the
    services' stderr handler at INFO on the root logger: restored after it, or every
    later test of that worker printed its servers' INFO lines into the suite's output."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
