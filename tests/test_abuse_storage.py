"""Free storage (issue 12.6): abandoned inits count against a per-user limit, a chat
session and a stashed request are capped, a session's messages come a page at a
time, and an owner's listing has its index. One control plane on PostgreSQL +
Redis with small limits for the whole module."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from sqlalchemy import select, text
from sqlmodel import col

from control_plane.db import create_sync_engine
from control_plane.migrate import upgrade
from control_plane.sweeper import sweep_expired_holds
from control_plane.tables import ChatMessage, ChatSession, utcnow
from shared.store import Admission, Store
from shared.store_memory import MemoryStore
from shared.store_redis import RedisStore
from shared.tool_shapes import MAX_ID_CHARS
from stream_edge import grants
from tests.conftest import REDIS_URL, fresh_redis_prefix
from tests.test_abuse_input import counts
from tests.test_control_plane import (
    CP,
    credits_of,
    data_of,
    error_of,
    pg_settings,
    serve_cp,
    usage_event,
)
from tests.token_claims import claims_of

PENDING = 3
COMPANY_PENDING = 8
LIMITS = {
    "LLMGW_MAX_PENDING_INITS_PER_USER": str(PENDING),
    "LLMGW_MAX_PENDING_INITS_PER_COMPANY": str(COMPANY_PENDING),
    "LLMGW_MAX_SESSION_MESSAGES": "6",
    "LLMGW_MAX_SESSION_BYTES": "6000",
    "LLMGW_MAX_REQUEST_BYTES": "8192",
}


@pytest.fixture(scope="module")
def cp(pg_server: str) -> Iterator[CP]:
    with pg_settings(pg_server, LIMITS) as settings, serve_cp(settings) as handle:
        yield handle


def _member(cp: CP, credits: str = "10") -> tuple[httpx.Client, str]:
    """A member's client (the attack needs no more) and its company."""
    company_id = cp.company(credits)
    user = cp.user(company_id, role="member", password=None)
    return cp.client(cp.api_key(user["id"])), company_id


def _init(client: httpx.Client, **body: Any) -> dict[str, Any]:
    return dict(data_of(client.post("/v1/chat/init", json=body or {"query": "hi"}), 201))


def _start_stream(cp: CP, init: dict[str, Any]) -> None:
    """What the edge does when the token is first used (`Store.admit`)."""
    claims = claims_of(init["stream_token"])
    admission = Admission(
        revocation_keys=[],
        used_key=grants.used_key(claims["company_id"], claims["jti"]),
        path="/v1/stream",
        used_ttl_seconds=600,
        slot_keys=[],
        limits=[],
        member=claims["jti"],
        now=time.time(),
        slots_expire_at=time.time() + 600,
    )
    assert cp.on_loop(lambda: cp.app.state.store.admit(admission)).verdict == "ok"


def test_abandoned_inits_count_against_a_limit(cp: CP) -> None:
    client, company_id = _member(cp)
    inits = [_init(client) for _ in range(PENDING)]
    before, rows = credits_of(client), counts(cp, company_id)
    r = client.post("/v1/chat/init", json={"query": "one more"})
    error_of(r, 429, "too_many_pending_inits")
    retry_after = int(r.headers["Retry-After"])
    settings = cp.settings
    assert 0 < retry_after <= settings.token_ttl_seconds + settings.hold_grace_seconds + 1
    assert credits_of(client) == before and counts(cp, company_id) == rows  # changed nothing

    _start_stream(cp, inits[0])  # a stream that starts frees its place
    inits.append(_init(client))
    error_of(client.post("/v1/chat/init", json={"query": "hi"}), 429, "too_many_pending_inits")
    # So does a hold that ends (here: settled by its usage webhook).
    event = usage_event(inits[1], company_id, status="failed", output_tokens=0, content=None)
    assert data_of(cp.webhook(event))["settled"] is True
    _init(client)
    # The limit is per user: a colleague is not blocked.
    colleague = cp.client(cp.api_key(cp.user(company_id, role="member", password=None)["id"]))
    _init(colleague)


def _stashes(cp: CP, company_id: str) -> int:
    """How many requests the company has stashed in the store (`shared.stash`)."""
    store = cp.app.state.store
    pattern = f"{store._prefix}req:{{c:{company_id}}}:*"
    return len(cp.on_loop(lambda: store._redis.keys(pattern)))


