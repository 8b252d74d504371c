"""Wide JSON: a 1 MiB body of 350,000 empty arrays (review 3B, finding 1).

Parsing builds a Python object per array and object, and the depth walk visited
each, synchronously: over a second of the event loop per request, for anyone (login
parses before it counts anything; the edge parsed a `Bearer sk_…` caller's body
before asking whether it takes API keys at all). Now such a body is refused on its
raw bytes before the parse (400 `json_too_complex`), an edge without API keys does
not read a key caller's body, and the NUL check reads the bytes instead of walking
the document. The whole gateway in one event loop (`tests/inproc.py`).
"""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
import pytest_asyncio
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.input_size import (
    MAX_JSON_CONTAINERS,
    escapes_nul,
    json_too_complex,
    structure_marks,
)
from tests.conftest import new_webhook_secret
from tests.inproc import Gateway, gateway_env

on_loop = pytest.mark.asyncio(loop_scope="module")

MIB = 1 << 20
# {"x":[[],[],…]}: 1 MiB, about 350,000 empty arrays.
WIDE = b'{"x":[' + b",".join([b"[]"] * ((MIB - 200) // 3)) + b"]}"
HI = {"role": "user", "content": "hi [[mock tokens=2]]"}


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def gw(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Gateway]:
    env = gateway_env(
        str(tmp_path_factory.mktemp("wide")), LLMGW_EDGE_SERVICE_SECRET=new_webhook_secret()
    )
    async with Gateway(env) as gateway:
        await gateway.add_edge("nokeys", LLMGW_EDGE_SERVICE_SECRET="")
        yield gateway


@on_loop
async def test_a_wide_body_is_refused_before_the_parse_by_the_control_plane(gw: Gateway) -> None:
    hdr = {"content-type": "application/json"}
    refused = await gw.http.post("/v1/auth/login", content=WIDE, headers=hdr)
    assert refused.status_code == 400, refused.text
    assert refused.json()["error"]["code"] == "json_too_complex"
    # Under the cap, brackets in strings (code in a message) are read as before.
    login = {"email": f"{uuid.uuid4().hex}@x.io", "password": "pw-123456",
             "note": "[{" * (MAX_JSON_CONTAINERS // 3)}  # fmt: skip
    answer = await gw.http.post("/v1/auth/login", json=login)
    assert (answer.status_code, answer.json()["error"]["code"]) == (401, "invalid_credentials")


@on_loop
async def test_a_wide_body_is_refused_at_the_edge_and_burns_nothing(gw: Gateway) -> None:
    grant = await gw.init_ok(await gw.new_user(), {"messages": [HI], "max_tokens": 16})
    token = grant["stream_token"]
    # Valid messages beside the wide field: before the fix, parsed, walked and served.
    body = b'{"messages":' + orjson.dumps([HI]) + b"," + WIDE[1:]
    status, answer = await gw.complete(token, body)
    assert (status, answer["error"]["code"]) == (400, "json_too_complex")
    status, answer = await gw.complete(token, {"messages": [HI]})
    assert status == 200, answer


@on_loop
async def test_a_key_callers_wide_body_never_reaches_the_parse(gw: Gateway) -> None:
    # An edge that takes API keys refuses the body before asking the control plane.
    status, answer = await gw.complete("sk_" + uuid.uuid4().hex, WIDE)
    assert (status, answer["error"]["code"]) == (400, "json_too_complex")
    # An edge that takes none refuses the key before reading the body at all.
    status, answer = await gw.complete("sk_x", b"{not json", edge="nokeys")
    assert (status, answer["error"]["code"]) == (401, "api_keys_disabled")


@on_loop
async def test_text_full_of_brackets_is_read_not_refused_as_wide(gw: Gateway) -> None:
    """A pasted JSON document or a tool's output: more brackets than the cap, all in
    strings. Each service reads the body and answers what it says (here: wrong
    password, over the model's context), never `json_too_complex`."""
    pasted = "[{" * MAX_JSON_CONTAINERS
    login = {"email": f"{uuid.uuid4().hex}@x.io", "password": "pw-123456", "note": pasted}
    answer = await gw.http.post("/v1/auth/login", json=login)
    assert (answer.status_code, answer.json()["error"]["code"]) == (401, "invalid_credentials")
    grant = await gw.init_ok(await gw.new_user(), {"messages": [HI], "max_tokens": 16})
    body = orjson.dumps({"messages": [{"role": "user", "content": pasted}]})
    status, answer = await gw.complete(grant["stream_token"], body)
    assert (status, answer["error"]["code"]) == (413, "input_too_large")


def test_the_container_count_is_on_the_raw_bytes() -> None:
    assert not json_too_complex(b"[" + b"[]," * (MAX_JSON_CONTAINERS - 2) + b"[]]")
    assert json_too_complex(b"[" + b"{}," * (MAX_JSON_CONTAINERS - 1) + b"{}]")
    # Brackets inside strings open nothing: a pasted document is never refused.
    assert not json_too_complex(orjson.dumps({"x": "[" * MAX_JSON_CONTAINERS}))
    assert not json_too_complex(orjson.dumps({"x": '\\"[{' * MAX_JSON_CONTAINERS}))


def _containers(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + sum(_containers(v) for v in value.values())
    if isinstance(value, list):
        return 1 + sum(_containers(v) for v in value)
    return 0


def test_a_megabyte_of_quotes_splits_into_a_few_pieces() -> None:
    """Attack: 50,001 brackets (past the first count) and then a megabyte of `"` (or of
    `"a",`), to the anonymous login or with any `Bearer sk_…` at the edge: the exact
    count split the body at every quote, half a million Python objects (72 ms of the
    event loop a request, measured). The quotes it splits at are now at most one per
    bracket: the megabyte leaves one or none."""
    for filler in (b'"', b'"a",', b'"a" '):
        body = b"[" * (MAX_JSON_CONTAINERS + 1) + filler * ((1 << 20) // len(filler))
        marks = structure_marks(body)
        assert marks.count(b'"') <= 1 and b'""' not in marks
        assert json_too_complex(body)
    # A quote per bracket is the most left: the split is bounded by the brackets.
    body = b"[" * (MAX_JSON_CONTAINERS + 1) + b'"[' * 200_000
    assert structure_marks(body).count(b'"') <= body.count(b"[") + 1


def test_the_container_count_is_exact_whatever_the_strings_hold() -> None:
    """Differential: the byte count against a parser's, on documents whose strings
    and keys are full of brackets, quotes and backslashes."""
    rng = random.Random(14)
    alphabet = '[]{}"\\\\ab,: \n'

    def text() -> str:
        return "".join(rng.choice(alphabet) for _ in range(rng.randrange(12)))

    def value(depth: int) -> Any:
        pick = rng.randrange(6 if depth < 4 else 2)
        if pick == 0:
            return text()
        if pick == 1:
            return rng.choice([1, None, True, 2.5])
        if pick < 4:
            return [value(depth + 1) for _ in range(rng.randrange(4))]
        return {text(): value(depth + 1) for _ in range(rng.randrange(4))}

    for _ in range(2000):
        raw = orjson.dumps(value(0))
        count = _containers(orjson.loads(raw))
        for limit in (0, count - 1, count):
            if limit >= 0:
                assert json_too_complex(raw, limit) is (count > limit), raw


def _strings(value: Any) -> list[str]:
    if isinstance(value, dict):
        return [*value, *(s for v in value.values() for s in _strings(v))]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return [value] if isinstance(value, str) else []


@pytest.mark.parametrize(
    "raw",
    [
        rb'{"a": "x\u0000y"}',
        rb'{"a\u0000": 1}',
        rb'{"a": "\\u0000"}',
        rb'{"a": "\\\u0000"}',
        rb'{"a": "\\\\u0000"}',
        rb'{"a": "\\\\\u0000"}',
        rb'{"a": ["\"\\", "\\\"\u0000"]}',
        rb'{"a": "\u005cu0000"}',
        rb'{"a": "\\"}',
        rb'{"a": "u0000\\", "b": "\u0000"}',
        rb'{"a": "\n\t\\\\\\"}',
    ],
)
def test_nul_is_found_in_the_bytes_exactly_where_a_parser_finds_it(raw: bytes) -> None:
    expected = any("\x00" in s for s in _strings(orjson.loads(raw)))
    assert escapes_nul(raw) is expected
    assert escapes_nul(orjson.dumps(orjson.loads(raw))) is expected


# Pieces of JSON strings where a byte-level reading and a parser may part: escaped
# backslashes before `u0000`, `\u005c` (a backslash as an escape), raw NUL, lone and
# paired surrogates, overlong and invalid UTF-8 (orjson refuses those bodies).
_PIECES = [
    b"\\\\", b"\\u0000", b"\\u005c", b"u0000", b'\\"', b"\\n", b"a", b"\\", b'"', b"\x00",
    b"\\ud800", b"\\udc00", b"\\ud83d\\ude00", b"\xc0\x80", b"\xff", b"\xed\xa0\x80",
    b"\\U0000", b"\\u000", b"\\u0001", "é".encode(), b"\\\\u0000", b"\\\\\\u0000",
]  # fmt: skip
_TEXT = st.lists(st.sampled_from(_PIECES), max_size=8).map(lambda p: b'"' + b"".join(p) + b'"')
_JSON = st.recursive(
    _TEXT | st.sampled_from([b"1", b"null", b"true"]),
    lambda inner: (
        st.lists(inner, max_size=4).map(lambda xs: b"[" + b",".join(xs) + b"]")
        | st.lists(st.tuples(_TEXT, inner), max_size=4).map(
            lambda kv: b"{" + b",".join(k + b":" + v for k, v in kv) + b"}"
        )
    ),
    max_leaves=10,
)


def _members(raw: bytes) -> list[str]:
    """Every string of a JSON text, duplicate keys' values too (orjson keeps the last
    one's; a NUL in an overridden one is refused all the same)."""
    pairs = json.loads(raw, object_pairs_hook=lambda kv: [x for pair in kv for x in pair])
    return _strings(pairs)


@settings(max_examples=3000, deadline=None, database=None)
@given(_JSON)
def test_nul_in_the_bytes_agrees_with_orjson_on_generated_bodies(raw: bytes) -> None:
    """Fuzzed: 200,000 cases once (42,416 valid bodies, 5,857 holding a NUL): no NUL
    missed; refused without a NUL in orjson's document only through duplicate keys."""
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return
    found = escapes_nul(raw)
    assert found or not any("\x00" in s for s in _strings(doc)), raw
    assert found is any("\x00" in s for s in _members(raw)), raw
