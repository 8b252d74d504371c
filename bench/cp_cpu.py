"""Where the control plane's CPU goes on the money path (issue 14 points 2 and 3).

Starts the control plane in-process on a throwaway PostgreSQL database and Redis
key prefix, provisions a company, a user and an API key through the admin API, then
drives `--n` ``POST /v1/chat/init`` and as many signed usage webhooks through httpx
(`ASGITransport`, `--concurrency` at a time), and prints

* CPU ms per init and per webhook: ``time.process_time`` around each phase, every
  thread of the process (the event loop and the database threads), without the
  profiler; the client's own share (httpx building and reading requests) is in it
  too, so these are upper bounds for the control plane;
* then the same phases again under cProfile with the thread CPU clock
  (``cProfile.Profile(time.thread_time)``, one profiler per thread, merged), and the
  top functions by tottime and by cumtime.

Run: ``python -m bench.cp_cpu [--n 300] [--concurrency 16] [--top 25]``. Needs
the PostgreSQL and Redis of `tests/conftest.py` (``LLMGW_TEST_PG_DSN``,
``LLMGW_TEST_REDIS_URL``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import io
import os
import pstats
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import jwt
import psycopg
import redis
from cryptography.fernet import Fernet

from control_plane.app import create_app
from control_plane.db import Database
from control_plane.settings import ControlPlaneSettings
from shared.webhooks import UsageEvent, generate_secret, sign

PG_ADMIN_DSN = os.environ.get("LLMGW_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("LLMGW_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
ADMIN_TOKEN = "bench-admin-" + uuid.uuid4().hex


@contextlib.contextmanager
def throwaway_state() -> Iterator[tuple[str, str]]:
    name = f"llmgw_prof_{uuid.uuid4().hex[:12]}"
    prefix = f"llmgw_prof_{uuid.uuid4().hex[:12]}:"
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}", prefix
    finally:
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        client = redis.Redis.from_url(REDIS_URL)
        keys = list(client.scan_iter(match=prefix + "*", count=500))
        if keys:
            client.delete(*keys)
        client.close()


def bench_env(database_url: str, prefix: str, secret: str) -> dict[str, str]:
    """A benchmark control plane's environment: its own database and prefix, the
    per-user limits far above the load."""
    return {
        "LLMGW_WEBHOOK_SECRET": secret,
        "LLMGW_ENCRYPTION_KEY": Fernet.generate_key().decode(),
        "LLMGW_ADMIN_TOKEN": ADMIN_TOKEN,
        "LLMGW_DATABASE_URL": database_url,
        "LLMGW_REDIS_URL": REDIS_URL,
        "LLMGW_REDIS_PREFIX": prefix,
        "LLMGW_AUTO_MIGRATE": "1",
        "LLMGW_EDGE_PUBLIC_URL": "http://edge.test:8001",
        "LLMGW_INIT_RATE_PER_USER": "1000000",
        "LLMGW_INIT_RATE_PER_COMPANY": "1000000",
        "LLMGW_MAX_PENDING_INITS_PER_USER": "1000000",
    }


def bench_settings(database_url: str, prefix: str, secret: str) -> ControlPlaneSettings:
    return ControlPlaneSettings.from_env(bench_env(database_url, prefix, secret), dev=False)


class ThreadProfiles:
    """One cProfile per thread (the event loop's and each database thread's), on the
    thread CPU clock, merged at the end."""

    def __init__(self) -> None:
        self.on = False
        self._local = threading.local()
        self._all: list[cProfile.Profile] = []
        self._lock = threading.Lock()

    def current(self) -> cProfile.Profile:
        profile: cProfile.Profile | None = getattr(self._local, "profile", None)
        if profile is None:
            profile = cProfile.Profile(time.thread_time)
            self._local.profile = profile
            with self._lock:
                self._all.append(profile)
        return profile

    def wrap_database(self) -> None:
        """Profile what `Database` runs on its threads while `on`: its transactions,
        its units (init's) and its lookups (the caller's)."""
        profiles = self

        def wrap(name: str) -> None:
            original = getattr(Database, name)

            def profiled(db: Database, fn: Callable[[Any], Any], *args: Any) -> Any:
                # A unit on SQLite runs in a transaction: profile the outer call only.
                if not profiles.on or getattr(profiles._local, "busy", False):
                    return original(db, fn, *args)
                profile = profiles.current()
                profiles._local.busy = True
                profile.enable()
                try:
                    return original(db, fn, *args)
                finally:
                    profile.disable()
                    profiles._local.busy = False

            setattr(Database, name, profiled)

        for name in ("_in_transaction", "_in_unit", "_lookup"):
            wrap(name)

    def stats(self) -> pstats.Stats:
        stream = io.StringIO()
        stats = pstats.Stats(self._all[0], stream=stream)
        for profile in self._all[1:]:
            stats.add(profile)
        return stats


async def provision(client: httpx.AsyncClient, users: int) -> list[str]:
    """One company, `users` users with an API key each: a user's pending inits stay
    near what one client keeps open (the per-user limit defaults to 20)."""
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    r = await client.post(
        "/v1/admin/companies", json={"name": "bench", "credits": "1000000"}, headers=admin
    )
    company_id = r.json()["data"]["id"]
    keys = []
    for i in range(users):
        r = await client.post(
            "/v1/admin/users",
            json={"company_id": company_id, "email": f"bench{i}@example.com", "role": "owner"},
            headers=admin,
        )
        user_id = r.json()["data"]["id"]
        r = await client.post("/v1/admin/api-keys", json={"user_id": user_id}, headers=admin)
        keys.append(str(r.json()["data"]["key"]))
    return keys


async def run_all(n: int, concurrency: int, fn: Callable[[int], Awaitable[Any]]) -> list[Any]:
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int) -> Any:
        async with gate:
            return await fn(i)

    return await asyncio.gather(*(one(i) for i in range(n)))


def webhook_of(init: dict[str, Any], company_id: str, secret: str) -> tuple[bytes, dict[str, str]]:
    claims = jwt.decode(init["stream_token"], options={"verify_signature": False})
    now = datetime.now(UTC)
    event = UsageEvent(
        jti=claims["jti"],
        reservation_id=init["reservation_id"],
        company_id=company_id,
        user_id=claims["sub"],
        session_id=init["session_id"],
        request_id=claims["request_id"],
        model=init["model"],
        provider=claims.get("provider", "mock"),
        status="completed",
        finish_reason="stop",
        input_tokens=12,
        output_tokens=64,
        usage_source="upstream",
        started_at=now.isoformat(),
        first_token_at=None,
        ended_at=now.isoformat(),
        content="Hello there! " * 20,
    )
    body = event.body()
    return body, sign(secret, event.webhook_id, body)


async def phase(
    client: httpx.AsyncClient, keys: list[str], secret: str, n: int, concurrency: int
) -> tuple[float, float, float, float]:
    """CPU ms per init, per webhook; wall seconds of each phase."""

    async def init(i: int) -> dict[str, Any]:
        auth = {"Authorization": f"Bearer {keys[i % len(keys)]}"}
        r = await client.post(
            "/v1/chat/init", json={"query": f"hello {i}", "max_tokens": 64}, headers=auth
        )
        assert r.status_code == 201, r.text
        return dict(r.json()["data"])

    cpu0, wall0 = time.process_time(), time.perf_counter()
    inits = await run_all(n, concurrency, init)
    cpu1, wall1 = time.process_time(), time.perf_counter()
    claims = jwt.decode(inits[0]["stream_token"], options={"verify_signature": False})
    signed = [webhook_of(i, claims["company_id"], secret) for i in inits]

    async def settle(i: int) -> None:
        body, headers = signed[i]
        r = await client.post("/v1/webhooks/usage", content=body, headers=headers)
        assert r.status_code == 200 and r.json()["data"].get("settled"), r.text

    cpu2, wall2 = time.process_time(), time.perf_counter()
    await run_all(n, concurrency, settle)
    cpu3, wall3 = time.process_time(), time.perf_counter()
    return (
        (cpu1 - cpu0) * 1000 / n,
        (cpu3 - cpu2) * 1000 / n,
        wall1 - wall0,
        wall3 - wall2,
    )


async def floor(client: httpx.AsyncClient, n: int, concurrency: int) -> float:
    """CPU ms per request that does nothing: what the client and the ASGI stack
    cost, included in the per-init and per-webhook numbers."""

    async def get(i: int) -> None:
        r = await client.get("/healthz")
        assert r.status_code == 200

    cpu0 = time.process_time()
    await run_all(n, concurrency, get)
    return (time.process_time() - cpu0) * 1000 / n


def print_top(stats: pstats.Stats, top: int) -> None:
    stream = io.StringIO()
    stats.stream = stream  # type: ignore[attr-defined]
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    # Our own code by cumulative time: which step of a use case costs what.
    stats.sort_stats("cumulative").print_stats(r"(control_plane|shared)/", top)
    print(stream.getvalue())


async def main(n: int, concurrency: int, top: int, profile: bool = True) -> None:
    secret = generate_secret()
    profiles = ThreadProfiles()
    profiles.wrap_database()
    with throwaway_state() as (database_url, prefix):
        app = create_app(bench_settings(database_url, prefix, secret))
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(
                transport=transport, base_url="http://cp.test", timeout=60
            ) as client:
                keys = await provision(client, concurrency)
                await phase(client, keys, secret, 20, concurrency)  # warm up
                floor_ms = await floor(client, n, concurrency)
                init_ms, hook_ms, init_s, hook_s = await phase(client, keys, secret, n, concurrency)
                print(
                    f"n={n} c={concurrency}: CPU per init {init_ms:.2f} ms "
                    f"({n / init_s:.0f}/s wall), per webhook {hook_ms:.2f} ms "
                    f"({n / hook_s:.0f}/s wall); per GET /healthz {floor_ms:.2f} ms "
                    "(the floor: httpx client, ASGI, middleware)"
                )
                if not profile:
                    return
                profiles.on = True
                loop_profile = profiles.current()
                loop_profile.enable()
                try:
                    await phase(client, keys, secret, n, concurrency)
                finally:
                    loop_profile.disable()
                    profiles.on = False
    if profile:
        stats = profiles.stats()
        stats.dump_stats(os.environ.get("CP_PROFILE_OUT", "cp_cpu.pstats"))
        print_top(stats, top)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--no-profile", action="store_true")
    args = parser.parse_args()
    asyncio.run(main(args.n, args.concurrency, args.top, not args.no_profile))