def test_a_companys_members_together_cannot_fill_the_store(cp: CP) -> None:
    """The pending-init cap was per user only: an owner creates members at will and
    each member's abandoned inits (a stashed request of up to
    ``LLMGW_MAX_REQUEST_BYTES`` each) stay until their holds' deadlines, so one
    company could fill the shared Redis for every tenant. Now the company's pending
    inits are capped too (``LLMGW_MAX_PENDING_INITS_PER_COMPANY``)."""
    company_id = cp.company("10")

    def member() -> httpx.Client:
        return cp.client(cp.api_key(cp.user(company_id, role="member", password=None)["id"]))

    members = [member() for _ in range(-(-COMPANY_PENDING // PENDING))]
    # Each member stays under its own cap; together they fill the company's.
    inits = [_init(members[i // PENDING]) for i in range(COMPANY_PENDING)]
    fresh = member()
    before = credits_of(fresh), counts(cp, company_id), _stashes(cp, company_id)
    assert before[2] == COMPANY_PENDING
    r = fresh.post("/v1/chat/init", json={"query": "one more"})
    message = error_of(r, 429, "too_many_pending_inits")
    assert "company" in message and "You have" not in message, message
    settings = cp.settings
    retry_after = int(r.headers["Retry-After"])
    assert 0 < retry_after <= settings.token_ttl_seconds + settings.hold_grace_seconds + 1
    # changed nothing: no hold, no session, no stash
    assert (credits_of(fresh), counts(cp, company_id), _stashes(cp, company_id)) == before

    # Another company is not blocked.
    _init(_member(cp)[0])
    # A stream that starts frees its place...
    _start_stream(cp, inits[0])
    _init(fresh)
    error_of(fresh.post("/v1/chat/init", json={"query": "hi"}), 429, "too_many_pending_inits")
    # ...so does a hold that ends (here: settled by its usage webhook).
    event = usage_event(inits[1], company_id, status="failed", output_tokens=0, content=None)
    assert data_of(cp.webhook(event))["settled"] is True
    _init(fresh)
    error_of(fresh.post("/v1/chat/init", json={"query": "hi"}), 429, "too_many_pending_inits")


def test_the_edge_and_the_control_plane_agree_on_the_used_key() -> None:
    from control_plane import pending_inits

    assert pending_inits.used_key("co", "abc") == grants.used_key("co", "abc")


def _settle(cp: CP, init: dict[str, Any], company_id: str, reply: str) -> dict[str, Any]:
    return dict(data_of(cp.webhook(usage_event(init, company_id, content=reply))))


def test_a_session_keeps_at_most_its_caps(cp: CP) -> None:
    client, company_id = _member(cp)
    # Messages: 2 + (1 question + 1 reply) * 2 = 6, the cap.
    first = _init(client, messages=[{"role": "user", "content": "a"}] * 2)
    session_id = first["session_id"]
    _settle(cp, first, company_id, "reply")  # (a webhook also frees the pending place)
    second = _init(client, query="b", session_id=session_id)
    _settle(cp, second, company_id, "reply")
    third = _init(client, query="c", session_id=session_id)
    before, rows = credits_of(client), counts(cp, company_id)
    r = client.post("/v1/chat/init", json={"query": "d", "session_id": session_id})
    error_of(r, 413, "session_full")
    assert credits_of(client) == before and counts(cp, company_id) == rows
    # The reply to a full session is charged; only its transcript is not kept.
    settled = _settle(cp, third, company_id, "one reply too many")
    assert settled["settled"] is True and settled["charged"] != "0.000000"
    messages = data_of(client.get(f"/v1/sessions/{session_id}"))["messages"]
    assert len(messages) == 6 and messages[-1]["content"] == "c"

    # Bytes: 2,500 + 1,900 fit in 6,000; 1,700 more do not.
    init = _init(client, messages=[{"role": "user", "content": "x" * 2500}])
    _settle(cp, init, company_id, "")
    more = _init(client, query="y" * 1900, session_id=init["session_id"])
    _settle(cp, more, company_id, "")
    r = client.post("/v1/chat/init", json={"query": "z" * 1700, "session_id": init["session_id"]})
    error_of(r, 413, "session_full")


def _tool_turn(prefix: str, calls: int, result: str) -> list[dict[str, Any]]:
    """An assistant's `calls` tool calls, with ids of the longest allowed (256
    characters), and a `tool` message answering each with `result`."""
    ids = [f"{prefix}{i}".ljust(MAX_ID_CHARS, "i") for i in range(calls)]
    asked = [{"id": i, "type": "function", "function": {"name": "f", "arguments": ""}} for i in ids]
    answers = [{"role": "tool", "tool_call_id": i, "content": result} for i in ids]
    return [{"role": "assistant", "content": None, "tool_calls": asked}, *answers]


def _counted_and_stored(cp: CP, session_id: str) -> tuple[int, int]:
    """The session's byte counter, and every byte its message rows hold (each field
    as stored: the tool calls as their JSON)."""

    def read(session: Any) -> tuple[int, int]:
        chat = session.get(ChatSession, session_id)
        rows = session.scalars(select(ChatMessage).where(col(ChatMessage.session_id) == session_id))
        stored = sum(
            len(m.role.encode()) + len(m.content.encode()) + len((m.tool_call_id or "").encode())
            + (len(orjson.dumps(m.tool_calls)) if m.tool_calls else 0)
            for m in rows
        )  # fmt: skip
        return int(chat.content_bytes), stored

    return cp.on_loop(lambda: cp.app.state.db.transaction(read))  # type: ignore[no-any-return]


def test_every_stored_byte_of_a_message_counts_against_the_session_cap(cp: CP) -> None:
    """Attack: a member fills its sessions with `tool` messages whose call ids are the
    longest allowed (256 characters): the id was not counted (nor the role), so a
    session of 1,000 messages stored ~256 KB past its 1 MB cap. Measured here with a
    6,000-byte cap: 5 tool calls answered with 800 bytes each were counted 5,616
    bytes and stored (201) while their rows held 6,925."""
    client, company_id = _member(cp)
    small = _init(client, messages=_tool_turn("s", 2, "ok"), max_tokens=16)
    counted, stored = _counted_and_stored(cp, small["session_id"])
    assert counted == stored, (counted, stored)

    before, rows = credits_of(client), counts(cp, company_id)
    r = client.post(
        "/v1/chat/init", json={"messages": _tool_turn("b", 5, "c" * 800), "max_tokens": 16}
    )
    error_of(r, 413, "session_full")
    assert credits_of(client) == before and counts(cp, company_id) == rows


def test_one_stashed_request_is_capped(cp: CP) -> None:
    client, company_id = _member(cp)
    before, rows = credits_of(client), counts(cp, company_id)
    body = {"messages": [{"role": "user", "content": "y" * 3000}] * 3}  # 9 KB > 8 KB
    error_of(client.post("/v1/chat/init", json=body), 413, "request_too_large")
    assert credits_of(client) == before and counts(cp, company_id) == rows
    # A refused init is not a pending one.
    for _ in range(PENDING):
        _init(client)


def test_session_messages_come_a_page_at_a_time(cp: CP) -> None:
    client, _ = _member(cp)
    init = _init(client, messages=[{"role": "user", "content": f"m{i}"} for i in range(5)])
    path = f"/v1/sessions/{init['session_id']}"
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = data_of(client.get(path, params=params))
        seen += [m["content"] for m in page["messages"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [f"m{i}" for i in range(5)] and pages == 3
    whole = data_of(client.get(path))  # default limit 50
    assert [m["content"] for m in whole["messages"]] == seen and whole["next_cursor"] is None
    error_of(client.get(path, params={"limit": 201}), 422, "validation_error")
    error_of(client.get(path, params={"cursor": "bm9wZQ"}), 422, "validation_error")


def test_an_owners_listing_reads_its_company_index(cp: CP) -> None:
    """One big company must not slow another owner's `GET /v1/sessions`: the plan for
    the owner's query walks `ix_chat_sessions_company_updated`, not the whole table."""
    big_company = cp.company("1")
    big_user = cp.user(big_company, role="member", password=None)["id"]
    owner_client, owner_company = cp.owner_client("10")
    _init(owner_client)

    def fill_and_explain(session: Any) -> str:
        session.execute(
            text(
                "INSERT INTO chat_sessions (id, company_id, user_id, title, created_at,"
                " updated_at)"
                " SELECT md5(g::text), :c, :u, 't', now(), now() - g * interval '1 second'"
                " FROM generate_series(1, 30000) g"
            ),
            {"c": big_company, "u": big_user},
        )
        session.execute(text("ANALYZE chat_sessions"))
        plan = session.execute(
            text(
                "EXPLAIN SELECT * FROM chat_sessions WHERE company_id = :c"
                " ORDER BY updated_at DESC, id DESC LIMIT 51"
            ),
            {"c": owner_company},
        )
        return "\n".join(row[0] for row in plan)

    plan = cp.on_loop(lambda: cp.app.state.db.transaction(fill_and_explain))
    assert "ix_chat_sessions_company_updated" in plan, plan
    assert len(data_of(owner_client.get("/v1/sessions"))["items"]) == 1


# --- turns given back whole -------------------------------------------------------
def _held_turns(cp: CP, session_id: str) -> tuple[int, int, list[str]] | None:
    """A session's counters and its messages' contents as stored; None once gone."""

    def read(session: Any) -> tuple[int, int, list[str]] | None:
        chat = session.get(ChatSession, session_id)
        rows = session.scalars(
            select(ChatMessage)
            .where(col(ChatMessage.session_id) == session_id)
            .order_by(col(ChatMessage.seq))
        )
        contents = [m.content for m in rows]
        if chat is None:
            assert contents == [], contents  # no orphan message
            return None
        return int(chat.message_count), int(chat.content_bytes), contents

    return cp.on_loop(lambda: cp.app.state.db.transaction(read))  # type: ignore[no-any-return]


def _sweep_expired(cp: CP) -> None:
    state = cp.app.state
    later = utcnow() + timedelta(days=1)  # past every hold's deadline
    cp.on_loop(lambda: sweep_expired_holds(state.db, state.store, state.metrics, now=later))


def test_an_abandoned_inits_turn_goes_with_its_released_hold(cp: CP) -> None:
    """Attack: a member inits and never streams, again and again. The hold was
    released at its deadline (nothing billed) but the session the init created, and
    the turn it appended to one, stayed for good: within the pending-init caps one
    company kept 2,000 such turns every 22 minutes (131,000 a day), each up to the
    model's context or the session's 1 MiB cap (measured: after the sweeper's
    release, 5 of 5 sessions and their messages still there). Now a hold released
    whole takes its turn out of its session, and a session left empty goes."""
    client, company_id = _member(cp)
    lone = _init(client, messages=[{"role": "user", "content": "q" * 500}])
    answered = _init(client, query="kept")
    _settle(cp, answered, company_id, "an answer")
    unanswered = _init(client, query="never streamed", session_id=answered["session_id"])
    # A colleague (the pending-init cap is per user) abandons both turns of a session.
    colleague = cp.client(cp.api_key(cp.user(company_id, role="member", password=None)["id"]))
    twice = _init(colleague, query="first")
    again = _init(colleague, query="second", session_id=twice["session_id"])
    assert {unanswered["session_id"], again["session_id"]} == {
        answered["session_id"],
        twice["session_id"],
    }
    _sweep_expired(cp)

    assert _held_turns(cp, lone["session_id"]) is None
    error_of(client.get(f"/v1/sessions/{lone['session_id']}"), 404, "session_not_found")
    assert _held_turns(cp, twice["session_id"]) is None
    assert data_of(colleague.get("/v1/sessions"))["items"] == []
    kept = _held_turns(cp, answered["session_id"])
    assert kept is not None and kept[2] == ["kept", "an answer"], kept
    expected = len("user" + "kept" + "assistant" + "an answer")  # ASCII: a byte a character
    assert kept[:2] == (2, expected), kept
    listed = {s["id"] for s in data_of(client.get("/v1/sessions"))["items"]}
    assert listed == {answered["session_id"]}


def test_an_init_refused_after_its_hold_stores_no_turn(pg_server: str) -> None:
    """Attack: a member sends inits whose token estimate alone passes its tokens per
    minute: each took its hold, was refused 429 ``tpm_exceeded`` and released it, but
    its new session (up to the model's context of text) stayed, at the init rate
    (1,200 a minute per company) and with nothing held for long or billed (measured:
    5 refused inits of 18 KB each left 5 sessions holding 90,000 bytes); the turn
    of an existing session stayed in it too, there twice once retried. Now the
    refusal takes its turn back with its hold: it changed nothing."""
    env = {**LIMITS, "LLMGW_TPM_PER_USER": "1200"}
    with pg_settings(pg_server, env) as settings, serve_cp(settings) as tpm_cp:
        client, company_id = _member(tpm_cp)
        small = _init(client, query="hi", max_tokens=16)
        before = _held_turns(tpm_cp, small["session_id"])
        sessions = counts(tpm_cp, company_id)[0]
        over = {"messages": [{"role": "user", "content": "w " * 400}], "max_tokens": 1024}
        for _ in range(3):
            error_of(client.post("/v1/chat/init", json=over), 429, "tpm_exceeded")
        r = client.post(
            "/v1/chat/init",
            json={"query": "w " * 400, "max_tokens": 1024, "session_id": small["session_id"]},
        )
        error_of(r, 429, "tpm_exceeded")
        assert counts(tpm_cp, company_id)[0] == sessions
        assert _held_turns(tpm_cp, small["session_id"]) == before


def test_an_owner_cannot_add_members_without_end(cp: CP, monkeypatch: pytest.MonkeyPatch) -> None:
    """Attack: an owner's script creates members in a loop (no password: no hash to
    wait for). Nothing bounded it (measured through the control plane on
    PostgreSQL: 130 to 190 users a second from one client, each a user row and an
    audit row, ~1.2 KB: 11 to 16 million rows, ~15 GB, a day from one loop), and
    each one may then create its own keys, sessions and pending inits. Now a
    company holds at most `accounts.USERS_PER_COMPANY_MAX` users its owners created
    (409 naming the limit, nothing written); the platform admin is not bound by it."""
    from control_plane import accounts

    monkeypatch.setattr(accounts, "USERS_PER_COMPANY_MAX", 4)
    owner, company_id = cp.owner_client("1")  # the owner is the first user

    def add(client: httpx.Client) -> httpx.Response:
        body = {"company_id": company_id, "email": f"m-{uuid.uuid4().hex}@x.io"}
        return client.post("/v1/admin/users", json={**body, "role": "member"})

    for _ in range(3):
        data_of(add(owner), 201)

    def rows(session: Any) -> tuple[int, int]:
        users = session.execute(
            text("SELECT count(*) FROM users WHERE company_id = :c"), {"c": company_id}
        ).scalar()
        audits = session.execute(
            text("SELECT count(*) FROM audit_events WHERE company_id = :c"), {"c": company_id}
        ).scalar()
        return int(users), int(audits)

    before = cp.on_loop(lambda: cp.app.state.db.transaction(rows))
    assert before[0] == 4
    message = error_of(add(owner), 409, "conflict")
    assert "4 users" in message, message
    assert cp.on_loop(lambda: cp.app.state.db.transaction(rows)) == before
    data_of(add(cp.admin), 201)  # the platform admin may
    other, other_company = cp.owner_client("1")  # another company is not blocked
    body = {"company_id": other_company, "email": f"o-{uuid.uuid4().hex}@x.io"}
    data_of(other.post("/v1/admin/users", json=body), 201)


# --- the store primitive, on both backends --------------------------------------------
@pytest.fixture(params=["memory", "redis"])
def store(request: pytest.FixtureRequest) -> Iterator[Store]:
    if request.param == "memory":
        yield MemoryStore()
        return
    with fresh_redis_prefix() as prefix:
        yield RedisStore.from_url(REDIS_URL, prefix=prefix)


async def test_bounded_set_limits_expires_and_drops(store: Store) -> None:
    key = f"pending:init:{uuid.uuid4().hex}"
    now = 1_000_000.0
    assert await store.bounded_add(key, "a", now + 10, now, 2, []) is None
    assert await store.bounded_add(key, "b", now + 20, now, 2, []) is None
    full = await store.bounded_add(key, "c", now + 30, now, 2, [])
    assert full == pytest.approx(now + 10, abs=1)
    assert await store.bounded_add(key, "a", now + 10, now, 2, []) is None  # already in
    assert sorted(await store.bounded_members(key)) == ["a", "b"]
    assert await store.bounded_add(key, "c", now + 30, now, 2, ["a"]) is None  # a started
    # A caller whose clock reads 25 s later does not expire b: the store's clock does.
    assert await store.bounded_add(key, "d", now + 40, now + 25, 2, []) is not None
    assert await store.bounded_add(key, "d", now + 40, now + 25, 2, ["b"]) is None
    assert sorted(await store.bounded_members(key)) == ["c", "d"]
    await store.bounded_remove([key], "c")
    assert await store.bounded_members(key) == ["d"]
    await store.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_migration_0004_counts_what_existing_sessions_hold(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    url = (
        f"sqlite:///{tmp_path}/m.db"
        if backend == "sqlite"
        else request.getfixturevalue("pg_database_url")
    )
    upgrade(url, "0003")
    engine = create_sync_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO companies (id, name, created_at)"
                    " VALUES ('c', 'c', CURRENT_TIMESTAMP)"
                )
            )
            conn.execute(
                text(
                    "INSERT INTO users (id, company_id, email, role, created_at)"
                    " VALUES ('u', 'c', 'u@x.io', 'member', CURRENT_TIMESTAMP)"
                )
            )
            for chat in ("s1", "s2"):
                conn.execute(
                    text(
                        "INSERT INTO chat_sessions (id, company_id, user_id, title,"
                        " created_at, updated_at)"
                        " VALUES (:s, 'c', 'u', 't', CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"
                    ),
                    {"s": chat},
                )
            for seq, content in enumerate(["héllo", "wörld!"], start=1):  # 6 + 7 bytes
                conn.execute(
                    text(
                        "INSERT INTO chat_messages (id, session_id, role, content, created_at,"
                        " seq) VALUES (:i, 's1', 'user', :c, CURRENT_TIMESTAMP, :q)"
                    ),
                    {"i": f"m{seq}", "c": content, "q": seq},
                )
        upgrade(url)
        with engine.connect() as conn:
            rows = conn.execute(
                text("SELECT id, message_count, content_bytes FROM chat_sessions ORDER BY id")
            )
            assert [tuple(r) for r in rows] == [("s1", 2, 13), ("s2", 0, 0)]
    finally:
        engine.dispose()


def test_the_limits_are_settings_with_safe_defaults() -> None:
    from cryptography.fernet import Fernet

    from control_plane.settings import ControlPlaneSettings
    from shared.settings import ConfigError
    from tests.conftest import new_webhook_secret

    base = {
        "LLMGW_WEBHOOK_SECRET": new_webhook_secret(),
        "LLMGW_ENCRYPTION_KEY": Fernet.generate_key().decode(),
    }
    defaults = ControlPlaneSettings.from_env(base)
    assert (
        defaults.max_pending_inits_per_user,
        defaults.max_pending_inits_per_company,
        defaults.max_session_messages,
        defaults.max_session_bytes,
        defaults.max_request_bytes,
    ) == (20, 2000, 1000, 1024 * 1024, 2 * 1024 * 1024)
    for name in (
        "LLMGW_MAX_PENDING_INITS_PER_USER",
        "LLMGW_MAX_PENDING_INITS_PER_COMPANY",
        "LLMGW_MAX_SESSION_MESSAGES",
        "LLMGW_MAX_SESSION_BYTES",
        "LLMGW_MAX_REQUEST_BYTES",
    ):
        with pytest.raises(ConfigError, match=name):
            ControlPlaneSettings.from_env({**base, name: "0"})


def test_the_company_cap_follows_a_raised_user_cap_unless_set() -> None:
    """An operator (or a harness) that raised the per-user cap for many unstarted inits
    meets no company cap it never set; one it sets is kept as set."""
    from cryptography.fernet import Fernet

    from control_plane.settings import ControlPlaneSettings
    from tests.conftest import new_webhook_secret

    base = {
        "LLMGW_WEBHOOK_SECRET": new_webhook_secret(),
        "LLMGW_ENCRYPTION_KEY": Fernet.generate_key().decode(),
    }
    read = ControlPlaneSettings.from_env
    raised = read({**base, "LLMGW_MAX_PENDING_INITS_PER_USER": "50"})
    assert raised.max_pending_inits_per_company == 5000
    huge = read({**base, "LLMGW_MAX_PENDING_INITS_PER_USER": "1000000"})
    assert huge.max_pending_inits_per_company == 10_000_000
    both = {"LLMGW_MAX_PENDING_INITS_PER_USER": "50", "LLMGW_MAX_PENDING_INITS_PER_COMPANY": "70"}
    assert read({**base, **both}).max_pending_inits_per_company == 70
