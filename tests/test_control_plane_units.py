"""Pure parts of the control plane, tested with tables of cases (no I/O)."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest

from control_plane.accounts import key_scopes
from control_plane.chat_init import check_features, fit_history, plan_hold, resolve_model
from control_plane.chat_request import parse_init_request
from control_plane.db import engine_url
from control_plane.emails import canonical_email, normalise_email
from control_plane.errors import (
    BadRequest,
    Forbidden,
    InputTooLarge,
    ModelNotFound,
    ValidationFailed,
)
from control_plane.ledger import charge_for
from control_plane.pagination import decode_cursor, encode_cursor
from control_plane.policy import (
    SCOPE_ADMIN,
    Principal,
    can_admin_company,
    can_assign_role,
    can_chat,
    can_create_company,
    can_delete_session,
    can_grant_credits,
    can_read_session,
    scopes_for_role,
)
from control_plane.usage_events import parse_usage_event
from control_plane.validation import page_limit, parse_json_object
from shared.catalog import Catalog, ModelSpec, Price, Provider
from shared.pricing import estimate_input_tokens
from shared.request_id import choose_request_id
from shared.tokens import ALL_SCOPES, SCOPE_READ, SCOPE_SEND

PRICE = Price(input_per_mtok=Decimal("1.0"), output_per_mtok=Decimal("2.0"))
MODEL = ModelSpec(
    id="m",
    provider="p",
    upstream_model="m",
    context_length=100,
    max_output_tokens=50,
    price=PRICE,
)
OTHER = ModelSpec(
    id="other",
    provider="p",
    upstream_model="other",
    context_length=8192,
    max_output_tokens=1024,
    price=Price(Decimal("0.15"), Decimal("0.6")),
)
CATALOG = Catalog(
    default_model="m",
    providers={"p": Provider(name="p", api_type="openai_chat", base_url="http://x")},
    models={"m": MODEL, "other": OTHER},
)


# --- hold and charge arithmetic -------------------------------------------------


@pytest.mark.parametrize(
    ("messages", "max_tokens", "estimate", "hold"),
    [
        # "hi" + "user" = 6 bytes -> 2 tokens + 4 per message = 6; 6*1 + 50*2 = 106
        ([{"role": "user", "content": "hi"}], None, 6, 106),
        ([{"role": "user", "content": "hi"}], 10, 6, 26),
        # 3 bytes of "é"+"a" (2+1) + "user" 4 = 7 bytes -> 3 tokens + 4 = 7
        ([{"role": "user", "content": "éa"}], 1, 7, 9),
        (
            [{"role": "system", "content": "be brief"}, {"role": "user", "content": "x" * 30}],
            20,
            # "be brief"+"system" = 14 B -> 5 + 4 = 9;  30+4 = 34 B -> 12 + 4 = 16
            25,
            65,
        ),
    ],
)
def test_plan_hold(
    messages: list[dict[str, str]], max_tokens: int | None, estimate: int, hold: int
) -> None:
    plan = plan_hold(MODEL, messages, max_tokens)
    assert (plan.input_estimate, plan.hold_micro) == (estimate, hold)
    assert plan.max_tokens == (max_tokens or MODEL.max_output_tokens)


def test_plan_hold_uses_exact_decimal_prices() -> None:
    # 0.15 and 0.6 are not exact binary floats: 7*0.15 + 3*0.6 = 2.85 -> 3 micro-credits.
    plan = plan_hold(OTHER, [{"role": "user", "content": "hello"}], 3)
    assert plan.input_estimate == 7
    assert plan.hold_micro == 3


def test_plan_hold_rejects_max_tokens_over_the_model_limit() -> None:
    with pytest.raises(ValidationFailed, match="max_tokens"):
        plan_hold(MODEL, [{"role": "user", "content": "hi"}], 51)


def test_plan_hold_rejects_input_over_the_context() -> None:
    # 136 + 4 bytes -> 47 + 4 = 51 tokens; 51 + 50 > 100.
    with pytest.raises(InputTooLarge):
        plan_hold(MODEL, [{"role": "user", "content": "x" * 136}], 50)
    # 131 + 4 bytes -> 45 + 4 = 49 tokens; 49 + 50 = 99 fits.
    assert plan_hold(MODEL, [{"role": "user", "content": "x" * 131}], 50).input_estimate == 49


@pytest.mark.parametrize(
    ("status", "input_tokens", "output_tokens", "hold", "charge"),
    [
        ("completed", 10, 20, 1000, 50),
        ("completed", 10, 20, 30, 30),  # capped at the hold
        ("cancelled", 10, 5, 1000, 20),
        ("failed", 10, 0, 1000, 0),  # failed before the first token: free
        ("revoked", 10, 0, 1000, 0),
        ("failed", 10, 3, 1000, 16),  # failed mid-stream: input + output so far
        ("completed", 0, 0, 1000, 0),
    ],
)
def test_charge_for(
    status: str, input_tokens: int, output_tokens: int, hold: int, charge: int
) -> None:
    assert charge_for(status, input_tokens, output_tokens, PRICE, hold) == charge


def test_charge_rounds_up_once() -> None:
    price = Price(Decimal("0.1"), Decimal("0.1"))
    assert charge_for("completed", 1, 1, price, 100) == 1  # 0.2 -> 1
    assert charge_for("completed", 5, 5, price, 100) == 1  # exactly 1.0 -> 1


# --- init request validation ----------------------------------------------------


def test_parse_init_request_messages() -> None:
    req = parse_init_request(
        {
            "model": "m",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 5,
            "temperature": 0.5,
            "stop": "\n",
        }
    )
    assert req.messages == [{"role": "user", "content": "hi"}]
    assert req.query is None and req.max_tokens == 5
    assert req.params == {"temperature": 0.5, "stop": ["\n"]}


def test_parse_init_request_query() -> None:
    req = parse_init_request({"query": "hello", "session_id": "abc"})
    assert (req.query, req.session_id, req.messages) == ("hello", "abc", None)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "messages"),
        ({"query": "a", "messages": [{"role": "user", "content": "a"}]}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": "hi"}, "messages"),
        ({"messages": [{"role": "robot", "content": "a"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
        ({"messages": ["hi"]}, "messages[0]"),
        ({"query": ""}, "query"),
        ({"query": "x" * 2001}, "query"),
        ({"query": 5}, "query"),
        ({"query": "a", "max_tokens": 0}, "max_tokens"),
        ({"query": "a", "max_tokens": "10"}, "max_tokens"),
        ({"query": "a", "max_tokens": True}, "max_tokens"),
        ({"query": "a", "model": 5}, "model"),
        ({"query": "a", "temperature": 3}, "temperature"),
        ({"query": "a", "top_p": "x"}, "top_p"),
        ({"query": "a", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"query": "a", "session_id": ""}, "session_id"),
    ],
)
def test_parse_init_request_rejects(body: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationFailed) as info:
        parse_init_request(body)
    assert info.value.field == field
    assert info.value.message.startswith(field)


def test_query_of_2000_characters_is_allowed() -> None:
    assert parse_init_request({"query": "x" * 2000}).query == "x" * 2000


def test_resolve_model() -> None:
    assert resolve_model(CATALOG, "other", None) is OTHER
    assert resolve_model(CATALOG, None, "other") is OTHER
    assert resolve_model(CATALOG, None, "gone") is MODEL  # stale company default
    assert resolve_model(CATALOG, None, None) is MODEL
    with pytest.raises(ModelNotFound):
        resolve_model(CATALOG, "nope", None)


# --- webhook events -------------------------------------------------------------


def _event(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "jti": "j",
        "reservation_id": "r",
        "company_id": "c",
        "user_id": "u",
        "session_id": "s",
        "request_id": "q",
        "model": "m",
        "provider": "p",
        "status": "completed",
        "finish_reason": "stop",
        "input_tokens": 3,
        "output_tokens": 4,
        "usage_source": "upstream",
        "started_at": "2026-11-23T10:00:00Z",
        "first_token_at": None,
        "ended_at": "2026-11-23T10:00:03Z",
    }
    data.update(changes)
    return {"type": f"stream.{data['status']}", "timestamp": "2026-11-23T10:00:03Z", "data": data}


def test_parse_usage_event() -> None:
    event = parse_usage_event(_event(content="hello"))
    assert (event.jti, event.input_tokens, event.output_tokens) == ("j", 3, 4)
    assert event.content == "hello"


@pytest.mark.parametrize(
    ("doc", "field"),
    [
        ({"type": "stream.completed"}, "data"),
        (_event(status="exploded"), "data.status"),
        ({**_event(), "type": "stream.failed"}, "type"),
        (_event(usage_source="guess"), "data.usage_source"),
        (_event(input_tokens=-1), "data.input_tokens"),
        (_event(output_tokens=1.5), "data.output_tokens"),
        (_event(output_tokens=True), "data.output_tokens"),
        (_event(jti=""), "data.jti"),
        (_event(reservation_id=None), "data.reservation_id"),
        (_event(company_id=7), "data.company_id"),
        (_event(content=5), "data.content"),
    ],
)
def test_parse_usage_event_rejects(doc: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationFailed) as info:
        parse_usage_event(doc)
    assert info.value.field == field


# --- small validators -------------------------------------------------------------


@pytest.mark.parametrize(
    ("sent", "echoed"),
    [("abc-123_X.y", True), ("x" * 128, True), ("x" * 129, False), ("a b", False), ("", False)],
)
def test_choose_request_id(sent: str, echoed: bool) -> None:
    chosen = choose_request_id(sent)
    assert (chosen == sent) is echoed
    assert choose_request_id(None)


@pytest.mark.parametrize(("raw", "expected"), [(None, 50), ("", 50), ("1", 1), ("200", 200)])
def test_page_limit(raw: str | None, expected: int) -> None:
    assert page_limit(raw) == expected


@pytest.mark.parametrize("raw", ["0", "201", "-1", "ten", "1.5"])
def test_page_limit_rejects(raw: str) -> None:
    with pytest.raises(ValidationFailed, match="limit"):
        page_limit(raw)


def test_cursor_round_trip_and_garbage() -> None:
    moment = datetime(2026, 11, 23, 10, 0, 0, 123456, tzinfo=UTC)
    assert decode_cursor(encode_cursor(moment, "abc")) == (moment, "abc")
    assert decode_cursor(None) is None
    for junk in ("!!", "abc", "W10", "WyJ4IiwgMV0"):
        with pytest.raises(ValidationFailed, match="cursor"):
            decode_cursor(junk)


def test_parse_json_object() -> None:
    assert parse_json_object(b'{"a": 1}') == {"a": 1}
    with pytest.raises(BadRequest):
        parse_json_object(b"{nope")
    with pytest.raises(ValidationFailed):
        parse_json_object(b"[1]")


@pytest.mark.parametrize(
    ("raw", "ok"),
    [
        (" Ann@Example.COM ", "ann@example.com"),
        ("no-at", None),
        ("a@b", None),
        ("a b@c.d", None),
        ("Jose\u0301@Example.com", "jos\u00e9@example.com"),  # NFD: one spelling
        ("\uff2a\uff4f\uff53\u00e9\uff20x.io", "jos\u00e9@x.io"),  # fullwidth
        ("\u212aate@x.io", "kate@x.io"),  # the Kelvin sign
        ("a\u200b@b.c", None),  # invisible
        ("\u202ea@b.c", None),  # bidi override
        ("a@b.c\u00a0x", None),  # no-break space
        ("\u0130" * 300 + "@x.io", None),  # 605 characters once lowercased
    ],
)
def test_normalise_email(raw: str, ok: str | None) -> None:
    if ok is None:
        with pytest.raises(ValidationFailed, match="email"):
            normalise_email(raw)
    else:
        assert normalise_email(raw) == ok


def test_a_canonical_email_is_its_own_canonical_form() -> None:
    """Every character, canonical once, stays so: stored and typed spellings meet."""
    for code in range(0x110000):
        if not 0xD800 <= code <= 0xDFFF:
            once = canonical_email(f"{chr(code)}a@b.c{chr(code)}")
            assert canonical_email(once) == once, hex(code)


def test_key_scopes() -> None:
    every = scopes_for_role("admin")
    assert key_scopes(None, "member", every) == [SCOPE_SEND, SCOPE_READ]
    assert key_scopes([SCOPE_READ], "owner", every) == [SCOPE_READ]
    with pytest.raises(ValidationFailed, match="llm:chat:delete"):
        key_scopes(["llm:chat:delete"], "member", every)
    with pytest.raises(ValidationFailed):
        key_scopes([], "owner", every)
    # Capped at the creator's scopes: the default narrows, asking for more is refused.
    assert key_scopes(None, "owner", {SCOPE_SEND, SCOPE_ADMIN}) == [SCOPE_SEND, SCOPE_ADMIN]
    with pytest.raises(Forbidden, match="llm:chat:read"):
        key_scopes([SCOPE_SEND, SCOPE_READ], "owner", {SCOPE_SEND, SCOPE_ADMIN})
    with pytest.raises(Forbidden):
        key_scopes(None, "member", {SCOPE_ADMIN})


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("sqlite:///var/x.db", "sqlite:///var/x.db"),
        ("sqlite+aiosqlite:////tmp/x.db", "sqlite:////tmp/x.db"),
        ("postgresql://u@h:5432/d", "postgresql+psycopg://u@h:5432/d"),
        ("postgresql+psycopg://u:p%40ss@h/d", "postgresql+psycopg://u:p%40ss@h/d"),
    ],
)
def test_engine_url(url: str, expected: str) -> None:
    assert engine_url(url).render_as_string(hide_password=False) == expected


# --- policy -----------------------------------------------------------------------


def _p(
    role: str, company: str | None = "c1", scopes: tuple[str, ...] = (*ALL_SCOPES, SCOPE_ADMIN)
) -> Principal:
    user = None if company is None else "u1"
    return Principal(user_id=user, company_id=company, role=role, scopes=frozenset(scopes), via="t")


ADMIN_TOKEN = _p("admin", None)
MEMBER = _p("member", scopes=(SCOPE_SEND, SCOPE_READ))
OWNER = _p("owner")


def test_policy_table() -> None:
    assert can_chat(MEMBER) and can_chat(OWNER) and not can_chat(ADMIN_TOKEN)
    assert not can_chat(_p("member", scopes=(SCOPE_READ,)))
    assert can_create_company(ADMIN_TOKEN) and not can_create_company(OWNER)
    assert can_grant_credits(ADMIN_TOKEN, "c1") and not can_grant_credits(OWNER, "c1")
    assert can_admin_company(OWNER, "c1") and not can_admin_company(OWNER, "c2")
    assert not can_admin_company(_p("owner", scopes=ALL_SCOPES), "c1")  # no admin scope
    assert not can_admin_company(MEMBER, "c1") and can_admin_company(ADMIN_TOKEN, "c2")
    assert can_assign_role(OWNER, "owner") and not can_assign_role(OWNER, "admin")
    assert can_read_session(MEMBER, "u1", "c1", "member")
    assert not can_read_session(MEMBER, "u2", "c1", "member")
    assert can_read_session(OWNER, "u2", "c1", "member")
    assert not can_read_session(OWNER, "u2", "c2", "member")
    assert not can_delete_session(MEMBER, "u1", "c1", "member")
    assert can_delete_session(OWNER, "u2", "c1", "member")


# --- fitting the input, features --------------------------------------------------


def test_fit_history_drops_the_oldest_non_system_turns() -> None:
    system = {"role": "system", "content": "be brief"}
    old = [{"role": "user", "content": "x" * 60}, {"role": "assistant", "content": "y" * 60}]
    new = [{"role": "user", "content": "now"}]
    # MODEL: context 100; max_tokens 40 leaves 60 tokens of input.
    fitted = fit_history(MODEL, [system, *old], new, 40)
    assert fitted[0] == system and fitted[-1] == new[0]
    assert estimate_input_tokens(fitted) <= 60 and len(fitted) < 4
    # An answer whose question was dropped goes too.
    qa = [{"role": "user", "content": "q" * 150}, {"role": "assistant", "content": "a"}]
    assert fit_history(MODEL, [system, *qa], new, 40) == [system, *new]
    # Everything fits: nothing is dropped.
    assert fit_history(MODEL, [system], new, 10) == [system, *new]
    # Only the new turn is left when nothing else fits (plan_hold then decides).
    assert fit_history(MODEL, old, [{"role": "user", "content": "z" * 300}], 40)[-1]["content"]


def test_plan_hold_fits_the_default_output_budget_to_the_context() -> None:
    # 200 + 4 bytes -> 67 + 4 = 71 tokens: 29 of the 100 are left for the answer.
    plan = plan_hold(MODEL, [{"role": "user", "content": "x" * 200}], None)
    assert plan.max_tokens == MODEL.context_length - plan.input_estimate < MODEL.max_output_tokens
    with pytest.raises(InputTooLarge):
        plan_hold(MODEL, [{"role": "user", "content": "x" * 400}], None)


def test_check_features() -> None:
    from control_plane.errors import UnsupportedFeature

    check_features(OTHER, ())
    check_features(OTHER, tuple(OTHER.features))
    with pytest.raises(UnsupportedFeature, match="teleport"):
        check_features(OTHER, ("streaming", "teleport"))


def test_parse_init_request_features_and_tools() -> None:
    tools = [{"type": "function", "function": {"name": "f"}}]
    req = parse_init_request({"query": "x", "tools": tools, "features": ["vision"]})
    assert req.features == ("vision", "tools") and req.params["tools"] == tools
    for bad in ({"tools": []}, {"tools": ["x"]}, {"features": "tools"}, {"features": [1]}):
        with pytest.raises(ValidationFailed):
            parse_init_request({"query": "x", **bad})
