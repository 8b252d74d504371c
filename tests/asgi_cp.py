"""A control plane served in the test's own event loop (httpx's `ASGITransport`: no
socket, no thread), and the company owners its tests act as."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from control_plane.app import create_app
from tests.test_control_plane import ADMIN_TOKEN, pg_settings

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@contextlib.asynccontextmanager
async def served(settings: Any) -> AsyncIterator[tuple[Any, httpx.AsyncClient]]:
    """The control plane of `settings`, started (its lifespan run), and a client of it."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://cp.test") as client:
            yield app, client


@pytest.fixture
async def pg_app_client(pg_server: str) -> AsyncIterator[tuple[Any, httpx.AsyncClient]]:
    """A control plane on a fresh PostgreSQL database (for a row lock another
    connection holds) and Redis prefix, served in the test's loop, and its client.
    A fixture: import it by name."""
    with pg_settings(pg_server) as settings:
        async with served(settings) as app_and_client:
            yield app_and_client


async def new_owner(client: httpx.AsyncClient, credits: str = "10") -> tuple[dict[str, str], str]:
    """A new company with `credits` and its owner: the owner's API key as request
    headers, and the company's id."""
    r = await client.post(
        "/v1/admin/companies",
        json={"name": f"c-{uuid.uuid4().hex[:8]}", "credits": credits},
        headers=ADMIN,
    )
    company_id = r.json()["data"]["id"]
    r = await client.post(
        "/v1/admin/users",
        json={"company_id": company_id, "email": f"{company_id}@example.com", "role": "owner"},
        headers=ADMIN,
    )
    r = await client.post(
        "/v1/admin/api-keys", json={"user_id": r.json()["data"]["id"]}, headers=ADMIN
    )
    return {"Authorization": f"Bearer {r.json()['data']['key']}"}, company_id
