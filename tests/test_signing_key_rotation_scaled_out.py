"""A token signed right after a rotation is accepted by every worker and edge.

Scaled out (`llm-gateway control-plane --workers N`, replicas), the process that
rotated signed with the new key at once, while every other verifier reloaded its keys
on an unknown `kid` at most every 5 s, and refused it until then: a sibling worker
that had read its keys a moment before refused the user's fresh access token (401
"signed by an unknown key"), and an edge that had fetched the JWKS a moment before
refused the stream token init had just minted (401 `invalid_token`), its credits held
until the sweeper. The new key still signs at once (the rotation's answer means "it
signs from now on"); a verifier meeting an unknown `kid` now answers only after a read
of the keys that began after the token arrived (`Deps.fresh_keyring`,
`shared.jwks.JWKSCache.key`), reads spaced by a one-second floor.

Two control planes (A and B) on one database and store, and an edge, in one event
loop (`tests/inproc.py`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
import pytest_asyncio

from tests.inproc import Gateway, gateway_env, kid_of, second_control_plane

pytestmark = pytest.mark.asyncio(loop_scope="module")
BODY = {"messages": [{"role": "user", "content": "hi"}]}


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def gw(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Gateway]:
    async with Gateway(gateway_env(str(tmp_path_factory.mktemp("rotated")))) as gateway:
        yield gateway


@pytest_asyncio.fixture(loop_scope="module")
async def instance_b(gw: Gateway) -> AsyncIterator[httpx.AsyncClient]:
    """A second control plane on A's database and store, its keys read just now."""
    async with second_control_plane(gw) as (_, client):
        yield client


async def test_a_token_signed_right_after_a_rotation_is_accepted_by_every_worker_and_edge(
    gw: Gateway, instance_b: httpx.AsyncClient
) -> None:
    token = await gw.new_user()  # logged in through A
    assert (await instance_b.get("/v1/me", headers={"Authorization": f"Bearer {token}"})).is_success
    status, _ = await gw.complete((await gw.init_ok(token, {"query": "hi"}))["stream_token"], BODY)
    assert status == 200  # the edge has just fetched the JWKS, B has just read its keys

    rotated = await gw.admin("POST", "/v1/admin/signing-keys/rotate")
    assert rotated.status_code == 201, rotated.text
    new_kid = rotated.json()["data"]["kid"]

    # At once: A signs a login and a stream token with the new key; B and the edge
    # verify them.
    fresh = await gw.new_user()
    assert kid_of(fresh) == new_kid
    me = await instance_b.get("/v1/me", headers={"Authorization": f"Bearer {fresh}"})
    assert me.status_code == 200, me.text
    grant = await gw.init_ok(fresh, {"query": "hi"})
    assert kid_of(grant["stream_token"]) == new_kid
    status, answer = await gw.complete(grant["stream_token"], BODY)
    assert status == 200, answer
    # The token from before the rotation is still good everywhere.
    assert (await instance_b.get("/v1/me", headers={"Authorization": f"Bearer {token}"})).is_success
