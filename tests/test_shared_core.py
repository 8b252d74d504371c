"""Pure core of `shared/`: SSE, pricing, catalog, tokens, webhooks, retry — tables of cases."""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shared import pricing, tokens, webhooks
from shared.catalog import CatalogError, Price, load_catalog, parse_catalog
from shared.retry import Backoff, parse_retry_after
from shared.sse import ServerSentEvent, SSEDecoder, encode_event

# --- SSE (WHATWG examples, fed at every split point) -------------------------------

WHATWG_STREAM = (
    b"data: YHOO\ndata: +2\ndata: 10\n\n: comment\n\nid: 7\nevent: add\ndata: 73857293\n\n"
)


def decode_split(stream: bytes, size: int) -> list[tuple[str, str, str | None]]:
    decoder = SSEDecoder()
    out = []
    for i in range(0, len(stream), size):
        out += [(e.event, e.data, e.id) for e in decoder.feed(stream[i : i + size])]
    return out


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 64, 1000])
@pytest.mark.parametrize("newline", [b"\n", b"\r\n", b"\r"])
def test_sse_decoder_any_split_any_newline(size: int, newline: bytes) -> None:
    stream = WHATWG_STREAM.replace(b"\n", newline)
    assert decode_split(stream, size) == [
        ("message", "YHOO\n+2\n10", None),
        ("add", "73857293", "7"),
    ]


def test_sse_decoder_crlf_split_between_cr_and_lf() -> None:
    decoder = SSEDecoder()
    events = (
        list(decoder.feed(b"data: a\r")) + list(decoder.feed(b"\n\r")) + list(decoder.feed(b"\n"))
    )
    assert [e.data for e in events] == ["a"]


@pytest.mark.parametrize(
    ("line", "data"),
    [(b"data:no-space\n\n", "no-space"), (b"data:  two\n\n", " two"), (b"data\n\n", "")],
)
def test_sse_field_value_rules(line: bytes, data: str) -> None:
    # A bare "data" line appends an empty line: the event is dispatched with data "".
    events = list(SSEDecoder().feed(line))
    assert [e.data for e in events] == [data]


def test_sse_encode_round_trip() -> None:
    frame = encode_event("line1\nline2", event="chunk", id=3)
    [event] = list(SSEDecoder().feed(frame))
    assert (event.event, event.data, event.id) == ("chunk", "line1\nline2", "3")


# --- pricing -----------------------------------------------------------------------

PRICE = Price(Decimal("1.0"), Decimal("2.0"))


@pytest.mark.parametrize(
    ("inp", "out", "price", "expected"),
    [
        (0, 0, PRICE, 0),
        (12, 64, PRICE, 140),
        (1, 0, Price(Decimal("0.15"), Decimal("0.6")), 1),  # 0.15 rounds up to 1
        (100, 100, Price(Decimal("0.15"), Decimal("0.6")), 75),
        (3, 3, Price(Decimal("0.1"), Decimal("0.2")), 1),  # 0.9 exact, no float drift
        (10, 10, Price(Decimal("0.1"), Decimal("0.2")), 3),
    ],
)
def test_cost_is_one_ceiling_on_exact_decimals(
    inp: int, out: int, price: Price, expected: int
) -> None:
    assert pricing.cost_micro(inp, out, price) == expected


def test_input_estimate_is_deterministic_and_conservative() -> None:
    messages = [{"role": "user", "content": "héllo wörld " * 10}]
    first = pricing.estimate_input_tokens(messages)
    assert first == pricing.estimate_input_tokens(messages)
    assert first >= len("héllo wörld " * 10) // 4 + 3  # above a ~4 bytes/token tokenizer


@pytest.mark.parametrize(
    ("value", "micro"),
    [("10.5", 10_500_000), (3, 3_000_000), ("0.000001", 1), ("-2", -2_000_000)],
)
def test_parse_credits(value: object, micro: int) -> None:
    assert pricing.parse_credits(value) == micro


