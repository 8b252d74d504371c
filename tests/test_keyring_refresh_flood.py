"""A crowd of tokens naming a signing key nobody has costs one key-ring read.

An access token whose `kid` the ring does not know makes the control plane read its
signing keys again (another instance may have just rotated), at most every few
seconds (`UNKNOWN_KID_REFRESH_SECONDS`). The floor counted from the last read that
*finished*: every request arriving while the ring was stale started a read of its
own, so an anonymous client sending a burst of made-up tokens every five seconds put
a transaction per token on the database threads that logins, inits and settlements
wait for (measured: 200 tokens at once, 200 transactions). The honest traffic did
the same once a minute (`REFRESH_SECONDS`): every init finding the ring a minute old
read it again. Now the callers that find the ring stale share one read.

One control plane, one event loop (`tests/inproc.py`): the crowd is truly at once.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from control_plane import deps as deps_module
from control_plane.deps import Deps
from control_plane.signing_keys import REFRESH_SECONDS, UNKNOWN_KID_REFRESH_SECONDS
from shared.tokens import API_AUDIENCE, ISSUER, sign_token
from tests.inproc import Gateway, gateway_env

pytestmark = pytest.mark.asyncio(loop_scope="module")

CROWD = 200


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def gw(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Gateway]:
    async with Gateway(gateway_env(str(tmp_path_factory.mktemp("keyflood")))) as gateway:
        yield gateway


@pytest.fixture
def key_reads(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Each read of the signing keys (`load_snapshot`, on a database thread)."""
    reads: list[float] = []
    load = deps_module.load_snapshot

    def counted(*args: Any) -> Any:
        reads.append(time.monotonic())
        return load(*args)

    monkeypatch.setattr(deps_module, "load_snapshot", counted)
    return reads


def made_up_token() -> str:
    """A well-formed access token signed by a key the control plane never made."""
    now = int(time.time())
    claims = {
        "iss": ISSUER,
        "aud": API_AUDIENCE,
        "sub": uuid.uuid4().hex,
        "iat": now,
        "nbf": now,
        "exp": now + 600,
        "jti": uuid.uuid4().hex,
    }
    return sign_token(claims, Ed25519PrivateKey.generate(), uuid.uuid4().hex[:16])


async def test_a_crowd_of_made_up_kids_reads_the_signing_keys_once(
    gw: Gateway, key_reads: list[float]
) -> None:
    deps: Deps = gw.cp.state.deps
    deps.keyring.loaded_at -= UNKNOWN_KID_REFRESH_SECONDS + 1  # an unknown kid may refresh
    tokens = [made_up_token() for _ in range(CROWD)]
    answers = await asyncio.gather(
        *(gw.http.get("/v1/me", headers={"Authorization": f"Bearer {t}"}) for t in tokens)
    )
    assert {a.status_code for a in answers} == {401}
    assert {a.json()["error"]["code"] for a in answers} == {"unauthenticated"}
    assert len(key_reads) == 1, len(key_reads)
    # Within the floor, no read at all.
    again = await gw.http.get("/v1/me", headers={"Authorization": f"Bearer {made_up_token()}"})
    assert again.status_code == 401 and len(key_reads) == 1


async def test_a_crowd_of_inits_finding_the_ring_a_minute_old_reads_it_once(
    gw: Gateway, key_reads: list[float]
) -> None:
    token = await gw.new_user(credits="50")
    deps: Deps = gw.cp.state.deps
    deps.keyring.loaded_at -= REFRESH_SECONDS + 1
    answers = await asyncio.gather(
        *(
            gw.http.post(
                "/v1/chat/init",
                json={"query": "hi"},
                headers={"Authorization": f"Bearer {token}"},
            )
            for _ in range(20)
        )
    )
    assert all(a.status_code in (201, 429) for a in answers), [a.text for a in answers]
    assert any(a.status_code == 201 for a in answers)
    assert len(key_reads) == 1, len(key_reads)


async def test_a_failed_read_fails_its_crowd_and_the_next_caller_reads_again(
    gw: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sharing the read shares its failure (the database's 503), never caches it."""
    deps: Deps = gw.cp.state.deps
    calls: list[int] = []
    load = deps_module.load_snapshot

    def failing(*args: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("the database went away")
        return load(*args)

    monkeypatch.setattr(deps_module, "load_snapshot", failing)
    deps.keyring.loaded_at -= REFRESH_SECONDS + 1
    crowd = await asyncio.gather(*(deps.fresh_keyring() for _ in range(10)), return_exceptions=True)
    assert len(calls) == 1
    assert all(isinstance(r, RuntimeError) for r in crowd)
    assert await deps.fresh_keyring() is deps.keyring
    assert len(calls) == 2 and not deps.keyring.stale()


async def test_an_older_shared_read_never_replaces_a_rotations_newer_ring(
    gw: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A caller finding the ring stale starts the shared read; a rotation commits
    and forces its own read, which finishes first; the older read finishes last.
    Before, the last to finish was installed: the ring went back to the old key for
    up to a minute (signing with the rotated-out key, or trusting a retired one).
    Now each read is stamped when it begins and only a newer one is installed."""
    deps: Deps = gw.cp.state.deps
    db = deps.db
    transaction = db.transaction
    old_read_loaded = asyncio.Event()
    let_old_read_finish = asyncio.Event()
    held: list[bool] = []

    async def ordered(fn: Any, **kwargs: Any) -> Any:
        result = await transaction(fn, **kwargs)
        if not held:  # the shared read: committed before the rotation, answered after
            held.append(True)
            old_read_loaded.set()
            await let_old_read_finish.wait()
        return result

    monkeypatch.setattr(db, "transaction", ordered)
    deps.keyring.loaded_at -= REFRESH_SECONDS + 1
    shared = asyncio.create_task(deps.fresh_keyring())
    await old_read_loaded.wait()
    rotated = await gw.admin("POST", "/v1/admin/signing-keys/rotate")  # its forced read
    assert rotated.status_code == 201, rotated.text
    kid = rotated.json()["data"]["kid"]
    assert deps.keyring.active()[0] == kid
    let_old_read_finish.set()
    await shared
    assert deps.keyring.active()[0] == kid
