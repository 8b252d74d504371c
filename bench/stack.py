"""The gateway as real processes on loopback ports, with throwaway state.

`BenchStack` creates a PostgreSQL database `llmgw_bench_<hex>` and a Redis key
prefix of its own, starts `mock-llm`, `control-plane` and `stream-edge` exactly as
an operator would (`python -m llm_gateway.cli …`), provisions a company and users
through the admin API, and mints stream tokens. Leaving the `with` block stops the
processes, drops the database and deletes every key under the prefix.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ctypes
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import psycopg
import redis
from cryptography.fernet import Fernet
from psycopg.conninfo import conninfo_to_dict

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "llm_gateway.cli"]
SERVICES = (("mock", "mock-llm"), ("cp", "control-plane"), ("edge", "stream-edge"))
# Limits far above anything the benchmark reaches: it measures the relay, not them.
UNLIMITED = "1000000"
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Runs in each child before exec: if the benchmark dies (even by SIGKILL), the
    kernel sends the child SIGTERM, so no service outlives it (Linux prctl)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _sqlalchemy_url(admin_dsn: str, database: str) -> str:
    info = conninfo_to_dict(admin_dsn)
    user = info.get("user") or "postgres"
    password = f":{info['password']}" if info.get("password") else ""
    host = info.get("host") or "127.0.0.1"
    port = info.get("port") or "5432"
    return f"postgresql+psycopg://{user}{password}@{host}:{port}/{database}"


def _epoch(value: datetime) -> float:
    # The column may come back naive (SQLite-style) or aware; it is UTC either way.
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()


class BenchStack:
    def __init__(
        self,
        pg_dsn: str,
        redis_url: str,
        cp_profile: Path | None = None,
        edge_profile: Path | None = None,
    ) -> None:
        self.pg_dsn = pg_dsn
        # Run the control plane (the edge) under `bench.profiled`, writing its profile here.
        self.cp_profile = cp_profile
        self.edge_profile = edge_profile
        self.redis_url = redis_url
        tag = uuid.uuid4().hex[:12]
        self.database = f"llmgw_bench_{tag}"
        self.prefix = f"llmgw_bench_{tag}:"
        self.admin_token = "bench-admin-" + secrets.token_hex(16)
        self.ports = {name: free_port() for name, _ in SERVICES}
        self.urls = {name: f"http://127.0.0.1:{port}" for name, port in self.ports.items()}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._tmp = Path(tempfile.mkdtemp(prefix="llmgw-bench-"))
        self._db_created = False
        self.http = httpx.Client(timeout=30)
        self.redis = redis.Redis.from_url(redis_url, socket_connect_timeout=5)

    # lifecycle -------------------------------------------------------------------
    def env(self) -> dict[str, str]:
        models = self._tmp / "models.yaml"
        packaged = (ROOT / "shared" / "models.yaml").read_text()
        models.write_text(packaged.replace("http://127.0.0.1:8002/v1", f"{self.urls['mock']}/v1"))
        secret = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
        return {
            **os.environ,
            "LLMGW_DATABASE_URL": _sqlalchemy_url(self.pg_dsn, self.database),
            "LLMGW_REDIS_URL": self.redis_url,
            "LLMGW_REDIS_PREFIX": self.prefix,
            "LLMGW_WEBHOOK_SECRET": secret,
            # API keys at the edge (bench/key_hop_bench.py).
            "LLMGW_EDGE_SERVICE_SECRET": "whsec_"
            + base64.b64encode(secrets.token_bytes(32)).decode(),
            "LLMGW_ENCRYPTION_KEY": Fernet.generate_key().decode(),
            "LLMGW_ADMIN_TOKEN": self.admin_token,
            "LLMGW_CONTROL_PLANE_URL": self.urls["cp"],
            "LLMGW_EDGE_PUBLIC_URL": self.urls["edge"],
            "LLMGW_MODELS_FILE": str(models),
            "LLMGW_AUTO_MIGRATE": "0",
            "LLMGW_LOG_LEVEL": "WARNING",
            "LLMGW_TOKEN_TTL_SECONDS": "300",
            "LLMGW_MAX_STREAMS_PER_USER": UNLIMITED,
            "LLMGW_MAX_STREAMS_PER_COMPANY": UNLIMITED,
            "LLMGW_INIT_RATE_PER_USER": UNLIMITED,
            "LLMGW_INIT_RATE_PER_COMPANY": UNLIMITED,
            "LLMGW_MAX_PENDING_INITS_PER_USER": UNLIMITED,
            # The memory phase holds 2,000 streams open (the default cap is 1,000).
            "LLMGW_MAX_CONNECTIONS": UNLIMITED,
        }

    def __enter__(self) -> BenchStack:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _start(self) -> None:
        with psycopg.connect(self.pg_dsn, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'CREATE DATABASE "{self.database}"')
        self._db_created = True
        env = self.env()
        # The mock needs no database: start it while the migrations run.
        self._spawn("mock", env)
        migrate = subprocess.run(
            [*CLI, "migrate"], env=env, cwd=ROOT, capture_output=True, timeout=120
        )
        if migrate.returncode != 0:
            raise RuntimeError(f"migrate failed:\n{migrate.stderr.decode()[-2000:]}")
        for name in ("cp", "edge"):
            self._spawn(name, env)
        for name in self.procs:
            self._wait_healthy(name)

    def _spawn(self, name: str, env: dict[str, str]) -> None:
        command = [dict(SERVICES)[name], "--port", str(self.ports[name])]
        runner = CLI
        profile = {"cp": self.cp_profile, "edge": self.edge_profile}.get(name)
        if profile is not None:
            runner = [sys.executable, "-m", "bench.profiled", str(profile)]
        with (self._tmp / f"{name}.log").open("wb") as log:
            self.procs[name] = subprocess.Popen(
                [*runner, *command],
                env=env,
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
            )

    def _wait_healthy(self, name: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive(name)
            with contextlib.suppress(httpx.HTTPError):
                if self.http.get(f"{self.urls[name]}/healthz", timeout=1).status_code == 200:
                    return
            time.sleep(0.1)
        raise RuntimeError(f"{name} did not become healthy:\n{self.log_tail(name)}")

    def check_alive(self, name: str) -> None:
        proc = self.procs[name]
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.log_tail(name)}")

    def log_tail(self, name: str, size: int = 3000) -> str:
        path = self._tmp / f"{name}.log"
        return path.read_text(errors="replace")[-size:] if path.exists() else ""

    def problems(self, name: str) -> list[str]:
        """The WARNING and ERROR lines a service has logged so far."""
        path = self._tmp / f"{name}.log"
        if not path.exists():
            return []
        marks = (" WARNING ", " ERROR ", '"level":"warning"', '"level":"error"')  # text, JSON
        lines = path.read_text(errors="replace").splitlines()
        return [line for line in lines if any(mark in line for mark in marks)]

    def pid(self, name: str) -> int:
        return self.procs[name].pid

    def close(self) -> None:
        self.http.close()
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._db_created:
            with psycopg.connect(self.pg_dsn, autocommit=True, connect_timeout=5) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)')
        try:
            keys = list(self.redis.scan_iter(match=self.prefix + "*", count=1000))
            for start in range(0, len(keys), 1000):
                self.redis.delete(*keys[start : start + 1000])
        finally:
            self.redis.close()
        shutil.rmtree(self._tmp, ignore_errors=True)

    # state the benchmark waits on ------------------------------------------------
    def outbox_pending(self) -> int:
        """Usage events the edge has not delivered yet (read from Redis, not the edge)."""
        return int(self.redis.zcard(f"{self.prefix}outbox:due"))

    def forget_pending_inits(self) -> None:
        """Empty every user's and company's set of pending grants
        (`control_plane/pending_inits.py`)."""
        keys = list(self.redis.scan_iter(match=f"{self.prefix}pending:*", count=1000))
        if keys:
            self.redis.delete(*keys)

    def settlements(self, reservation_ids: list[str]) -> dict[str, float]:
        """When each settled reservation was settled (epoch seconds, the control
        plane's clock: the same machine's), read from the database, not the API."""
        if not reservation_ids:
            return {}
        with psycopg.connect(self.pg_dsn, dbname=self.database, connect_timeout=5) as conn:
            rows = conn.execute(
                "SELECT id, settled_at FROM reservations "
                "WHERE id = ANY(%s) AND status = 'settled' AND settled_at IS NOT NULL",
                (reservation_ids,),
            ).fetchall()
        return {row[0]: _epoch(row[1]) for row in rows}

    # provisioning ----------------------------------------------------------------
    def _admin(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        response = self.http.post(
            self.urls["cp"] + path,
            json=body,
            headers={"Authorization": f"Bearer {self.admin_token}"},
        )
        if response.status_code != 201:
            raise RuntimeError(f"POST {path} answered {response.status_code}: {response.text}")
        data: dict[str, Any] = response.json()["data"]
        return data

    def provision(self, users: int, credits: str = "1000000") -> list[str]:
        """A company with plenty of credits and `users` owners; their access tokens."""
        company = self._admin(
            "/v1/admin/companies", {"name": f"bench-{uuid.uuid4().hex[:8]}", "credits": credits}
        )
        tokens = []
        for _ in range(users):
            email = f"bench-{uuid.uuid4().hex[:10]}@example.com"
            password = secrets.token_urlsafe(12)
            self._admin(
                "/v1/admin/users",
                {
                    "company_id": company["id"],
                    "email": email,
                    "password": password,
                    "role": "owner",
                },
            )
            login = self.http.post(
                self.urls["cp"] + "/v1/auth/login", json={"email": email, "password": password}
            )
            if login.status_code != 200:
                raise RuntimeError(f"login answered {login.status_code}: {login.text}")
            tokens.append(login.json()["data"]["access_token"])
        return tokens


async def mint(
    cp_url: str, access_tokens: list[str], body: dict[str, Any], count: int, parallel: int = 16
) -> list[str]:
    """`count` stream tokens from `POST /v1/chat/init`, spread over the users."""
    out: list[str] = [""] * count
    gate = asyncio.Semaphore(parallel)
    limits = httpx.Limits(max_connections=parallel, max_keepalive_connections=parallel)
    async with httpx.AsyncClient(base_url=cp_url, timeout=60, limits=limits) as client:

        async def one(index: int) -> None:
            token = access_tokens[index % len(access_tokens)]
            async with gate:
                response = await client.post(
                    "/v1/chat/init", json=body, headers={"Authorization": f"Bearer {token}"}
                )
            if response.status_code != 201:
                raise RuntimeError(
                    f"/v1/chat/init answered {response.status_code}: {response.text[:500]}"
                )
            out[index] = response.json()["data"]["stream_token"]

        await asyncio.gather(*(one(i) for i in range(count)))
    return out
