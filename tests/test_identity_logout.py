"""Sign-out (``POST /v1/auth/logout``): a user ends the one token it presents, and
the stream tokens that token minted; nothing else, and nobody else's."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select, update
from sqlmodel import col

from control_plane.logout import revocation_seconds
from control_plane.tables import Revocation, utcnow
from shared.revocations import grant_keys, revocation_key
from shared.sse import SSEDecoder
from shared.tokens import PARENT_CLAIM, StreamGrant
from tests.polling import wait_until
from tests.stack import InProcessStack
from tests.test_control_plane import CP, PASSWORD, data_of, error_of, start_cp
from tests.test_identity_external import AUDIENCE, ISSUER, SECRET
from tests.test_identity_external import _token as external_token
from tests.token_claims import claims_of


@pytest.fixture(params=["sqlite", "postgres"])
def cp(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[CP]:
    extra = {
        "LLMGW_AUTH_JWT_SECRET": SECRET,
        "LLMGW_AUTH_JWT_AUDIENCE": AUDIENCE,
        "LLMGW_AUTH_JWT_ISSUER": ISSUER,
    }
    with start_cp(request, tmp_path, request.param, extra) as handle:
        yield handle


def _login(cp: CP, email: str) -> str:
    answer = cp.client().post("/v1/auth/login", json={"email": email, "password": PASSWORD})
    token: str = data_of(answer)["access_token"]
    return token


def _stored(cp: CP, token_id: str, company_id: str) -> bytes | None:
    store = cp.app.state.store
    key = revocation_key("jti", token_id, company_id)
    found: bytes | None = cp.on_loop(lambda: store.get(key))
    return found


def test_logout_ends_the_token_sent_and_no_other(cp: CP) -> None:
    """Attack: a signed-out access token (a lost laptop's) is refused on /v1/me and
    at init (before the fix it stayed valid for its whole hour); the same user's
    other sign-in keeps working, and no parameter lets a caller end another token."""
    company_id = cp.company("10")
    owner = cp.user(company_id, role="owner")
    member = cp.user(company_id, role="member")
    laptop, phone = _login(cp, member["email"]), _login(cp, member["email"])
    laptop_client, phone_client = cp.client(laptop), cp.client(phone)
    minted = data_of(laptop_client.post("/v1/chat/init", json={"query": "hi"}), 201)
    jti = claims_of(laptop)["jti"]
    assert claims_of(minted["stream_token"])[PARENT_CLAIM] == jti

    # Naming another token is refused, and changes nothing: both still work.
    for body in ({"jti": claims_of(phone)["jti"]}, {"token": phone}, {"user_id": member["id"]}):
        error_of(laptop_client.post("/v1/auth/logout", json=body), 422, "validation_error")
    error_of(laptop_client.post("/v1/auth/logout", content=b"[]"), 422, "validation_error")
    error_of(laptop_client.post("/v1/auth/logout", content=b"{"), 400, "malformed_json")
    for client in (laptop_client, phone_client):
        data_of(client.get("/v1/me"))
    assert _stored(cp, jti, company_id) is None

    assert data_of(laptop_client.post("/v1/auth/logout")) == {"signed_out": True}
    error_of(laptop_client.get("/v1/me"), 401, "signed_out")
    error_of(laptop_client.post("/v1/chat/init", json={"query": "hi"}), 401, "signed_out")
    error_of(laptop_client.get("/v1/sessions"), 401, "signed_out")
    # The edges are told, for as long as a stream token it minted could run.
    assert _stored(cp, jti, company_id) is not None

    # The other sign-in, and a new one, work on.
    assert data_of(phone_client.get("/v1/me"))["user"]["id"] == member["id"]
    data_of(phone_client.post("/v1/chat/init", json={"query": "still here"}), 201)
    data_of(cp.client(_login(cp, member["email"])).get("/v1/me"))

    # Idempotent: a repeat (a retry whose answer was lost) answers the same and
    # records nothing more; `{}` is an empty body too.
    assert data_of(laptop_client.post("/v1/auth/logout", json={})) == {"signed_out": True}
    owner_client = cp.client(cp.api_key(owner["id"]))
    listed = data_of(owner_client.get("/v1/admin/revocations"))["items"]
    assert [(r["kind"], r["value"], r["reason"], r["actor"]) for r in listed] == [
        ("jti", jti, "logout", member["id"])
    ]
    # Nobody revives it: not its company's owner, not the platform admin.
    lift = f"/v1/admin/revocations/{listed[0]['id']}"
    error_of(owner_client.delete(lift), 404, "not_found")
    error_of(cp.admin.delete(lift), 409, "conflict")
    error_of(laptop_client.get("/v1/me"), 401, "signed_out")


@pytest.fixture(params=["sqlite", "postgres"])
def swept_cp(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[CP]:
    with start_cp(request, tmp_path, request.param, {"LLMGW_SWEEP_INTERVAL_SECONDS": "0.1"}) as cp:
        yield cp


def _revocations(cp: CP) -> list[tuple[str, str | None]]:
    db = cp.app.state.db
    rows = cp.on_loop(
        lambda: db.transaction(
            lambda s: s.execute(select(col(Revocation.value), col(Revocation.reason))).all()
        )
    )
    return sorted((str(value), reason) for value, reason in rows)


def _expire(cp: CP, values: list[str]) -> None:
    """What the clock does to these rows an hour and a half later."""
    db = cp.app.state.db
    past = utcnow() - timedelta(seconds=1)
    cp.on_loop(
        lambda: db.transaction(
            lambda s: s.execute(
                update(Revocation).where(col(Revocation.value).in_(values)).values(expires_at=past)
            )
        )
    )


def test_expired_sign_outs_are_swept_and_nothing_else(swept_cp: CP) -> None:
    """Attack: successful logins are not limited, so a member looping login and
    logout (measured: 1.4 a second from one client on this box) left a row for good
    at each turn, growing the table and its company's revocations list without
    bound (before the fix no row ever went). A sign-out past its expiry, when its
    token and the stream tokens it minted are dead, is deleted by the sweeper; one
    still in force and an admin's revocation are kept."""
    cp = swept_cp
    company_id = cp.company("10")
    member, other = cp.user(company_id, role="member"), cp.user(company_id, role="member")
    tokens = [_login(cp, member["email"]) for _ in range(3)]
    for token in tokens:
        data_of(cp.client(token).post("/v1/auth/logout"))
    data_of(cp.admin.post("/v1/admin/revocations", json={"user_id": other["id"]}), 201)
    jtis = [str(claims_of(token)["jti"]) for token in tokens]
    _expire(cp, [*jtis[:2], other["id"]])

    kept = sorted([(jtis[2], "logout"), (other["id"], None)])
    wait_until(lambda: _revocations(cp) == kept, "the expired sign-outs are swept")
    error_of(cp.client(tokens[2]).get("/v1/me"), 401, "signed_out")


def test_logout_refuses_what_is_not_a_sign_in(cp: CP) -> None:
    company_id = cp.company("10")
    member = cp.user(company_id, role="member")
    key_client = cp.client(cp.api_key(member["id"]))
    error_of(key_client.post("/v1/auth/logout"), 400, "not_signed_in")
    error_of(cp.admin.post("/v1/auth/logout"), 400, "not_signed_in")
    error_of(cp.client().post("/v1/auth/logout"), 401, "unauthenticated")
    error_of(cp.client("not-a-token").post("/v1/auth/logout"), 401, "unauthenticated")
    # The key and the admin token still work; nothing was recorded.
    data_of(key_client.get("/v1/me"))
    assert data_of(cp.admin.get("/v1/admin/revocations"))["items"] == []


def _external(company: str, sub: str, **extra: Any) -> str:
    return external_token({}, "HS256", company_id=company, sub=sub, **extra)


def test_logout_with_an_external_jwt(cp: CP) -> None:
    company, sub = f"ext-co-{uuid.uuid4().hex[:8]}", f"ext-{uuid.uuid4().hex[:8]}"
    first = cp.client(_external(company, sub, jti="session-1"))
    second = cp.client(_external(company, sub, jti="session-2"))
    without = cp.client(_external(company, sub))
    data_of(first.get("/v1/me"))
    error_of(without.post("/v1/auth/logout"), 400, "not_signed_in")
    assert data_of(first.post("/v1/auth/logout")) == {"signed_out": True}
    error_of(first.get("/v1/me"), 401, "signed_out")
    data_of(first.post("/v1/auth/logout"))  # idempotent
    for client in (second, without):
        data_of(client.get("/v1/me"))
    # Another user's token with the same `jti` is its own: not ended by this one.
    other = cp.client(_external(company, f"ext-{uuid.uuid4().hex[:8]}", jti="session-1"))
    data_of(other.get("/v1/me"))
    data_of(second.post("/v1/auth/logout"))
    error_of(second.get("/v1/me"), 401, "signed_out")
    data_of(without.get("/v1/me"))


def test_an_external_jwt_that_never_expires_can_be_signed_out(cp: CP) -> None:
    """An external app's "never expires" token (``exp`` at 9999-12-31, or past any
    date): its sign-out ran past the last datetime (500, nothing recorded, the token
    alive); now recorded until the end of time, so never swept while it lives."""
    company = f"ext-co-{uuid.uuid4().hex[:8]}"
    for exp in (253_402_300_799, 10**12, 10**16):  # 10**16 s: past Redis's longest expiry
        sub = f"ext-{uuid.uuid4().hex[:8]}"
        client = cp.client(_external(company, sub, jti="forever", exp=exp))
        assert data_of(client.post("/v1/auth/logout")) == {"signed_out": True}
        error_of(client.get("/v1/me"), 401, "signed_out")


def test_stream_tokens_die_with_the_sign_in(stack: InProcessStack) -> None:
    """Attack: a stream token minted before the sign-out is refused by the edge, and a
    stream it runs ends with ``revoked`` (billed as such); a stream of the user's
    other sign-in runs on."""
    c = stack.client
    company_id = c.new_company("5")
    laptop = c.new_user(company_id)
    email = data_of(c.as_user(laptop, "GET", "/v1/me"))["user"]["email"]
    phone = c.http.post(
        f"{c.cp_url}/v1/auth/login", json={"email": email, "password": "pw-123456"}
    ).json()["data"]["access_token"]
    running = c.init_ok(laptop, {"query": "long [[mock tokens=1000 delay_ms=30]]"})
    unused = c.init_ok(laptop, {"query": "later"})
    kept = c.init_ok(phone, {"query": "other device"})

    decoder = SSEDecoder()
    events: list[Any] = []
    signed_out_at = None
    with httpx.stream("GET", running["stream_url"], timeout=10) as r:
        assert r.status_code == 200
        for raw in r.iter_raw():
            events.extend(decoder.feed(raw))
            if signed_out_at is None and sum(e.event == "chunk" for e in events) >= 5:
                answer = c.as_user(laptop, "POST", "/v1/auth/logout")
                assert answer.status_code == 200, answer.text
                signed_out_at = len(events)
    assert signed_out_at is not None
    assert events[-1].event == "error" and json.loads(events[-1].data)["code"] == "revoked"
    assert len(events) - signed_out_at < 200  # ended at the next check, not after 1000
    assert c.wait_usage(phone, running["reservation_id"])["status"] == "revoked"

    refused = c.http.get(unused["stream_url"])
    assert refused.status_code == 401, refused.text
    decoder = SSEDecoder()
    with httpx.stream("GET", kept["stream_url"], timeout=10) as r:
        assert r.status_code == 200
        tail = [e for raw in r.iter_raw() for e in decoder.feed(raw)]
    assert tail[-1].event == "complete"


def test_the_edge_checks_the_parent_token() -> None:
    claims = {
        "jti": "j", "sub": "u", "company_id": "c", "role": "member", "scopes": [],
        "session_id": "s", "model": "m", "max_tokens": 1, "max_input_tokens": 1,
        "reservation_id": "r", "request_id": "q", "iat": 0, "exp": 1,
    }  # fmt: skip
    assert len(grant_keys(StreamGrant.from_claims(claims))) == 3  # an API key's token
    grant = StreamGrant.from_claims({**claims, PARENT_CLAIM: "access-jti"})
    assert grant.parent_jti == "access-jti"
    assert revocation_key("jti", "access-jti", "c") in grant_keys(grant)


@pytest.mark.parametrize(
    ("expires_at", "now", "stream", "ttl"),
    [
        (1_000, 400, 480, 601 + 5 + 480),  # the token's life left, its leeway, then streams
        (1_000, 1_000, 480, 1 + 5 + 480),
        (1_000, 2_000, 480, 5 + 480),  # already expired: the streams it minted remain
    ],
)
def test_revocation_seconds(expires_at: int, now: float, stream: int, ttl: int) -> None:
    assert revocation_seconds(expires_at, now, stream) == ttl
