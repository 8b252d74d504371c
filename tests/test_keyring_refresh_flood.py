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

An unknown `kid` now waits for a read begun after it arrived (a key rotated in on
another instance is then found), reads beginning at least a second apart: the tests
at the end drive that wait with a fake clock.

One control plane, one event loop (`tests/inproc.py`): the crowd is truly at once.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import pytest_asyncio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from control_plane import deps as deps_module
from control_plane.deps import Deps
from control_plane.signing_keys import (
    REFRESH_SECONDS,
    UNKNOWN_KID_REFRESH_SECONDS,
    create_signing_key,
)
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
    tokens = [made_up_token() for _ in range(CROWD)]
    answers = await asyncio.gather(
        *(gw.http.get("/v1/me", headers={"Authorization": f"Bearer {t}"}) for t in tokens)
    )
    assert {a.status_code for a in answers} == {401}
    assert {a.json()["error"]["code"] for a in answers} == {"unauthenticated"}
    assert len(key_reads) == 1, len(key_reads)
    # Within the floor, the next crowd waits for it, and shares one more read.
    again = await asyncio.gather(
        *(
            gw.http.get("/v1/me", headers={"Authorization": f"Bearer {made_up_token()}"})
            for _ in range(20)
        )
    )
    assert {a.status_code for a in again} == {401} and len(key_reads) == 2


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


class FakeTime:
    """`Deps.monotonic` and `Deps.sleep`: sleeping moves the clock on (sleepers at
    once: to the latest end)."""

    def __init__(self) -> None:
        self.now = time.monotonic()  # the ring's reads so far were stamped in real time

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        until = self.now + seconds
        await asyncio.sleep(0)
        self.now = max(self.now, until)


@pytest.fixture
def fake_time(gw: Gateway) -> Iterator[FakeTime]:
    deps: Deps = gw.cp.state.deps
    fake = FakeTime()
    deps.monotonic, deps.sleep = fake, fake.sleep
    yield fake
    deps.monotonic, deps.sleep = time.monotonic, asyncio.sleep


@pytest.fixture
def read_begins(gw: Gateway, fake_time: FakeTime, monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """When each read of the key ring began, on the fake clock."""
    deps: Deps = gw.cp.state.deps
    began: list[float] = []
    refresh = deps.refresh_keys

    async def counted() -> None:
        began.append(fake_time.now)
        await refresh()

    monkeypatch.setattr(deps, "refresh_keys", counted)
    return began


async def test_made_up_kids_wait_at_most_the_floor_and_read_at_most_once_per_floor(
    gw: Gateway, fake_time: FakeTime, read_begins: list[float]
) -> None:
    for step in range(8):
        arrived = fake_time.now
        answers = await asyncio.gather(
            *(
                gw.http.get("/v1/me", headers={"Authorization": f"Bearer {made_up_token()}"})
                for _ in range(20)
            )
        )
        assert {a.status_code for a in answers} == {401}
        # Answered after a read begun since they arrived, within the floor (the
        # read itself takes no time on this clock).
        assert read_begins and read_begins[-1] >= arrived, step
        assert fake_time.now - arrived <= UNKNOWN_KID_REFRESH_SECONDS
        fake_time.now += UNKNOWN_KID_REFRESH_SECONDS / 3
    assert len(read_begins) == 8
    spacing = [b - a for a, b in itertools.pairwise(read_begins)]
    assert min(spacing) >= UNKNOWN_KID_REFRESH_SECONDS, spacing


async def test_a_key_rotated_in_during_a_read_is_found_by_the_read_begun_after_its_token(
    gw: Gateway, fake_time: FakeTime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read in flight began before another instance's rotation: a token of the
    new key arriving meanwhile is answered by the next read, not refused on that
    one. The caller that started the read gives up: the read goes on for the rest."""
    deps: Deps = gw.cp.state.deps
    db = deps.db
    transaction = db.transaction
    loaded = asyncio.Event()
    finish = asyncio.Event()
    held: list[bool] = []

    async def ordered(fn: Any, **kwargs: Any) -> Any:
        result = await transaction(fn, **kwargs)
        if not held and fn is not rotate:
            held.append(True)
            loaded.set()
            await finish.wait()
        return result

    def rotate(session: Any) -> str:
        return create_signing_key(session, deps.fernet)[0]

    monkeypatch.setattr(db, "transaction", ordered)
    fake_time.now += UNKNOWN_KID_REFRESH_SECONDS  # past the floor of earlier reads
    first = asyncio.create_task(deps.fresh_keyring(unknown_kid=True))
    await loaded.wait()
    kid = await db.transaction(rotate)  # another instance rotates; its key signs
    second = asyncio.create_task(deps.fresh_keyring(unknown_kid=True))
    await asyncio.sleep(0)
    first.cancel()  # gives up: the shared read is not cancelled
    finish.set()
    ring = await second
    assert ring.public_key(kid) is not None and ring.active()[0] == kid
    assert first.cancelled()
