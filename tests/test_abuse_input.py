"""Hostile input to the control plane (issue 12.3, 12.5): NUL characters anywhere
are 400 `invalid_characters` and change nothing; a NUL in a model's reply still
settles (charge first, transcript best effort); amounts and prices that would
overflow decimal arithmetic are a 4xx. One control plane on PostgreSQL + Redis on a
real socket for the whole module (PostgreSQL is what refuses NUL)."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select, update
from sqlmodel import col

from control_plane import chat_sessions
from control_plane.tables import ChatSession, Reservation, User
from shared.decimals import parse_decimal
from shared.logs import JsonFormatter
from shared.pricing import MICRO, cost_micro, parse_credits
from tests.test_control_plane import (
    CP,
    PASSWORD,
    credits_of,
    data_of,
    error_of,
    micro,
    pg_settings,
    serve_cp,
    usage_event,
)


@pytest.fixture(scope="module")
def cp(pg_server: str) -> Iterator[CP]:
    with pg_settings(pg_server) as settings, serve_cp(settings) as handle:
        yield handle


def counts(cp: CP, company_id: str) -> tuple[int, int]:
    """(chat sessions, reservations) of a company."""

    def read(session: Any) -> tuple[int, int]:
        chats = session.scalar(
            select(func.count()).where(col(ChatSession.company_id) == company_id)
        )
        holds = session.scalar(
            select(func.count()).where(col(Reservation.company_id) == company_id)
        )
        return int(chats), int(holds)

    return cp.on_loop(lambda: cp.app.state.db.transaction(read))  # type: ignore[no-any-return]


# --- 12.3: NUL in input ------------------------------------------------------------
def test_nul_in_any_input_is_400_and_changes_nothing(cp: CP) -> None:
    company_id = cp.company("10")
    user = cp.user(company_id, role="owner")
    client = cp.client(cp.api_key(user["id"]))
    session_id = data_of(client.post("/v1/chat/init", json={"query": "hi"}), 201)["session_id"]
    before_credits, before_rows = credits_of(client), counts(cp, company_id)

    nul = "a\u0000b"
    bodies: list[tuple[httpx.Client, str, dict[str, Any]]] = [
        (cp.client(), "/v1/auth/login", {"email": user["email"] + "\u0000", "password": PASSWORD}),
        (cp.client(), "/v1/auth/login", {"email": user["email"], "password": nul}),
        (cp.admin, "/v1/admin/companies", {"name": nul, "credits": "1"}),
        (cp.admin, "/v1/admin/users", {"company_id": company_id, "email": f"{nul}@x.io"}),
        (cp.admin, f"/v1/admin/companies/{company_id}/credits", {"amount": "1", "reason": nul}),
        (client, "/v1/chat/init", {"query": nul}),
        (client, "/v1/chat/init", {"messages": [{"role": "user", "content": nul}]}),
        (client, "/v1/chat/init", {"query": "hi", "session_id": session_id + "\u0000"}),
        (client, "/v1/chat/init", {"query": "hi", "model": nul}),
        (client, "/v1/chat/init", {"query": "hi", "stop": [nul]}),
        (client, "/v1/chat/init", {nul: 1, "query": "hi"}),
    ]
    for who, path, body in bodies:
        error_of(who.post(path, json=body), 400, "invalid_characters")
    # Path parameters and query values reach SQL too.
    error_of(client.get(f"/v1/sessions/{session_id}%00"), 400, "invalid_characters")
    error_of(client.delete(f"/v1/sessions/{session_id}%00"), 400, "invalid_characters")
    error_of(client.get("/v1/models", params={"provider": nul}), 400, "invalid_characters")
    error_of(cp.admin.get("/v1/admin/api-keys", params={"user_id": nul}), 400, "invalid_characters")

    assert credits_of(client) == before_credits
    assert counts(cp, company_id) == before_rows
    # An escaped backslash followed by "u0000" is text, not NUL: accepted.
    assert data_of(client.post("/v1/chat/init", json={"query": "\\u0000"}), 201)


def _settle_with_reply(cp: CP, reply: str) -> tuple[httpx.Client, dict[str, Any], int, Any]:
    client, company_id = cp.owner_client("10")
    init = data_of(client.post("/v1/chat/init", json={"query": "hello", "max_tokens": 200}), 201)
    event = usage_event(init, company_id, input_tokens=12, output_tokens=64, content=reply)
    cost = cost_micro(12, 64, cp.settings.catalog.models[init["model"]].price)
    return client, init, cost, cp.webhook(event)


def test_a_nul_in_the_model_reply_is_charged_and_stored_safely(cp: CP) -> None:
    client, init, cost, answer = _settle_with_reply(cp, "before\u0000after")
    assert data_of(answer)["settled"] is True
    credits = credits_of(client)
    assert credits["held"] == "0.000000" and micro(credits["balance"]) == 10 * MICRO - cost
    messages = data_of(client.get(f"/v1/sessions/{init['session_id']}"))["messages"]
    assert messages[-1] == {**messages[-1], "role": "assistant", "content": "before\ufffdafter"}


def test_a_nul_in_a_webhook_identifier_is_400_not_500(cp: CP) -> None:
    client, company_id = cp.owner_client("10")
    init = data_of(client.post("/v1/chat/init", json={"query": "hello"}), 201)
    for field in ("jti", "reservation_id", "session_id", "request_id", "model"):
        event = usage_event(init, company_id, **{field: "x\u0000y"})
        error_of(cp.webhook(event, webhook_id=f"usage_{field}"), 400, "invalid_characters")
    assert credits_of(client)["held"] == init["reserved_credits"]  # nothing settled


def test_a_failing_transcript_write_never_undoes_the_charge(
    cp: CP, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Let the NUL through to PostgreSQL, which refuses it: a real failed write.
    monkeypatch.setattr(chat_sessions, "without_nul", lambda text: text)
    client, init, cost, answer = _settle_with_reply(cp, "before\u0000after")
    assert data_of(answer)["settled"] is True
    credits = credits_of(client)
    assert credits["held"] == "0.000000" and micro(credits["balance"]) == 10 * MICRO - cost
    messages = data_of(client.get(f"/v1/sessions/{init['session_id']}"))["messages"]
    assert [m["role"] for m in messages] == ["user"]  # the reply alone was lost
    (item,) = data_of(client.get("/v1/usage"))["items"]
    assert item["cost"] == answer.json()["data"]["charged"]


def test_a_failed_transcript_write_keeps_the_answer_out_of_the_log(
    cp: CP, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A failed statement's error printed its parameters (here the model's answer;
    elsewhere prompts and password hashes) into the traceback the control plane logs,
    and so into the operator's log pipeline (review 8)."""
    monkeypatch.setattr(chat_sessions, "without_nul", lambda text: text)
    answer_text = uuid.uuid4().hex  # SQLAlchemy prints a long value's first ~20 characters
    caplog.set_level(logging.WARNING)
    _, _, _, answer = _settle_with_reply(cp, f"{answer_text}\u0000")
    assert data_of(answer)["settled"] is True
    failed = [r for r in caplog.records if r.exc_info and "transcript" in r.getMessage()]
    assert failed, "the failed write was logged"
    lines = [JsonFormatter().format(record) for record in caplog.records]
    assert not [line for line in lines if answer_text[:16] in line]


