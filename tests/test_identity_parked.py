"""A request parked on its body acts as the caller is when the body has arrived.

The control plane used to authenticate a caller from its headers and only then read
its body: a client may keep that body back for the server's body deadline (its
header timeout plus its size at 16 KiB/s: over a minute for a 1 MiB body), and its
request was then acted on with the role, scopes and standing the caller had when
its headers came. An owner about to be revoked or demoted parks requests, and once
revoked (or a member) sends their bodies: owners with its password, keys for a
co-owner, credits held for an API key revoked meanwhile.

Each test parks a request on a real socket until the app waits for its body (it
has then done all it does before the body: before the fix, authenticating), changes
the caller's standing, then sends the rest of the body.
"""

from __future__ import annotations

import json
import select
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest

from control_plane.app import create_app
from tests.test_control_plane import CP, PASSWORD, _settings, data_of, serve_cp


class BodyWatch:
    """The app, watched: `asked` is set once the app first asks for the body of a
    request marked ``X-Parked``, that is once it has done all it does before waiting
    for the body (the test's moment to change the caller's standing)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.asked = threading.Event()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or (b"x-parked", b"1") not in scope["headers"]:
            await self.app(scope, receive, send)
            return

        async def watched() -> Any:
            self.asked.set()
            return await receive()

        await self.app(scope, watched, send)


Watched = tuple[CP, BodyWatch]


@pytest.fixture(scope="module")
def watched(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Watched]:
    settings = _settings(f"sqlite:///{tmp_path_factory.mktemp('parked')}/cp.db")
    app = create_app(settings)
    watch = BodyWatch(app)
    with serve_cp(settings, app, served=watch) as handle:
        yield handle, watch


class Parked:
    """One request whose headers and first body byte are sent, the rest held back
    until the app waits for it."""

    def __init__(self, watched: Watched, method: str, path: str, token: str, doc: Any) -> None:
        cp, watch = watched
        parts = urlsplit(cp.url)
        self.body = json.dumps(doc).encode()
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nConnection: close\r\n"
            f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
            f"X-Parked: 1\r\nContent-Length: {len(self.body)}\r\n\r\n"
        ).encode()
        watch.asked.clear()
        self.sock = socket.create_connection((parts.hostname, parts.port), timeout=30)
        self.sock.sendall(head + self.body[:1])
        # Until the app waits for the body, or has answered without it (a bound on
        # the wait, not a timing assertion).
        deadline = time.monotonic() + 20
        while not watch.asked.wait(0.01):
            if select.select([self.sock], [], [], 0)[0]:
                break
            assert time.monotonic() < deadline, "the app never asked for the body"

    def finish(self) -> tuple[int, dict[str, Any]]:
        """Send the rest of the body; the status and the JSON answer."""
        with self.sock:
            try:
                self.sock.sendall(self.body[1:])
            except OSError:
                pass  # answered and closed without the body: its answer is read below
            answer = b""
            while chunk := self.sock.recv(65536):
                answer += chunk
        head, _, body = answer.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        if b"transfer-encoding: chunked" in head.lower():
            body = _dechunk(body)
        return status, json.loads(body)


def _dechunk(raw: bytes) -> bytes:
    out = b""
    while True:
        size_line, _, raw = raw.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            return out
        out, raw = out + raw[:size], raw[size + 2 :]


def _new_owner_body(company_id: str) -> dict[str, Any]:
    return {
        "company_id": company_id,
        "email": f"new-{uuid.uuid4().hex[:8]}@example.com",
        "password": PASSWORD,
        "role": "owner",
    }


def test_a_revoked_owners_parked_request_creates_no_owner(watched: Watched) -> None:
    """Attack: an owner parks `POST /v1/admin/users` (a new owner with a password it
    knows), is revoked, sends the body and logs in as the new owner: back in
    control of the company for good. Before the fix: 201, the new owner signed in."""
    cp = watched[0]
    company_id = cp.company()
    owner = cp.user(company_id, "owner", password=None)
    key = cp.api_key(owner["id"])
    parked = Parked(watched, "POST", "/v1/admin/users", key, _new_owner_body(company_id))
    data_of(cp.admin.post("/v1/admin/revocations", json={"user_id": owner["id"]}), 201)

    status, answer = parked.finish()

    assert (status, answer.get("error", {}).get("code")) == (403, "revoked"), answer
    users = data_of(cp.admin.get("/v1/admin/users", params={"company_id": company_id}))["items"]
    assert [u["id"] for u in users] == [owner["id"]]


def test_a_demoted_owners_parked_request_mints_no_owner_key(watched: Watched) -> None:
    """Attack: an owner parks `POST /v1/admin/api-keys` for a co-owner, is demoted to
    member, sends the body: an owner's key (``llm:admin`` included) in a member's
    hands. Before the fix: 201 with the key."""
    cp = watched[0]
    company_id = cp.company()
    owner = cp.user(company_id, "owner", password=None)
    co_owner = cp.user(company_id, "owner", password=None)
    key = cp.api_key(owner["id"])
    parked = Parked(watched, "POST", "/v1/admin/api-keys", key, {"user_id": co_owner["id"]})
    demoted = cp.admin.patch(f"/v1/admin/users/{owner['id']}", json={"role": "member"})
    assert data_of(demoted)["role"] == "member"

    status, answer = parked.finish()

    assert (status, answer.get("error", {}).get("code")) == (404, "not_found"), answer
    keys = data_of(cp.admin.get("/v1/admin/api-keys", params={"user_id": co_owner["id"]}))
    assert keys["items"] == []


def test_a_revoked_api_keys_parked_init_holds_nothing(watched: Watched) -> None:
    """Attack: a member's key parks `POST /v1/chat/init`; the key is revoked (the edges
    are told of a user's revocation, not of a key's); the body then got a hold and a
    stream token the edges accept. Before the fix: 201 with the token."""
    cp = watched[0]
    company_id = cp.company()
    member = cp.user(company_id, "member", password=None)
    key = cp.api_key(member["id"])
    listed = data_of(cp.admin.get("/v1/admin/api-keys", params={"user_id": member["id"]}))
    parked = Parked(watched, "POST", "/v1/chat/init", key, {"query": "hi", "max_tokens": 10})
    assert cp.admin.delete(f"/v1/admin/api-keys/{listed['items'][0]['id']}").status_code == 204

    status, answer = parked.finish()

    assert (status, answer.get("error", {}).get("code")) == (401, "unauthenticated"), answer
    owner = cp.client(cp.api_key(cp.user(company_id, "owner", password=None)["id"]))
    assert data_of(owner.get("/v1/credits"))["held"] == "0.000000"


# Every route that reads a body: (method, path, body), with {c} the company, {m} a
# member, {b} a budget on it, {t} a team and "a1" an agent of the company.
BODY_ROUTES = [
    ("POST", "/v1/admin/companies", {"name": "parked-{c}"}),
    ("POST", "/v1/admin/users", {"company_id": "{c}", "email": "p-{c}@x.io", "role": "owner"}),
    ("PATCH", "/v1/admin/users/{m}", {"role": "owner"}),
    ("POST", "/v1/admin/api-keys", {"user_id": "{m}"}),
    ("POST", "/v1/admin/signing-keys/rotate", {}),
    ("POST", "/v1/admin/companies/{c}/credits", {"amount": "1"}),
    ("POST", "/v1/admin/companies/{c}/adjustments", {"amount": "1", "reason": "r"}),
    ("PUT", "/v1/admin/companies/{c}/providers/mock", {"default_model": "mock-fast"}),
    ("POST", "/v1/admin/revocations", {"user_id": "{m}"}),
    (
        "POST",
        "/v1/admin/companies/{c}/budgets",
        {"scope": "user", "target_id": "{m}", "amount": "1", "period": "week"},
    ),
    ("PATCH", "/v1/admin/companies/{c}/budgets/{b}", {"amount": "2"}),
    ("POST", "/v1/admin/companies/{c}/teams", {"name": "t2", "user_ids": ["{m}"]}),
    ("PATCH", "/v1/admin/companies/{c}/teams/{t}", {"user_ids": ["{m}"]}),
    ("PUT", "/v1/admin/companies/{c}/webhook", {"url": "https://93.184.216.34/hook"}),
    ("POST", "/v1/admin/companies/{c}/agents", {"name": "a2"}),
    ("PATCH", "/v1/admin/companies/{c}/agents/a1", {"max_tokens": 10}),
    ("POST", "/v1/chat/init", {"query": "hi", "max_tokens": 10}),
]


def _filled(value: Any, ids: dict[str, str]) -> Any:
    if isinstance(value, str):
        return value.format(**ids)
    if isinstance(value, list):
        return [_filled(v, ids) for v in value]
    if isinstance(value, dict):
        return {k: _filled(v, ids) for k, v in value.items()}
    return value


@pytest.mark.parametrize(
    ("method", "path", "body"), BODY_ROUTES, ids=[f"{m} {p}" for m, p, _ in BODY_ROUTES]
)
def test_no_route_acts_for_an_owner_revoked_while_its_body_was_held_back(
    watched: Watched, method: str, path: str, body: dict[str, Any]
) -> None:
    """The same attack on every route that reads a body: 403 ``revoked``."""
    cp = watched[0]
    company_id = cp.company()
    member = cp.user(company_id, "member", password=None)
    budget = cp.admin.post(
        f"/v1/admin/companies/{company_id}/budgets",
        json={"scope": "user", "target_id": member["id"], "amount": "1", "period": "day"},
    )
    team = cp.admin.post(f"/v1/admin/companies/{company_id}/teams", json={"name": "t"})
    agent = cp.admin.post(f"/v1/admin/companies/{company_id}/agents", json={"name": "a1"})
    ids = {
        "c": company_id,
        "m": member["id"],
        "b": data_of(budget, 201)["id"],
        "t": data_of(team, 201)["id"],
    }
    data_of(agent, 201)
    owner = cp.user(company_id, "owner", password=None)
    key = cp.api_key(owner["id"])
    parked = Parked(watched, method, _filled(path, ids), key, _filled(body, ids))
    data_of(cp.admin.post("/v1/admin/revocations", json={"user_id": owner["id"]}), 201)

    status, answer = parked.finish()

    assert (status, answer.get("error", {}).get("code")) == (403, "revoked"), answer