@pytest.mark.parametrize("value", [1.5, "abc", "0.0000001", "NaN", "Infinity", True, None, "1e30"])
def test_parse_credits_rejects(value: object) -> None:
    with pytest.raises(ValueError):
        pricing.parse_credits(value)


@pytest.mark.parametrize(
    ("micro", "text"), [(0, "0.000000"), (2100, "0.002100"), (-1, "-0.000001")]
)
def test_format_credits(micro: int, text: str) -> None:
    assert pricing.format_credits(micro) == text


# --- catalog -----------------------------------------------------------------------


def test_packaged_catalog_has_the_mock_models() -> None:
    catalog = load_catalog(None)
    assert catalog.default_model == "mock-fast"
    assert {"mock-fast", "mock-chat"} <= set(catalog.models)
    assert catalog.providers["mock"].api_type == "openai_chat"


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.update(default_model="nope"),
        lambda d: d["providers"]["mock"].update(api_type="soap"),
        lambda d: d["models"]["m"].update(provider="ghost"),
        lambda d: d["models"]["m"].update(context_length=-1),
        lambda d: d["models"]["m"]["price"].update(input_per_mtok="x"),
    ],
)
def test_catalog_errors_name_the_entry(mutate: object) -> None:
    doc = {
        "default_model": "m",
        "providers": {"mock": {"api_type": "openai_chat", "base_url": "http://x/v1"}},
        "models": {
            "m": {
                "provider": "mock",
                "context_length": 10,
                "max_output_tokens": 5,
                "price": {"input_per_mtok": 1, "output_per_mtok": 2},
            }
        },
    }
    parse_catalog(doc)
    mutate(doc)  # type: ignore[operator]
    with pytest.raises(CatalogError):
        parse_catalog(doc)


# --- tokens ------------------------------------------------------------------------

KEY = Ed25519PrivateKey.generate()


def claims(**overrides: object) -> dict[str, object]:
    base = tokens.stream_claims(
        user_id="u", company_id="c", role="member", scopes=["llm:chat:send"], session_id="s",
        model="mock-fast", max_tokens=10, max_input_tokens=20, reservation_id="r",
        request_id="q", now=int(datetime.now(UTC).timestamp()), ttl_seconds=120,
    )  # fmt: skip
    base.update(overrides)
    return base


def test_round_trip() -> None:
    token = tokens.sign_token(claims(), KEY, "k1")
    assert tokens.parse_token(token).kid == "k1"
    grant = tokens.verify_stream_token(token, KEY.public_key())
    assert (grant.model, grant.max_tokens, grant.scopes) == ("mock-fast", 10, ("llm:chat:send",))


OTHER_KEY = Ed25519PrivateKey.generate()


@pytest.mark.parametrize(
    ("overrides", "signer", "reason"),
    [
        (lambda now: {"exp": now - 60}, KEY, "expired"),
        (lambda now: {"nbf": now + 60}, KEY, "not_yet_valid"),
        (lambda now: {"aud": "llm-api"}, KEY, "bad_audience"),
        (lambda now: {"iss": "someone-else"}, KEY, "bad_issuer"),
        (lambda now: {}, OTHER_KEY, "bad_signature"),
    ],
)
def test_rejections(
    overrides: Callable[[int], dict[str, object]], signer: Ed25519PrivateKey, reason: str
) -> None:
    # Times are computed when the test runs, not at collection, so a slow suite
    # cannot turn "not yet valid" into valid.
    now = int(datetime.now(UTC).timestamp())
    token = tokens.sign_token(claims(**overrides(now)), signer, "k1")
    with pytest.raises(tokens.TokenRejected) as info:
        tokens.verify_stream_token(token, KEY.public_key())
    assert info.value.reason == reason