# --- 12.5: amounts and prices that overflow decimal arithmetic ----------------------
HOSTILE_AMOUNTS = [
    "1e999999999",
    "-1e999999999",
    "1e-999999999",
    "9" * 5000,
    "1E+1000000",
    "1e13",
    10**40,
    "NaN",
    "Infinity",
    "0.0000001",
    1.5,
]


def test_hostile_credit_amounts_are_422_and_change_nothing(cp: CP) -> None:
    company_id = cp.company("10")
    owner = cp.client(cp.api_key(cp.user(company_id)["id"]))
    before = credits_of(owner)
    for amount in HOSTILE_AMOUNTS:
        r = cp.admin.post(
            f"/v1/admin/companies/{company_id}/credits",
            json={"amount": amount, "reason": "x"},
            headers={"Idempotency-Key": uuid.uuid4().hex},
        )
        error_of(r, 422, "validation_error")
        r = cp.admin.post("/v1/admin/companies", json={"name": "big", "credits": amount})
        error_of(r, 422, "validation_error")
    assert credits_of(owner) == before


def test_hostile_prices_in_model_overrides_are_422(cp: CP) -> None:
    company_id = cp.company("10")
    for price in ["1e999999999", "-1", "1e-999999999", "1e10", 10**40]:
        body = {
            "api_key": "sk-test-0123456789",
            "models": {
                "mine": {
                    "upstream_model": "m",
                    "context_length": 8192,
                    "max_output_tokens": 1024,
                    "price": {"input_per_mtok": price, "output_per_mtok": "1"},
                }
            },
        }
        r = cp.admin.put(f"/v1/admin/companies/{company_id}/providers/mock", json=body)
        error_of(r, 422, "validation_error")


