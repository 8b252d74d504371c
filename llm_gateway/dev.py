"""`llm-gateway dev`: the whole product in one process, nothing to install.

Mock LLM, control plane and edge share one event loop and one in-memory store, with
SQLite on disk. Secrets are generated on first start and kept in `var/dev-secrets.json`
so the encrypted signing keys in the database stay readable across restarts.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path

import orjson
from cryptography.fernet import Fernet
from starlette.types import ASGIApp

from control_plane.settings import ControlPlaneSettings
from llm_gateway.local_hosts import MESSAGE, LocalHostsOnly, check_local_host, configured_names
from shared.catalog import Catalog
from shared.store_memory import MemoryStore
from shared.webhooks import generate_secret
from stream_edge.settings import EdgeSettings

SECRETS_FILE = Path("var/dev-secrets.json")


def dev_secrets(path: Path = SECRETS_FILE) -> dict[str, str]:
    if path.exists():
        stored: dict[str, str] = json.loads(path.read_text())
        return stored
    path.parent.mkdir(parents=True, exist_ok=True)
    fresh = {
        "LLMGW_WEBHOOK_SECRET": generate_secret(),
        "LLMGW_ENCRYPTION_KEY": Fernet.generate_key().decode(),
    }
    path.write_text(json.dumps(fresh))
    path.chmod(0o600)
    return fresh


def dev_env(environ: Mapping[str, str], port_base: int) -> dict[str, str]:
    env = {**dev_secrets(), **environ}
    env.setdefault("LLMGW_CONTROL_PLANE_URL", f"http://127.0.0.1:{port_base}")
    env.setdefault("LLMGW_EDGE_PUBLIC_URL", f"http://127.0.0.1:{port_base + 1}")
    env.setdefault(
        "LLMGW_CORS_ORIGINS", f"http://127.0.0.1:{port_base},http://localhost:{port_base}"
    )
    env.setdefault("LLMGW_AUTO_MIGRATE", "1")
    # API keys straight at the edge (issue 16.5): one process, so a fresh secret
    # per run is enough.
    env.setdefault("LLMGW_EDGE_SERVICE_SECRET", generate_secret())
    return env


def settings_from_env(
    env: Mapping[str, str], *, dev: bool = False, mock_url: str | None = None
) -> tuple[ControlPlaneSettings, EdgeSettings]:
    """Both services' settings from one environment (one process runs both); with
    `mock_url`, both catalogs point the `mock` provider there."""
    cp = ControlPlaneSettings.from_env(env, dev=dev)
    edge = EdgeSettings.from_env(env, dev=dev)
    if mock_url is None:
        return cp, edge
    return (
        dataclasses.replace(cp, catalog=with_mock_at(cp.catalog, mock_url)),
        dataclasses.replace(edge, catalog=with_mock_at(edge.catalog, mock_url)),
    )


def with_mock_at(catalog: Catalog, url: str) -> Catalog:
    """Point the packaged `mock` provider at this run's mock port."""
    if "mock" not in catalog.providers:
        return catalog
    providers = dict(catalog.providers)
    providers["mock"] = dataclasses.replace(providers["mock"], base_url=url)
    return dataclasses.replace(catalog, providers=providers)


def dev_apps(
    settings: ControlPlaneSettings, edge_settings: EdgeSettings, store: MemoryStore
) -> tuple[ASGIApp, ASGIApp, ASGIApp]:
    """The control plane, the edge and the mock LLM of `dev`, each answering only
    requests addressed to this machine (`local_hosts`: no DNS rebinding)."""
    from control_plane.app import create_app as control_plane_app
    from control_plane.errors import error_body as cp_error_body
    from mock_llm.app import create_app as mock_app
    from stream_edge.app import create_app as edge_app
    from stream_edge.errors import error_body

    extra = configured_names([edge_settings.control_plane_url, settings.edge_public_url])
    openai_shape = error_body(MESSAGE, "invalid_request_error", "untrusted_host")
    return (
        LocalHostsOnly(
            control_plane_app(settings, store),
            extra=extra,
            body=orjson.dumps(cp_error_body(MESSAGE, "untrusted_host")),
        ),
        LocalHostsOnly(edge_app(edge_settings, store), extra=extra, body=openai_shape),
        LocalHostsOnly(mock_app(), extra=extra, body=openai_shape),
    )


async def run_dev(port_base: int, host: str = "127.0.0.1") -> None:
    from control_plane.migrate import upgrade
    from control_plane.seed import seed_demo
    from llm_gateway.servers import limits_of, serve_all, server_for
    from llm_gateway.setting_names import warn_misconfiguration

    check_local_host(host)
    settings, edge_settings = settings_from_env(
        dev_env(os.environ, port_base), dev=True, mock_url=f"http://127.0.0.1:{port_base + 2}/v1"
    )
    warn_misconfiguration(os.environ, settings.catalog)  # a misspelled LLMGW_*, a free model
    if settings.database_url.startswith("sqlite:///var/"):
        Path("var").mkdir(exist_ok=True)
    await asyncio.to_thread(upgrade, settings.database_url)
    api_key = await seed_demo(settings.database_url, own_database_only=True)
    control_plane, edge, mock = dev_apps(settings, edge_settings, MemoryStore())
    limits = limits_of(settings)
    servers = [
        server_for(control_plane, host, port_base, limits=limits),
        server_for(
            edge,
            host,
            port_base + 1,
            graceful_seconds=edge_settings.drain_seconds + 10,
            limits=limits,
        ),
        server_for(mock, host, port_base + 2, limits=limits),
    ]
    cp = f"http://127.0.0.1:{port_base}"
    print(
        f"""
  LLM Gateway is running (embedded mode: SQLite + in-memory store)

    demo page       {cp}/
    console         {cp}/console  (owners and platform admins)
    control plane   {cp}
    stream edge     {settings.edge_public_url}
    mock LLM        http://127.0.0.1:{port_base + 2}/v1

  Sign in as demo@example.com / demo, or use this demo API key (shown once):

    export LLMGW_API_KEY={api_key}
    curl -s -X POST {cp}/v1/chat/init -H "Authorization: Bearer $LLMGW_API_KEY" \\
         -H 'Content-Type: application/json' -d '{{"query": "Hello!"}}'
    # then open the returned stream_url, e.g. curl -N "<stream_url>"

  Ctrl-C stops everything.
""",
        flush=True,
    )
    await serve_all(servers)