def test_alg_none_and_hs256_confusion_fail_on_the_header() -> None:
    none_token = jwt.encode(claims(), None, algorithm="none", headers={"kid": "k1"})
    with pytest.raises(tokens.TokenRejected) as info:
        tokens.parse_token(none_token)
    assert info.value.reason == "bad_algorithm"
    public_bytes = tokens.public_jwk(KEY.public_key(), "k1")["x"].encode()
    hs_token = jwt.encode(claims(), public_bytes, algorithm="HS256", headers={"kid": "k1"})
    with pytest.raises(tokens.TokenRejected) as info:
        tokens.parse_token(hs_token)
    assert info.value.reason == "bad_algorithm"


# --- webhooks ----------------------------------------------------------------------


def test_sign_and_verify_and_tamper() -> None:
    secret = webhooks.generate_secret()
    body = b'{"type":"stream.completed"}'
    headers = webhooks.sign(secret, "usage_1", body)
    webhooks.verify([secret], body, headers)
    with pytest.raises(webhooks.BadSignature):
        webhooks.verify([secret], body + b" ", headers)
    with pytest.raises(webhooks.BadSignature):
        webhooks.verify([webhooks.generate_secret()], body, headers)
    old = webhooks.sign(secret, "usage_1", body, now=datetime.now(UTC) - timedelta(minutes=6))
    with pytest.raises(webhooks.BadSignature):
        webhooks.verify([secret], body, old)
    with pytest.raises(webhooks.BadSignature):
        webhooks.verify([secret], body, {**headers, "webhook-signature": "garbage"})


# --- retry -------------------------------------------------------------------------


def test_backoff_is_bounded_jittered_and_honours_retry_after() -> None:
    backoff = Backoff(base=0.5, cap=10, rng=random.Random(1))
    delays = [backoff.delay(n) for n in range(1, 12)]
    assert all(0 <= d <= min(10, 0.5 * 2**n) for n, d in zip(range(1, 12), delays, strict=True))
    assert len(set(delays)) == len(delays)
    assert backoff.delay(1, retry_after=7) >= 7


def test_a_backoff_floor_keeps_every_delay_off_zero_and_under_its_ceiling() -> None:
    backoff = Backoff(base=2.0, cap=60, floor=1.0, rng=random.Random(3))
    delays = [backoff.delay(n) for n in range(1, 12) for _ in range(50)]
    assert min(delays) >= 1.0 and max(delays) <= 60
    # A ceiling below the floor wins: never longer than the schedule allows.
    assert Backoff(base=0.1, cap=0.2, floor=1.0).delay(1) <= 0.2


@pytest.mark.parametrize(
    ("header", "seconds"),
    [("5", 5.0), (None, None), ("soon", None), ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0)],
)
def test_parse_retry_after(header: str | None, seconds: float | None) -> None:
    assert parse_retry_after(header) == seconds


def test_sse_decoder_gives_the_same_events_however_the_bytes_are_cut() -> None:
    # Whole-event chunks take the decoder's fast path, odd cuts the line walker:
    # both must agree with a byte-at-a-time read.
    stream = (
        b'data: {"a":1}\n\n: ping\n\ndata: {"b":2}\n\nevent: x\nid: 7\ndata: two\ndata: lines\n\n'
        b"data: \n\n\n\ndata:no-space\n\nretry: 5\ndata: r\n\ndata: caf\xc3\xa9\n\n"
    )

    def decode(chunks: list[bytes]) -> list[ServerSentEvent]:
        decoder = SSEDecoder()
        return [event for chunk in chunks for event in decoder.feed(chunk)]

    expected = decode([stream[i : i + 1] for i in range(len(stream))])
    assert [e.data for e in expected] == [
        '{"a":1}', '{"b":2}', "two\nlines", "", "no-space", "r", "café",
    ]  # fmt: skip
    rng = random.Random(7)
    for _ in range(200):
        cuts = sorted(rng.sample(range(1, len(stream)), rng.randint(0, 8)))
        bounds = [0, *cuts, len(stream)]
        assert decode([stream[a:b] for a, b in itertools.pairwise(bounds)]) == expected
    assert decode([stream]) == expected