@pytest.mark.parametrize(
    ("value", "expected"),
    [("10.5", 10_500_000), (7, 7_000_000), (" 0.000001 ", 1), ("-2", -2_000_000), ("0e99999", 0)],
)
def test_parse_credits_accepts_ordinary_amounts(value: Any, expected: int) -> None:
    assert parse_credits(value) == expected


@pytest.mark.parametrize("value", HOSTILE_AMOUNTS)
def test_parse_credits_refuses_with_value_error_only(value: Any) -> None:
    with pytest.raises(ValueError, match=r"^amount "):
        parse_credits(value)


def test_parse_decimal_bounds_before_any_arithmetic() -> None:
    bound = Decimal(10**9)
    assert parse_decimal("0.15", max_abs=bound, max_places=12, negative=False) == Decimal("0.15")
    for bad in ["1e999999999", "-0.5", "1e-999999999"]:
        with pytest.raises(ValueError):
            parse_decimal(bad, max_abs=bound, max_places=12, negative=False)


def test_grants_past_the_largest_balance_are_409_not_a_bigint_overflow(cp: CP) -> None:
    company_id = cp.company("0")
    owner = cp.client(cp.api_key(cp.user(company_id)["id"]))
    path = f"/v1/admin/companies/{company_id}/credits"
    biggest = "1000000000000"  # the largest single amount
    statuses = [cp.admin.post(path, json={"amount": biggest}).status_code for _ in range(10)]
    assert statuses == [201] + [409] * 9, statuses
    adjustments = f"/v1/admin/companies/{company_id}/adjustments"
    r = cp.admin.post(adjustments, json={"amount": "1", "reason": "x"})
    error_of(r, 409, "balance_limit_exceeded")
    error_of(cp.admin.post(path, json={"amount": "1"}), 409, "balance_limit_exceeded")
    assert credits_of(owner)["balance"] == "1000000000000.000000"


def test_model_ids_with_control_characters_are_422(cp: CP) -> None:
    """A company's model id reaches the edge's log lines (`model=`) and the operator's
    terminal: an ESC sequence in it is refused, as whitespace is."""
    company_id = cp.company("10")
    spec = {
        "upstream_model": "m",
        "context_length": 8192,
        "max_output_tokens": 1024,
        "price": {"input_per_mtok": "1", "output_per_mtok": "1"},
    }
    for model_id in ["mine\x1b[2K", "mine\x7f", "mine\x9b31m"]:
        body = {"api_key": "sk-test-0123456789", "models": {model_id: spec}}
        r = cp.admin.put(f"/v1/admin/companies/{company_id}/providers/mock", json=body)
        error_of(r, 422, "validation_error")
    ok = {"api_key": "sk-test-0123456789", "models": {"mine-é.v2": spec}}
    assert (
        cp.admin.put(f"/v1/admin/companies/{company_id}/providers/mock", json=ok).status_code == 200
    )


