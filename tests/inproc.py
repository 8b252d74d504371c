"""The whole gateway in one event loop, without sockets: mock LLM, control plane and
one or more edges, wired by `InMemoryTransport` (the edges' backend calls, usage
webhooks and control-plane calls) and httpx's `ASGITransport` (JWKS, the tests'
control-plane calls). Edges share one `MemoryStore`, as edge processes share Redis.

Tests read the edges' streams through an `InMemoryTransport` too, so they can stop
reading mid-stream and disconnect, which `ASGITransport` (it runs the app to its end
before answering) cannot show.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import jwt
import orjson
from starlette.applications import Starlette

from control_plane.app import create_app as control_plane_app
from control_plane.deps import Deps
from llm_gateway.dev import settings_from_env
from mock_llm.app import create_app as mock_app
from mock_llm.streaming import MockStats
from shared.sse import ServerSentEvent, SSEDecoder
from shared.store import Store
from shared.store_memory import MemoryStore
from stream_edge.app import create_app as edge_app
from stream_edge.memory_transport import InMemoryResponse, InMemoryTransport
from stream_edge.settings import EdgeSettings
from stream_edge.state import EdgeState
from tests.stack import ADMIN_TOKEN, base_env

CP, MOCK = "http://cp.test", "http://mock.test"


def edge_url(name: str) -> str:
    return f"http://{name}.test"


class Gateway:
    """Start with `async with Gateway(env) as gw`; `await gw.add_edge("edge2", ...)`
    for more edges (own settings, same store unless given one). `store`: what the
    control plane and the first edge share (by default a `MemoryStore`); the
    gateway closes it."""

    def __init__(self, env: dict[str, str], store: Store | None = None) -> None:
        self.env = {
            **env,
            "LLMGW_CONTROL_PLANE_URL": CP,
            "LLMGW_EDGE_PUBLIC_URL": edge_url("edge"),
        }
        self.store: Store = store if store is not None else MemoryStore()
        self.mock = mock_app()
        cp_settings, _ = settings_from_env(self.env, mock_url=f"{MOCK}/v1")
        self.cp = control_plane_app(cp_settings, self.store)
        # What the edges send through: the backends and the control plane.
        self.backends = InMemoryTransport(
            {MOCK: self.mock, CP: self.cp}, read_timeout=self.settings().upstream_read_timeout
        )
        # What the tests' "browsers" send through: the edges.
        self.clients = InMemoryTransport({})
        self.edges: dict[str, Starlette] = {}
        self.http = httpx.AsyncClient(transport=httpx.ASGITransport(self.cp), base_url=CP)
        self._resources = contextlib.AsyncExitStack()

    def settings(self, **overrides: str) -> EdgeSettings:
        """An edge's settings: the gateway's environment with `overrides`."""
        _, edge = settings_from_env({**self.env, **overrides}, mock_url=f"{MOCK}/v1")
        return edge

    async def __aenter__(self) -> Gateway:
        await self._resources.__aenter__()
        await self._resources.enter_async_context(self.cp.router.lifespan_context(self.cp))
        await self.add_edge("edge")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.clients.aclose()
        await self._resources.__aexit__(None, None, None)
        await self.backends.aclose()
        await self.http.aclose()
        await self.store.close()

    async def add_edge(
        self,
        name: str,
        *,
        clock: Callable[[], float] = time.time,
        store: Store | None = None,
        **overrides: str,
    ) -> Starlette:
        """Start (or replace) edge `name`, reachable at `edge_url(name)`; `clock`: its
        wall clock (a host whose clock disagrees with the control plane's); `store`:
        its own store instead of the gateway's (closed once the edge has stopped)."""
        if store is not None:
            self._resources.push_async_callback(store.close)
        app = edge_app(
            self.settings(**overrides),
            store if store is not None else self.store,
            transport=self.backends,
            jwks_transport=httpx.ASGITransport(self.cp),
            clock=clock,
        )
        self.edges[name] = app
        await self._resources.enter_async_context(app.router.lifespan_context(app))
        self.clients.route(edge_url(name), app)
        return app

    def edge_state(self, name: str = "edge") -> EdgeState:
        state: EdgeState = self.edges[name].state.edge
        return state

    @property
    def stats(self) -> MockStats:
        stats: MockStats = self.mock.state.mock.stats
        return stats

    # --- the control plane, as a user and an admin --------------------------------

    async def admin(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        return await self.http.request(method, path, headers=headers, **kwargs)

    async def _new_company(self, credits: str) -> str:
        company = await self.admin(
            "POST",
            "/v1/admin/companies",
            json={"name": f"co-{uuid.uuid4().hex[:10]}", "credits": credits},
        )
        assert company.status_code == 201, company.text
        company_id: str = company.json()["data"]["id"]
        return company_id

    async def new_user(self, credits: str = "5") -> str:
        """A user of a new company; returns an access token from a real login."""
        company_id = await self._new_company(credits)
        email = f"u-{uuid.uuid4().hex[:10]}@example.com"
        created = await self.admin(
            "POST",
            "/v1/admin/users",
            json={
                "company_id": company_id,
                "email": email,
                "password": "pw-123456",
                "role": "member",
            },
        )
        assert created.status_code == 201, created.text
        login = await self.http.post(
            "/v1/auth/login", json={"email": email, "password": "pw-123456"}
        )
        assert login.status_code == 200, login.text
        token: str = login.json()["data"]["access_token"]
        return token

    async def new_api_key(self, credits: str = "5") -> str:
        """An API key (`sk_…`) of a new member of a new company."""
        user = await self.admin(
            "POST",
            "/v1/admin/users",
            json={
                "company_id": await self._new_company(credits),
                "email": f"u-{uuid.uuid4().hex[:10]}@example.com",
            },
        )
        assert user.status_code == 201, user.text
        created = await self.admin(
            "POST", "/v1/admin/api-keys", json={"user_id": user.json()["data"]["id"]}
        )
        assert created.status_code == 201, created.text
        key: str = created.json()["data"]["key"]
        return key

    async def init_ok(self, token: str, body: dict[str, Any]) -> dict[str, Any]:
        response = await self.http.post(
            "/v1/chat/init", json=body, headers={"Authorization": f"Bearer {token}"}
        )
        assert response.status_code == 201, response.text
        data: dict[str, Any] = response.json()["data"]
        return data

    async def credits(self, token: str) -> dict[str, str]:
        response = await self.http.get("/v1/me", headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 200, response.text
        credits: dict[str, str] = response.json()["data"]["credits"]
        return credits

    async def wait_usage(
        self, token: str, reservation_id: str, within: float = 15
    ) -> dict[str, Any]:
        """The reservation's usage record, once its webhook has settled it."""
        found: dict[str, Any] = {}

        async def settled() -> bool:
            response = await self.http.get(
                "/v1/usage", params={"limit": 200}, headers={"Authorization": f"Bearer {token}"}
            )
            assert response.status_code == 200, response.text
            for item in response.json()["data"]["items"]:
                if item["reservation_id"] == reservation_id:
                    found.update(item)
                    return True
            return False

        await eventually(settled, f"reservation {reservation_id} settled", within)
        return found

    # --- the edges, as a browser ----------------------------------------------------

    async def get(
        self, url: str, headers: dict[str, str] | None = None, edge: str = "edge"
    ) -> InMemoryResponse:
        """GET `url` (a stream URL of edge "edge") from edge `edge`; the caller closes it."""
        url = url.replace(edge_url("edge"), edge_url(edge))
        return await self.clients.send("GET", url, headers or {}, b"")

    async def post(
        self, path: str, body: bytes, headers: dict[str, str], edge: str = "edge"
    ) -> InMemoryResponse:
        all_headers = {"content-type": "application/json", **headers}
        return await self.clients.send("POST", edge_url(edge) + path, all_headers, body)

    async def complete(
        self, token: str, body: dict[str, Any] | bytes, edge: str = "edge"
    ) -> tuple[int, Any]:
        """Edge `edge`'s whole answer (or its error) to `body` (bytes go as they are)
        on `/v1/chat/completions` for `token`, a stream token or an API key: the
        status and the JSON it answered."""
        raw = body if isinstance(body, bytes) else orjson.dumps(body)
        headers = {"Authorization": f"Bearer {token}"}
        async with opened(await self.post("/v1/chat/completions", raw, headers, edge)) as r:
            return r.status_code, orjson.loads(await r.aread())


async def events(
    response: InMemoryResponse, stop_after: int | None = None
) -> list[ServerSentEvent]:
    """The response's events, all of them or the first `stop_after`."""
    decoder = SSEDecoder()
    got: list[ServerSentEvent] = []
    async with asyncio.timeout(30):  # a bound on a broken test, not a timing check
        async for raw in response.aiter_raw():
            got.extend(decoder.feed(raw))
            if stop_after is not None and len(got) >= stop_after:
                break
    return got


async def eventually(condition: Callable[[], Any], what: str, within: float = 10.0) -> None:
    """Await until `condition()` (a plain or async predicate) holds; each check yields
    to the loop. Fails after `within` seconds: a bound, not a timing assertion."""
    try:
        async with asyncio.timeout(within):
            while True:
                result = condition()
                if asyncio.iscoroutine(result):
                    result = await result
                if result:
                    return
                await asyncio.sleep(0.005)
    except TimeoutError:
        raise AssertionError(f"not within {within} s: {what}") from None


@contextlib.asynccontextmanager
async def second_control_plane(gw: Gateway) -> AsyncIterator[tuple[Deps, httpx.AsyncClient]]:
    """A second control plane on `gw`'s database and store, its keys read just now
    (a sibling instance: `--workers N`, replicas)."""
    settings = gw.cp.state.deps.settings
    app: Starlette = control_plane_app(settings, gw.store)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app), base_url="http://cp-b.test"
        ) as client:
            yield app.state.deps, client


def kid_of(token: str) -> str:
    """The signing key a token names (read unverified)."""
    return str(jwt.get_unverified_header(token)["kid"])


@contextlib.asynccontextmanager
async def opened(response: InMemoryResponse) -> AsyncIterator[InMemoryResponse]:
    try:
        yield response
    finally:
        await response.aclose()


def gateway_env(tmp: str, **extra: str) -> dict[str, str]:
    return {**base_env(f"sqlite:///{tmp}/gw.db"), **extra}
