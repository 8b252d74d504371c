"""The hold's text estimate is an upper bound even for text that defeats the merges
(review 3B, finding 2).

One token per 3 bytes let ``"1,2,3,…"`` or ``"a1a1…"`` (a token per byte at every
vendor: tokenizers cut digits, punctuation and letters apart before merging) be held
at a third of what the platform pays, and the settlement is capped at the hold. The
pieces table was read off tiktoken's cl100k and o200k split patterns; natural
language keeps exactly the old estimate. The attack goes through init and the edge
(`tests/inproc.py`).
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator

import orjson
import pytest
import pytest_asyncio

from shared.input_size import TOKENS_PER_MESSAGE, estimate_input_tokens, params_tokens
from shared.pricing import hold_cost_micro
from shared.text_tokens import pieces, text_tokens
from tests.inproc import Gateway, gateway_env, opened
from tests.stack import micro
from tests.token_claims import claims_of

on_loop = pytest.mark.asyncio(loop_scope="module")

# (text, the most pieces cl100k or o200k cut it into)
PIECES = [
    ("", 0),
    ("hello world", 2),
    ("1,2,3", 5),
    ("1234567", 3),  # digits in groups of 3
    ("a1a1", 4),
    ("foo.bar(baz)", 4),  # one mark leads the letters after it
    ("x = [1, 2]", 8),
    ("a  b", 3),
    ("    return x", 3),
    ("helloWorld", 2),  # o200k
    ("3.14159", 4),
    ("e-mail: a@b.io", 6),
    ("trailing ", 2),
    ("naïve café", 2),
    ("中文字符", 1),
]
# Counted higher than the vendors cut, never lower.
OVER = [("don't", 2), ("a\n\nb", 3), ("a — b", 3), ("😀1", 2)]

PROSE = [
    "The hold must cover the input, so the control plane at init and the edge both "
    "size a request with the same estimate: deterministic, and never below what a "
    "vendor bills.",
    "Can you explain the difference between a list and a tuple in Python? I keep "
    "mixing them up when I write functions that return several values.",
    "Le chat est sur la table. Nous avons mangé une délicieuse crème brûlée à Paris.",
    "Мы встретились в Москве в прошлом году и долго говорили о литературе.",  # noqa: RUF001
    "東京は日本の首都であり、世界で最も人口の多い都市の一つです。",
]
# Prose thick with numbers and marks has more pieces: held a little higher.
DENSE = [
    'It was the 3rd of May, 2024, when the team shipped version 2.1. "Why not?" she '
    "asked. Because, he said, it's a well-known fact that most words are one token.",
    "Summarize the following: The meeting on March 3rd covered Q1 revenue (up 12%), "
    "hiring plans for 2025, and the new office in Berlin. Action items: Anna to send "
    "the budget by Friday; Tom to review contracts.",
]


@pytest.mark.parametrize(("text", "expected"), PIECES)
def test_pieces_are_what_the_vendors_split_patterns_cut(text: str, expected: int) -> None:
    assert pieces(text.encode()) == expected


@pytest.mark.parametrize(("text", "vendors"), OVER)
def test_pieces_err_high_where_the_rules_are_simplified(text: str, vendors: int) -> None:
    assert pieces(text.encode()) >= vendors


@pytest.mark.parametrize("unit", ["1,", "a1", "1 ", "a.", "1a,", " 1", "aB"])
def test_text_that_defeats_the_merges_is_held_at_its_pieces(unit: str) -> None:
    text = unit * 10_000
    assert text_tokens([text.encode()]) >= pieces(text.encode()) >= len(text) // 2
    assert text_tokens([text.encode()]) > math.ceil(len(text) / 3)


@pytest.mark.parametrize("text", PROSE)
def test_natural_language_keeps_the_byte_rate(text: str) -> None:
    raw = text.encode()
    assert text_tokens([raw]) == math.ceil(len(raw) / 3)


@pytest.mark.parametrize("text", DENSE)
def test_prose_with_numbers_is_held_at_most_a_tenth_higher(text: str) -> None:
    raw = text.encode()
    assert math.ceil(len(raw) / 3) <= text_tokens([raw]) <= math.ceil(len(raw) / 3 * 1.1)


def test_texts_counted_together_keep_their_own_pieces() -> None:
    texts = [b"user", b"1,2 ", b"", b" 3a", b"x."]
    assert pieces(b"\n".join(texts)) - (len(texts) - 1) == sum(map(pieces, texts))
    assert text_tokens([]) == 0


def test_messages_and_parameters_use_the_text_count() -> None:
    content = "1," * 5_000
    message = {"role": "user", "content": content}
    assert estimate_input_tokens([message]) == (
        text_tokens([b"user", content.encode()]) + TOKENS_PER_MESSAGE
    )
    assert estimate_input_tokens([message]) >= 10_000
    as_parts = {"role": "user", "content": [{"type": "text", "text": content}]}
    assert estimate_input_tokens([as_parts]) == estimate_input_tokens([message])
    stop = {"stop": ["1,1,1,1"] * 300}
    assert params_tokens(stop) == text_tokens([orjson.dumps(stop)]) > len(orjson.dumps(stop)) // 3


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def gw(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Gateway]:
    async with Gateway(gateway_env(str(tmp_path_factory.mktemp("pieces")))) as gateway:
        yield gateway


@on_loop
async def test_a_request_of_digits_and_commas_is_held_for_every_piece(gw: Gateway) -> None:
    n = 2_000  # "1," x 2000: 4000 bytes, 4000 tokens at any vendor
    messages = [{"role": "user", "content": "1," * n}]
    init = await gw.init_ok(await gw.new_user(), {"messages": messages, "max_tokens": 8})
    claims = claims_of(init["stream_token"])
    assert claims["max_input_tokens"] >= 2 * n
    model = gw.settings().catalog.model(init["model"])
    assert model is not None
    assert micro(init["reserved_credits"]) >= hold_cost_micro(2 * n, 8, model.price)
    # The edge counts the same way: the body the hold was sized for streams.
    body = orjson.dumps({"messages": messages, "stream": False})
    headers = {"Authorization": f"Bearer {init['stream_token']}"}
    async with opened(await gw.post("/v1/chat/completions", body, headers)) as response:
        assert response.status_code == 200, await response.aread()
