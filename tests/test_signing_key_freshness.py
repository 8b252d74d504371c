"""An instance that only serves API-key inits still signs with a live key (review
3B, finding 5).

Init signed with the instance's in-memory key ring, which only logins and a rotation
on the same instance refreshed. An instance serving nothing but API-key inits (the
edges' internal ones, or server code's keys) kept signing with the key it started
with; two rotations on another instance retire that key, and the edges refuse every
token it then mints (`unknown_kid`) while each took a hold. Init now takes the ring
as of at most a minute ago (`Deps.fresh_keyring`), as access-token checks do.

Two control planes (A and B) on one database, one event loop (`tests/inproc.py`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import httpx
import jwt
import pytest
import pytest_asyncio
from starlette.applications import Starlette

from control_plane.app import create_app as control_plane_app
from control_plane.deps import Deps
from control_plane.signing_keys import (
    REFRESH_SECONDS,
    create_signing_key,
    retire_superseded_keys,
)
from control_plane.tables import utcnow
from tests.inproc import Gateway, gateway_env

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def gw(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Gateway]:
    async with Gateway(gateway_env(str(tmp_path_factory.mktemp("keyring")))) as gateway:
        yield gateway


@pytest_asyncio.fixture(loop_scope="module")
async def instance_b(gw: Gateway) -> AsyncIterator[Starlette]:
    """A second control plane on A's database and store."""
    deps: Deps = gw.cp.state.deps
    app = control_plane_app(deps.settings, gw.store)
    async with app.router.lifespan_context(app):
        yield app


async def _rotate_twice(deps: Deps) -> None:
    """Two rotations, the second once the longest token life has passed: it retires
    the key every instance started with (what the admin route does at those times)."""
    max_life = 3600
    later = utcnow() + timedelta(seconds=max_life + 1)

    def rotate(session: Any, now: Any) -> None:
        retire_superseded_keys(session, now, max_life)
        create_signing_key(session, deps.fernet)

    await deps.db.transaction(lambda s: rotate(s, utcnow()))
    await deps.db.transaction(lambda s: rotate(s, later))
    await deps.refresh_keys()


async def test_an_api_key_only_instance_signs_with_a_live_key_after_two_rotations(
    gw: Gateway, instance_b: Starlette
) -> None:
    key = await gw.new_api_key()
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(instance_b), base_url="http://cp-b.test"
    ) as b:
        first = await b.post("/v1/chat/init", json={"query": "hi"}, headers=headers)
        assert first.status_code == 201, first.text
        started_with = jwt.get_unverified_header(first.json()["data"]["stream_token"])["kid"]

        await _rotate_twice(gw.cp.state.deps)
        jwks = (await gw.http.get("/.well-known/jwks.json")).json()
        live = {k["kid"]: k for k in jwks["keys"]}
        assert started_with not in live  # retired: the edges refuse it
        # A minute on, B has served only API-key inits (no login refreshed it).
        deps_b: Deps = instance_b.state.deps
        deps_b.keyring.loaded_at -= REFRESH_SECONDS + 1

        minted = await b.post("/v1/chat/init", json={"query": "hi"}, headers=headers)
        assert minted.status_code == 201, minted.text
    token = minted.json()["data"]["stream_token"]
    kid = jwt.get_unverified_header(token)["kid"]
    assert kid in live
    claims = jwt.decode(
        token, jwt.PyJWK(live[kid]).key, algorithms=["EdDSA"], audience="llm-stream"
    )
    assert claims["reservation_id"] == minted.json()["data"]["reservation_id"]
