"""Init at concurrency c, in-process: inits/s, p50/p99 latency, and the CPU of both
the control plane and its PostgreSQL backends per init (issue 14).

As `bench.cp_cpu`, on a throwaway database and Redis prefix; after a warm-up (every
pooled connection made) it reads the CPU of the PostgreSQL backends serving this
database (`pg_stat_activity`, /proc) around the measured phase, so other databases'
work on the same server is not counted.

Run: ``python -m bench.cp_init_latency [--n 800] [--concurrency 32] [--access-tokens]``
(``--access-tokens``: each user calls with an access token, as `make bench`'s users
do after logging in, instead of its API key); for an A/B, run it from each tree's
directory.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from typing import Any

import httpx
import psycopg

from bench.cp_cpu import PG_ADMIN_DSN, bench_settings, provision, run_all, throwaway_state
from control_plane.app import create_app
from control_plane.auth import issue_access_token
from shared.webhooks import generate_secret

_TICK = os.sysconf("SC_CLK_TCK")


def _cpu(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime + stime
    return total / _TICK


def _backends(database: str) -> list[int]:
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
            [database],
        ).fetchall()
    return [int(r[0]) for r in rows]


async def access_tokens(client: httpx.AsyncClient, app: Any, keys: list[str]) -> list[str]:
    """An access token for each key's user, as `POST /v1/auth/login` would issue."""
    tokens = []
    for key in keys:
        me = await client.get("/v1/me", headers={"Authorization": f"Bearer {key}"})
        tokens.append(issue_access_token(app.state.deps, me.json()["data"]["user"]["id"]))
    return tokens


async def main(n: int, concurrency: int, use_access_tokens: bool = False) -> None:
    with throwaway_state() as (database_url, prefix):
        app = create_app(bench_settings(database_url, prefix, generate_secret()))
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(
                transport=transport, base_url="http://cp.test", timeout=60
            ) as client:
                keys = await provision(client, concurrency)
                if use_access_tokens:
                    keys = await access_tokens(client, app, keys)
                latencies: list[float] = []

                async def init(i: int) -> Any:
                    auth = {"Authorization": f"Bearer {keys[i % len(keys)]}"}
                    started = time.perf_counter()
                    r = await client.post(
                        "/v1/chat/init",
                        json={"query": f"hello {i}", "max_tokens": 64},
                        headers=auth,
                    )
                    latencies.append(time.perf_counter() - started)
                    assert r.status_code == 201, r.text

                await run_all(200, concurrency, init)  # warm up: the pool's connections made
                latencies.clear()
                pids = _backends(database_url.rsplit("/", 1)[1])
                pg0, cpu0, wall0 = _cpu(pids), time.process_time(), time.perf_counter()
                await run_all(n, concurrency, init)
                pg1, cpu1, wall1 = _cpu(pids), time.process_time(), time.perf_counter()
    cuts = statistics.quantiles(latencies, n=100)
    print(
        f"n={n} c={concurrency}: {n / (wall1 - wall0):.0f} inits/s, "
        f"p50 {cuts[49] * 1000:.1f} ms, p99 {cuts[98] * 1000:.1f} ms; CPU per init: "
        f"CP {(cpu1 - cpu0) * 1000 / n:.2f} ms, PostgreSQL backends "
        f"{(pg1 - pg0) * 1000 / n:.2f} ms ({len(pids)} backends)"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=800)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--access-tokens", action="store_true")
    args = parser.parse_args()
    asyncio.run(main(args.n, args.concurrency, args.access_tokens))
