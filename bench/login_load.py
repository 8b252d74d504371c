"""What password checks cost the money path: `/v1/chat/init` latency, the control
plane's memory and a fresh login's wait while clients loop `POST /v1/auth/login`.

A real control plane (`llm-gateway control-plane`, PostgreSQL + Redis, throwaway
database and prefix) in its own process, so its CPU and RSS are its own; the load
comes from this process. Three phases:

* ``quiet``: an API-key client's inits, one at a time, nothing else running;
* ``loop``: the same while `--loopers` clients each loop successful logins of their
  own user (as fast as the server answers);
* ``flood``: `--flood` logins of unknown emails at once, each from its own address
  (``X-Forwarded-For`` through the trusted loopback proxy), then one real login:
  how long it waits, how long the flood takes to drain, what the flood was answered.

Run: ``python -m bench.login_load [--loopers 8] [--seconds 10] [--flood 150]``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import statistics
import subprocess
import sys
import time
from typing import Any

import httpx

from bench.cp_cpu import ADMIN_TOKEN, bench_env, throwaway_state
from bench.procfs import cpu_seconds, memory
from bench.stack import _die_with_parent, free_port
from shared.webhooks import generate_secret

PASSWORD = "correct horse battery"


def _start(database_url: str, prefix: str, port: int) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        **bench_env(database_url, prefix, generate_secret()),
        "LLMGW_LOG_LEVEL": "warning",
    }
    cmd = [sys.executable, "-m", "llm_gateway.cli", "control-plane", "--port", str(port)]
    return subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, preexec_fn=_die_with_parent
    )  # a killed benchmark takes its control plane with it


async def _ready(client: httpx.AsyncClient) -> None:
    for _ in range(600):
        try:
            if (await client.get("/healthz")).status_code == 200:
                return
        except httpx.TransportError:
            pass
        await asyncio.sleep(0.1)
    raise RuntimeError("the control plane did not start")


async def _provision(client: httpx.AsyncClient, users: int) -> tuple[str, list[str]]:
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    r = await client.post(
        "/v1/admin/companies", json={"name": "bench", "credits": "1000000"}, headers=admin
    )
    company_id = r.json()["data"]["id"]
    emails = []
    for i in range(users + 1):
        email = f"bench{i}@example.com"
        body = {"company_id": company_id, "email": email, "role": "member", "password": PASSWORD}
        r = await client.post("/v1/admin/users", json=body, headers=admin)
        assert r.status_code == 201, r.text
        emails.append(email)
    user_id = r.json()["data"]["id"]
    r = await client.post("/v1/admin/api-keys", json={"user_id": user_id}, headers=admin)
    return str(r.json()["data"]["key"]), emails[:-1]


def _cuts(latencies: list[float]) -> str:
    if len(latencies) < 2:
        return f"n={len(latencies)}"
    q = statistics.quantiles(latencies, n=100)
    return f"n={len(latencies)} p50 {q[49] * 1000:.0f} ms p95 {q[94] * 1000:.0f} ms"


async def _inits(client: httpx.AsyncClient, key: str, seconds: float) -> list[float]:
    latencies = []
    stop = time.perf_counter() + seconds
    auth = {"Authorization": f"Bearer {key}"}
    while time.perf_counter() < stop:
        started = time.perf_counter()
        r = await client.post(
            "/v1/chat/init", json={"query": "hello", "max_tokens": 16}, headers=auth
        )
        latencies.append(time.perf_counter() - started)
        assert r.status_code == 201, r.text
    return latencies


async def _loop_logins(
    client: httpx.AsyncClient, email: str, stop: float, statuses: collections.Counter[int]
) -> None:
    while time.perf_counter() < stop:
        r = await client.post("/v1/auth/login", json={"email": email, "password": PASSWORD})
        statuses[r.status_code] += 1
        if r.status_code != 200:
            # A refused looper backs off as a client honouring Retry-After would, but
            # no longer than the phase.
            await asyncio.sleep(min(float(r.headers.get("retry-after", "1")), 1.0))


async def _login_once(client: httpx.AsyncClient, email: str) -> str:
    """One person logging in, retrying after a 503 as `Retry-After` says: what it
    waited in all, and how many refusals it saw first."""
    started = time.perf_counter()
    refused = []
    while True:
        r = await client.post("/v1/auth/login", json={"email": email, "password": PASSWORD})
        if r.status_code != 503 or time.perf_counter() - started > 60:
            break
        refused.append(r.status_code)
        await asyncio.sleep(float(r.headers.get("retry-after", "1")))
    waited = (time.perf_counter() - started) * 1000
    return f"{r.status_code} after {waited:.0f} ms ({len(refused)} x 503 first)"


async def main(loopers: int, seconds: float, flood: int) -> None:
    port = free_port()
    with throwaway_state() as (database_url, prefix):
        server = _start(database_url, prefix, port)
        try:
            limits = httpx.Limits(max_connections=flood + loopers + 10)
            async with httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{port}", timeout=600, limits=limits
            ) as client:
                await _ready(client)
                key, emails = await _provision(client, loopers + 1)
                fresh, loop_emails = emails[0], emails[1:]
                await _inits(client, key, 2)  # warm up
                quiet = await _inits(client, key, seconds)
                rss0 = memory(server.pid).rss
                print(f"quiet: init {_cuts(quiet)}; RSS {rss0 / 2**20:.0f} MiB")

                statuses: collections.Counter[int] = collections.Counter()
                cpu0 = cpu_seconds(server.pid)
                stop = time.perf_counter() + seconds
                tasks = [
                    asyncio.create_task(_loop_logins(client, e, stop, statuses))
                    for e in loop_emails
                ]
                await asyncio.sleep(1)
                peak_rss = 0
                sampler_stop = asyncio.Event()

                async def sample() -> None:
                    nonlocal peak_rss
                    while not sampler_stop.is_set():
                        peak_rss = max(peak_rss, memory(server.pid).rss)
                        await asyncio.sleep(0.05)

                sampler = asyncio.create_task(sample())
                busy = await _inits(client, key, seconds - 2)
                wait = await _login_once(client, fresh)
                await asyncio.gather(*tasks)
                sampler_stop.set()
                await sampler
                cpu = cpu_seconds(server.pid) - cpu0
                print(
                    f"loop ({loopers} clients looping logins): init {_cuts(busy)}; "
                    f"logins answered {dict(statuses)}; control plane CPU {cpu:.1f} s in "
                    f"{seconds:.0f} s; peak RSS {peak_rss / 2**20:.0f} MiB; "
                    f"a fresh login: {wait}"
                )

                async def unknown(i: int) -> int:
                    headers = {"X-Forwarded-For": f"198.18.{i // 250}.{i % 250 + 1}"}
                    body = {"email": f"nobody{i}@example.com", "password": "wrong"}
                    r = await client.post("/v1/auth/login", json=body, headers=headers)
                    return r.status_code

                started = time.perf_counter()
                flooding = [asyncio.create_task(unknown(i)) for i in range(flood)]
                await asyncio.sleep(0.5)
                during = await _login_once(client, fresh)
                answers = collections.Counter(await asyncio.gather(*flooding))
                drained = time.perf_counter() - started
                print(
                    f"flood ({flood} unknown-email logins at once): drained in {drained:.1f} s, "
                    f"answered {dict(answers)}; a real login during it: {during}; RSS after "
                    f"{memory(server.pid).rss / 2**20:.0f} MiB "
                    f"(peak {memory(server.pid).peak / 2**20:.0f} MiB)"
                )
        finally:
            server.terminate()
            server.wait(30)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loopers", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--flood", type=int, default=150)
    args: Any = parser.parse_args()
    asyncio.run(main(args.loopers, args.seconds, args.flood))