# --- identity strings: one address, one spelling ------------------------------------
def _users_of(cp: CP, company_id: str) -> list[dict[str, Any]]:
    r = cp.admin.get("/v1/admin/users", params={"company_id": company_id, "limit": 200})
    return list(data_of(r)["items"])


def _new_user(cp: CP, company_id: str, email: str) -> httpx.Response:
    body = {"company_id": company_id, "email": email, "password": PASSWORD}
    return cp.admin.post("/v1/admin/users", json=body)


def test_an_email_longer_once_lowercased_is_422_not_500(cp: CP) -> None:
    """ "İ" lowercases to two characters: 300 of them passed the 320-character check
    and then overflowed the column (a 500 from PostgreSQL)."""
    company_id = cp.company("10")
    for email in ["\u0130" * 300 + "@example.com", "a" * 310 + "@example.com"]:
        error_of(_new_user(cp, company_id, email), 422, "validation_error")
    assert _users_of(cp, company_id) == []


def test_one_address_spelled_differently_is_one_account(cp: CP) -> None:
    """Canonically equivalent or compatibility spellings of one address (NFC and NFD
    "é", fullwidth letters, a fullwidth "@") were each a new account beside the first,
    shown with the same address; bidi overrides and invisible characters made an
    address show as another."""
    company_id = cp.company("10")
    local = f"jos\u00e9-{uuid.uuid4().hex[:8]}"
    email = f"{local}@example.com"
    created = data_of(_new_user(cp, company_id, email), 201)
    assert created["email"] == email
    fullwidth = "".join(chr(ord(c) + 0xFEE0) if "a" <= c <= "z" else c for c in local)
    for spelling in [
        email.replace("\u00e9", "e\u0301"),  # NFD
        f"{fullwidth}@example.com",
        f"{local}\uff20example.com",  # fullwidth commercial at
        email.upper(),
    ]:
        error_of(_new_user(cp, company_id, spelling), 409, "conflict")
        r = cp.client().post("/v1/auth/login", json={"email": spelling, "password": PASSWORD})
        token = data_of(r)["access_token"]
        assert data_of(cp.client(token).get("/v1/me"))["user"]["id"] == created["id"]
    for spoof in [
        f"\u202e{local}@example.com",  # right-to-left override
        f"{local}\u200b@example.com",  # zero-width space
        f"{local}@example.com\u2060",  # word joiner
        f"{local}@exam\u00adple.com",  # soft hyphen
    ]:
        error_of(_new_user(cp, company_id, spoof), 422, "validation_error")
    assert [u["id"] for u in _users_of(cp, company_id)] == [created["id"]]


def test_an_address_stored_before_spellings_were_one_still_signs_in(cp: CP) -> None:
    """A row written when only case was folded may hold a non-canonical spelling (NFD
    here): its user still signs in with it, and nobody else can take it."""
    company_id = cp.company("10")
    canonical = f"jos\u00e9-{uuid.uuid4().hex[:8]}@example.com"
    legacy = canonical.replace("\u00e9", "e\u0301")
    user_id = data_of(_new_user(cp, company_id, canonical), 201)["id"]

    def store_as_before(session: Any) -> None:
        session.execute(update(User).where(col(User.id) == user_id).values(email=legacy))

    cp.on_loop(lambda: cp.app.state.db.transaction(store_as_before))
    r = cp.client().post("/v1/auth/login", json={"email": legacy, "password": PASSWORD})
    token = data_of(r)["access_token"]
    assert data_of(cp.client(token).get("/v1/me"))["user"]["id"] == user_id
