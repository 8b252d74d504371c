"""A company's LLM configuration cached between inits (issue 14.3) never outlives a
change: two control-plane apps share one database and one store, as two processes
do; a key stored or removed through one is what the other's next init routes with.
In-process (ASGITransport), SQLite + memory store."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx

from control_plane.app import create_app
from control_plane.catalog_cache import CatalogCache, CompanyLLM
from shared.route_claim import CLAIM, route_ciphers, unseal
from shared.store_memory import MemoryStore
from tests.asgi_cp import new_owner
from tests.test_control_plane import _settings
from tests.token_claims import claims_of


@contextlib.asynccontextmanager
async def _client(app: Any) -> AsyncIterator[httpx.AsyncClient]:
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://cp.test") as client:
            yield client


async def _routed_key(client: httpx.AsyncClient, auth: dict[str, str], settings: Any) -> Any:
    body = {"model": "gpt-4o-mini", "query": "hi", "max_tokens": 5}
    r = await client.post("/v1/chat/init", json=body, headers=auth)
    assert r.status_code == 201, r.text
    claims = claims_of(r.json()["data"]["stream_token"])
    if CLAIM not in claims:
        return None
    keys = [k.reveal() for k in settings.encryption_keys]
    return unseal(claims[CLAIM], route_ciphers(keys)).api_key


async def test_a_key_changed_through_one_process_routes_the_next_init_of_another(
    tmp_path: Path,
) -> None:
    settings = _settings(f"sqlite:///{tmp_path}/cp.db")
    store = MemoryStore()
    first, second = create_app(settings, store=store), create_app(settings, store=store)
    async with _client(first) as a, _client(second) as b:
        auth, company_id = await new_owner(a)
        providers = f"/v1/admin/companies/{company_id}/providers/openai"

        assert await _routed_key(a, auth, settings) is None  # cached in `first`: no key
        assert await _routed_key(a, auth, settings) is None  # served from its cache
        r = await b.put(providers, json={"api_key": "sk-company-" + "k" * 20}, headers=auth)
        assert r.status_code == 200, r.text
        assert await _routed_key(a, auth, settings) == "sk-company-" + "k" * 20
        r = await b.put(providers, json={"api_key": "sk-rotated-" + "r" * 20}, headers=auth)
        assert await _routed_key(a, auth, settings) == "sk-rotated-" + "r" * 20
        assert (await b.delete(providers, headers=auth)).status_code == 204
        assert await _routed_key(a, auth, settings) is None


def test_entries_match_only_their_version_and_expire() -> None:
    now = [100.0]
    cache = CatalogCache(max_age=30, clock=lambda: now[0])
    value = CompanyLLM(overrides=(), pools={"openai": ["k"]})
    cache.put("c1", "v1", value)
    assert cache.get("c1", "v1") is value
    assert cache.get("c1", "v2") is None  # changed since: reload
    assert cache.get("c2", "v1") is None
    now[0] += 31
    assert cache.get("c1", "v1") is None  # too old, whatever the version


async def test_a_refused_init_leaves_a_usable_cache_entry(tmp_path: Path) -> None:
    """The init that loads the configuration may roll back (here: a disabled model,
    403): the cached overrides must still be readable by the next init."""
    settings = _settings(f"sqlite:///{tmp_path}/cp.db")
    async with _client(create_app(settings)) as a:
        auth, company_id = await new_owner(a)
        r = await a.put(
            f"/v1/admin/companies/{company_id}/providers/mock",
            json={"models": {"mock-chat": {"enabled": False}}},
            headers=auth,
        )
        assert r.status_code == 200, r.text
        for _ in range(2):
            body = {"model": "mock-chat", "query": "hi", "max_tokens": 5}
            r = await a.post("/v1/chat/init", json=body, headers=auth)
            assert r.status_code == 403, r.text
        r = await a.post("/v1/chat/init", json={"query": "hi", "max_tokens": 5}, headers=auth)
        assert r.status_code == 201, r.text
