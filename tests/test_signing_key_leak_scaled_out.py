"""A leaked signing key, retired on one instance, is refused everywhere within a pass.

Attack: whoever holds a leaked signing key signs access tokens for anyone (the
platform admin included) and stream tokens for any model. The platform admin
rotates with `retire_others`: the instance that rotated refused the key at once, but
a sibling (`--workers N`, a replica) kept trusting it until its key ring's next read
(up to a minute), and every edge until its JWKS cache's (up to 5 minutes), running
streams on its tokens included (measured here, before the announcement: after the
rotation, B answered `/v1/me` 200 for a token the key signed and the edge streamed a
stream token it signed). Now the rotation announces the retired keys in the store
(`shared.revocations.RETIRED_SIGNING_KEYS`), which each control plane
(`control_plane.retired_keys`) and edge (`stream_edge.revocation_watch`) reads once a
second: the key's tokens are refused, its running streams end `revoked`.

Two control planes (A and B) on one database and store, and an edge, in one event
loop (`tests/inproc.py`); each test runs the processes' once-a-second pass itself.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import orjson
import pytest
import pytest_asyncio

from control_plane.deps import Deps
from control_plane.retired_keys import check_retired_keys
from shared.revocations import RETIRED_SIGNING_KEYS
from stream_edge.revocation_watch import check_pass
from tests.inproc import Gateway, events, gateway_env, kid_of, opened, second_control_plane

pytestmark = pytest.mark.asyncio(loop_scope="module")
BODY = {"messages": [{"role": "user", "content": "hi"}]}


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def gw(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Gateway]:
    async with Gateway(gateway_env(str(tmp_path_factory.mktemp("leaked")))) as gateway:
        yield gateway


@pytest_asyncio.fixture(loop_scope="module")
async def instance_b(gw: Gateway) -> AsyncIterator[tuple[Deps, httpx.AsyncClient]]:
    """A second control plane on A's database and store, its keys read just now."""
    async with second_control_plane(gw) as instance:
        yield instance


async def me(client: httpx.AsyncClient, token: str) -> int:
    return (await client.get("/v1/me", headers={"Authorization": f"Bearer {token}"})).status_code


async def test_a_retired_key_is_refused_by_every_instance_and_edge_within_a_pass(
    gw: Gateway, instance_b: tuple[Deps, httpx.AsyncClient]
) -> None:
    deps_b, b = instance_b
    leaked_access = await gw.new_user()
    leaked_kid = kid_of(leaked_access)
    assert await me(b, leaked_access) == 200
    status, _ = await gw.complete((await gw.init_ok(leaked_access, BODY))["stream_token"], BODY)
    assert status == 200  # the edge has the key in its JWKS cache
    # A stream token the leaked key signed, unused yet (the thief's, in effect), and a
    # stream running on another.
    unused = (await gw.init_ok(leaked_access, BODY))["stream_token"]
    running = await gw.init_ok(leaked_access, {"query": "long [[mock tokens=400 delay_ms=20]]"})
    assert kid_of(unused) == kid_of(running["stream_token"]) == leaked_kid

    async with opened(await gw.get(running["stream_url"])) as stream:
        assert [e.event for e in await events(stream, stop_after=2)] == ["chunk", "chunk"]
        rotated = await gw.admin(
            "POST", "/v1/admin/signing-keys/rotate", json={"retire_others": True}
        )
        assert rotated.status_code == 201, rotated.text
        assert leaked_kid in rotated.json()["data"]["retired"]
        assert leaked_kid in await gw.store.bounded_members(RETIRED_SIGNING_KEYS)

        await check_retired_keys(deps_b)
        await check_pass(gw.edge_state())
        tail = await events(stream)
    assert tail and tail[-1].event == "error", [e.event for e in tail]
    assert orjson.loads(tail[-1].data)["code"] == "revoked"

    assert await me(gw.http, leaked_access) == 401  # A, which rotated
    assert await me(b, leaked_access) == 401
    status, answer = await gw.complete(unused, BODY)
    assert status == 401, answer
    # Everyone signs in again, with the new key, everywhere.
    fresh = await gw.new_user()
    assert kid_of(fresh) == rotated.json()["data"]["kid"]
    assert await me(b, fresh) == 200
    status, _ = await gw.complete((await gw.init_ok(fresh, BODY))["stream_token"], BODY)
    assert status == 200


async def test_an_instance_signing_with_a_key_retired_elsewhere_takes_the_new_one(
    gw: Gateway, instance_b: tuple[Deps, httpx.AsyncClient]
) -> None:
    """B signs with the key A retires: at its pass it reads its keys again and signs
    with the new one, not with the retired key every edge now refuses."""
    deps_b, b = instance_b
    before = await gw.new_user()
    assert kid_of(before) == deps_b.keyring.active()[0]  # B read its ring just now
    rotated = await gw.admin("POST", "/v1/admin/signing-keys/rotate", json={"retire_others": True})
    assert rotated.status_code == 201, rotated.text
    await check_retired_keys(deps_b)
    assert deps_b.keyring.active()[0] == rotated.json()["data"]["kid"]
    fresh = await gw.new_user()
    minted = await b.post("/v1/chat/init", json=BODY, headers={"Authorization": f"Bearer {fresh}"})
    assert minted.status_code == 201, minted.text
    assert kid_of(minted.json()["data"]["stream_token"]) == rotated.json()["data"]["kid"]
