"""The whole gateway (mock LLM, control plane, edge) on ephemeral ports, for tests.

`InProcessStack` runs the three apps in one background thread, like `llm-gateway
dev`; with a Redis URL each app opens its own Redis store, exactly as separate
processes would. `Client` holds the small HTTP conveniences the tests share.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import openai
from cryptography.fernet import Fernet

from control_plane.app import create_app as control_plane_app
from control_plane.settings import ControlPlaneSettings
from llm_gateway.dev import settings_from_env, with_mock_at
from mock_llm.app import create_app as mock_app
from shared.store import Store
from shared.store_memory import MemoryStore
from stream_edge.app import create_app as edge_app
from stream_edge.settings import EdgeSettings
from tests.conftest import REDIS_URL, fresh_pg_database, fresh_redis_prefix, new_webhook_secret
from tests.harness import ServerGroup, bind_free_socket, free_port, url_of

ROOT = Path(__file__).resolve().parent.parent
ADMIN_TOKEN = "test-admin-token-" + uuid.uuid4().hex


def micro(credits: str) -> int:
    """A six-decimal credits string as integer micro-credits (exact)."""
    return int(Decimal(credits) * 1_000_000)


def base_env(database_url: str, redis_url: str | None = None, prefix: str = "") -> dict[str, str]:
    env = {
        "LLMGW_DATABASE_URL": database_url,
        "LLMGW_WEBHOOK_SECRET": new_webhook_secret(),
        "LLMGW_ENCRYPTION_KEY": Fernet.generate_key().decode(),
        "LLMGW_ADMIN_TOKEN": ADMIN_TOKEN,
        "LLMGW_AUTO_MIGRATE": "1",
        # Many tests mint tokens they never stream with; the pending-init limit has
        # its own tests (test_abuse_storage.py).
        "LLMGW_MAX_PENDING_INITS_PER_USER": "1000",
    }
    if redis_url:
        env["LLMGW_REDIS_URL"] = redis_url
        env["LLMGW_REDIS_PREFIX"] = prefix
    return env


@contextlib.contextmanager
def postgres_env(pg_server: str) -> Iterator[dict[str, str]]:
    """`base_env` on a fresh PostgreSQL database and Redis prefix, both removed at the
    end: for a fixture wider than one test (`pg_database_url` and `redis_prefix` are
    a test's own)."""
    with fresh_pg_database(pg_server, migrated=True) as url, fresh_redis_prefix() as prefix:
        yield base_env(url, REDIS_URL, prefix)


class Client:
    """HTTP helpers against a running stack."""

    def __init__(self, cp_url: str, edge_url: str, mock_url: str, webhook_secret: str) -> None:
        self.cp_url = cp_url
        self.edge_url = edge_url
        self.mock_url = mock_url
        self.webhook_secret = webhook_secret
        self.http = httpx.Client(timeout=30)
        self._openai_clients: list[openai.OpenAI] = []

    def admin(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {ADMIN_TOKEN}", **kwargs.pop("headers", {})}
        return self.http.request(method, self.cp_url + path, headers=headers, **kwargs)

    def as_user(self, token: str, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}", **kwargs.pop("headers", {})}
        return self.http.request(method, self.cp_url + path, headers=headers, **kwargs)

    def new_company(self, credits: str = "10") -> str:
        response = self.admin(
            "POST",
            "/v1/admin/companies",
            json={"name": f"co-{uuid.uuid4().hex[:10]}", "credits": credits},
        )
        assert response.status_code == 201, response.text
        company_id: str = response.json()["data"]["id"]
        return company_id

    def new_user(self, company_id: str, role: str = "member", password: str = "pw-123456") -> str:
        """A user in `company_id`; returns an access token from a real login."""
        email = f"u-{uuid.uuid4().hex[:10]}@example.com"
        response = self.admin(
            "POST",
            "/v1/admin/users",
            json={"company_id": company_id, "email": email, "password": password, "role": role},
        )
        assert response.status_code == 201, response.text
        login = self.http.post(
            f"{self.cp_url}/v1/auth/login", json={"email": email, "password": password}
        )
        assert login.status_code == 200, login.text
        token: str = login.json()["data"]["access_token"]
        return token

    def init(self, token: str, body: dict[str, Any]) -> httpx.Response:
        return self.as_user(token, "POST", "/v1/chat/init", json=body)

    def init_ok(self, token: str, body: dict[str, Any]) -> dict[str, Any]:
        response = self.init(token, body)
        assert response.status_code == 201, response.text
        data: dict[str, Any] = response.json()["data"]
        return data

    def complete(self, grant: dict[str, Any], body: dict[str, Any]) -> httpx.Response:
        """`POST /v1/chat/completions` on the edge with `body`, under `grant`'s stream
        token (init's answer), read whole."""
        return self.http.post(
            f"{self.edge_url}/v1/chat/completions",
            headers={"Authorization": f"Bearer {grant['stream_token']}"},
            json=body,
            timeout=60,
        )

    def member_asks(
        self, body: dict[str, Any], stream: bool
    ) -> tuple[str, dict[str, Any], httpx.Response]:
        """A new member of a new company (100 credits) inits `body` and sends its
        messages to the edge's completions: its token, the grant, the edge's answer."""
        token = self.new_user(self.new_company("100"))
        grant = self.init_ok(token, body)
        return token, grant, self.complete(grant, {"messages": body["messages"], "stream": stream})

    def credits(self, token: str) -> dict[str, str]:
        response = self.as_user(token, "GET", "/v1/me")
        assert response.status_code == 200, response.text
        credits: dict[str, str] = response.json()["data"]["credits"]
        return credits

    def mock_stats(self) -> dict[str, int]:
        stats: dict[str, int] = self.http.get(f"{self.mock_url}/_mock/stats").json()
        return stats

    def wait_usage(self, token: str, reservation_id: str, timeout: float = 15) -> dict[str, Any]:
        """Poll `/v1/usage` until the reservation's record appears (the webhook landed)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            response = self.as_user(token, "GET", "/v1/usage", params={"limit": 200})
            assert response.status_code == 200, response.text
            for item in response.json()["data"]["items"]:
                if item["reservation_id"] == reservation_id:
                    found: dict[str, Any] = item
                    return found
            time.sleep(0.05)
        raise AssertionError(f"reservation {reservation_id} was not settled in {timeout}s")

    def openai(self, stream_token: str, **kwargs: Any) -> openai.OpenAI:
        """The official OpenAI client pointed at the edge, closed with this Client."""
        client = openai.OpenAI(base_url=f"{self.edge_url}/v1", api_key=stream_token, **kwargs)
        self._openai_clients.append(client)
        return client

    def close(self) -> None:
        for client in self._openai_clients:
            client.close()
        self.http.close()


class InProcessStack:
    def __init__(self, env: dict[str, str], store: Store | None = None) -> None:
        socks = [bind_free_socket() for _ in range(3)]
        mock_sock, cp_sock, edge_sock = socks
        env = {
            **env,
            "LLMGW_CONTROL_PLANE_URL": url_of(cp_sock),
            "LLMGW_EDGE_PUBLIC_URL": url_of(edge_sock),
        }
        # `settings`: the control plane's; the edge's are `edge_settings`.
        self.settings, self.edge_settings = settings_from_env(
            env, mock_url=f"{url_of(mock_sock)}/v1"
        )
        # `store`: one shared by both apps, e.g. a wrapper a test can make fail.
        if store is None and not self.settings.redis_url:
            store = MemoryStore()
        self.control_plane = control_plane_app(self.settings, store)
        self.edge = edge_app(self.edge_settings, store)
        self.group = ServerGroup(
            [(mock_app(), mock_sock), (self.control_plane, cp_sock), (self.edge, edge_sock)]
        )
        self.client = Client(
            url_of(cp_sock), url_of(edge_sock), url_of(mock_sock), env["LLMGW_WEBHOOK_SECRET"]
        )

    def __enter__(self) -> InProcessStack:
        self.group.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.close()
        self.group.stop()


def bind_port(port: int) -> socket.socket:
    """Bind 127.0.0.1:`port` again (a restarted service keeps its address)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    return sock


class SplitStack:
    """Each service in its own server group, so a test can stop and restart one
    (the control plane going down, an edge being replaced) while the others run.
    Needs Redis: the services share state only through it, as separate processes do."""

    def __init__(self, env: dict[str, str]) -> None:
        assert env.get("LLMGW_REDIS_URL"), "SplitStack needs Redis"
        self.ports = {}
        for name in ("mock", "cp", "edge", "edge2"):
            self.ports[name] = free_port()
        urls = {name: f"http://127.0.0.1:{port}" for name, port in self.ports.items()}
        self.env = {
            **env,
            "LLMGW_CONTROL_PLANE_URL": urls["cp"],
            "LLMGW_EDGE_PUBLIC_URL": urls["edge"],
        }
        self.mock_url = f"{urls['mock']}/v1"
        self.groups: dict[str, ServerGroup] = {}
        self.apps: dict[str, Any] = {}
        self.client = Client(urls["cp"], urls["edge"], urls["mock"], env["LLMGW_WEBHOOK_SECRET"])

    def settings(self, **overrides: str) -> ControlPlaneSettings:
        settings = ControlPlaneSettings.from_env({**self.env, **overrides})
        return dataclasses.replace(settings, catalog=with_mock_at(settings.catalog, self.mock_url))

    def edge_settings(self, **overrides: str) -> EdgeSettings:
        settings = EdgeSettings.from_env({**self.env, **overrides})
        return dataclasses.replace(settings, catalog=with_mock_at(settings.catalog, self.mock_url))

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}"

    def start(self, name: str, **overrides: str) -> Any:
        """Start `name` (mock, cp, edge, edge2: a second edge sharing Redis) with
        optional env overrides; returns its app."""
        if name == "mock":
            app = mock_app()
        elif name == "cp":
            app = control_plane_app(self.settings(**overrides))
        else:
            app = edge_app(self.edge_settings(**overrides))
        self.groups[name] = ServerGroup([(app, bind_port(self.ports[name]))]).start()
        self.apps[name] = app
        return app

    def stop(self, name: str) -> None:
        self.groups.pop(name).stop()

    def __enter__(self) -> SplitStack:
        for name in ("mock", "cp", "edge"):
            self.start(name)
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.close()
        for name in list(self.groups):
            self.stop(name)


def wait_healthy(
    url: str,
    process: subprocess.Popen[bytes],
    timeout: float = 30,
    log_path: Path | None = None,
) -> None:
    """Wait until `url`/healthz answers 200; fail at once if the process exits."""

    def log() -> str:
        return f":\n{log_path.read_text()}" if log_path is not None and log_path.exists() else ""

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"{url} exited with {process.returncode}{log()}")
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{url} did not become healthy{log()}")


@contextlib.contextmanager
def edge_process(
    split: SplitStack, tmp_path: Path, **overrides: str
) -> Iterator[subprocess.Popen[bytes]]:
    """Replace the split stack's in-process edge by a real `llm-gateway stream-edge`
    process on the same port (for signals: SIGKILL, SIGTERM). Its log goes to
    `tmp_path / "edge.log"`."""
    if "edge" in split.groups:
        split.stop("edge")
    models = tmp_path / "models.yaml"
    packaged = (ROOT / "shared" / "models.yaml").read_text()
    models.write_text(packaged.replace("http://127.0.0.1:8002/v1", split.mock_url))
    env = {**os.environ, **split.env, **overrides,
           "LLMGW_MODELS_FILE": str(models)}  # fmt: skip
    env.setdefault("LLMGW_LOG_LEVEL", "INFO")
    log_file = (tmp_path / "edge.log").open("ab")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "llm_gateway.cli",
            "stream-edge",
            "--port",
            str(split.ports["edge"]),
        ],
        env=env,
        cwd=ROOT,
        stdout=log_file,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_healthy(split.url("edge"), process, log_path=tmp_path / "edge.log")
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)
        log_file.close()
