"""The gateway on real sockets (control plane and edge, one memory store) in front
of a stand-in OpenAI-compatible backend the test provides, which the catalog's
`mock` and `openai` providers are pointed at: what reaches the vendor can be
recorded and checked."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Awaitable, Callable, Iterator

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from control_plane.app import create_app as control_plane_app
from llm_gateway.dev import settings_from_env
from shared.catalog import Catalog
from shared.store_memory import MemoryStore
from stream_edge.app import create_app as edge_app
from tests.harness import ServerGroup, bind_free_socket, url_of
from tests.stack import Client, base_env

PLATFORM_KEY = "sk-platform-openai-key"  # the platform's own OpenAI key


def pointed_at(catalog: Catalog, url: str) -> Catalog:
    """`catalog` with its `mock` and `openai` providers at `url`."""
    providers = {
        name: dataclasses.replace(p, base_url=url) if name in ("mock", "openai") else p
        for name, p in catalog.providers.items()
    }
    return dataclasses.replace(catalog, providers=providers)


@contextlib.contextmanager
def gateway_before(
    database_url: str,
    chat: Callable[[Request], Awaitable[Response]],
    catalog_change: Callable[[Catalog], Catalog] = lambda catalog: catalog,
) -> Iterator[tuple[Client, MemoryStore, ServerGroup]]:
    """The gateway on `database_url` whose backend answers `POST /v1/chat/completions`
    with `chat`, its catalog changed by `catalog_change` once pointed at it; no
    retries of the backend. A client of it, its store and its servers."""
    backend_sock, cp_sock, edge_sock = (bind_free_socket() for _ in range(3))
    env = {
        **base_env(database_url),
        "LLMGW_CONTROL_PLANE_URL": url_of(cp_sock),
        "LLMGW_EDGE_PUBLIC_URL": url_of(edge_sock),
        "LLMGW_UPSTREAM_RETRIES": "0",
        "OPENAI_API_KEY": PLATFORM_KEY,
    }
    settings, edge_settings = settings_from_env(env)
    catalog = catalog_change(pointed_at(settings.catalog, f"{url_of(backend_sock)}/v1"))
    settings = dataclasses.replace(settings, catalog=catalog)
    edge_settings = dataclasses.replace(edge_settings, catalog=catalog)
    store = MemoryStore()
    apps = [
        (Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])]), backend_sock),
        (control_plane_app(settings, store), cp_sock),
        (edge_app(edge_settings, store), edge_sock),
    ]
    client = Client(
        url_of(cp_sock), url_of(edge_sock), url_of(backend_sock), env["LLMGW_WEBHOOK_SECRET"]
    )
    with ServerGroup(apps) as servers:
        try:
            yield client, store, servers
        finally:
            client.close()
