"""Many tiny items in one body: CPU per request (review 6, algorithmic cost).

Under the body's caps (1 MiB, 50,000 arrays and objects) one request could carry
34,000 one-line messages to the edge (no count there), 39,000 empty text parts or
20,000 tool calls to either service. Each item is validated, copied and sized in
Python on the event loop: measured in one process with the services' GC settings,
the edge spent 76-81 ms of CPU refusing the 34,000 messages (413, the token unused,
so again and again with one token), 37-53 ms on the parts and 40-49 ms on the calls;
init 50 ms on the parts (and held for them: 201) and 47-63 ms on the calls. And the
edge checked and sized a body once per model of the token's fallback chain, before
the token's single use was checked: a 200 KB body replayed with a used token of a
six-model chain cost 53-64 ms each time (401). Now a request's messages (1,000),
content parts (2,000) and tool calls (2,000) are counted before any is looked at
(`shared.request_bounds`), and a body is measured once for the whole chain
(`input_size.InputSize`): about 10 ms at most, what parsing 1 MiB costs anyway.
The whole gateway in one event loop (`tests/inproc.py`).
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest
import pytest_asyncio
import yaml

from shared import input_size
from shared.request_bounds import (
    MAX_CONTENT_PARTS,
    MAX_MESSAGES,
    MAX_TOOL_CALLS,
    check_item_counts,
)
from tests.inproc import Gateway, gateway_env

on_loop = pytest.mark.asyncio(loop_scope="module")

HI = {"role": "user", "content": "hi [[mock tokens=2]]"}
# A first turn that leaves a token room for what the tests send under the caps.
ROOMY = {"messages": [{"role": "user", "content": "x" * 9000}, HI], "max_tokens": 16}
CHAIN = [f"chain-{i}" for i in range(6)]  # chain-0 falls back to the other five


def _catalog(path: Path) -> str:
    packaged = Path(input_size.__file__).with_name("models.yaml")
    catalog = yaml.safe_load(packaged.read_text())
    for model in CHAIN:
        catalog["models"][model] = {
            "provider": "mock",
            "upstream_model": "mock-fast",
            "context_length": 200_000,
            "max_output_tokens": 1024,
            "features": ["streaming", "tools"],
            "price": {"input_per_mtok": 1.0, "output_per_mtok": 2.0},
        }
    catalog["models"][CHAIN[0]]["fallbacks"] = CHAIN[1:]
    path.write_text(yaml.safe_dump(catalog))
    return str(path)


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def gw(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Gateway]:
    tmp = tmp_path_factory.mktemp("counts")
    env = gateway_env(str(tmp), LLMGW_MODELS_FILE=_catalog(tmp / "models.yaml"))
    async with Gateway(env) as gateway:
        yield gateway


async def _edge(gw: Gateway, body: dict[str, Any], token: str) -> tuple[int, Any]:
    raw = orjson.dumps(body)
    assert len(raw) <= 1 << 20 and not input_size.json_too_complex(raw)  # within the caps
    return await gw.complete(token, raw)


async def _init(gw: Gateway, token: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    raw = orjson.dumps(body)
    assert len(raw) <= 1 << 20 and not input_size.json_too_complex(raw)
    headers = {"Authorization": f"Bearer {token}", "content-type": "application/json"}
    response = await gw.http.post("/v1/chat/init", content=raw, headers=headers)
    return response.status_code, response.json()


def _calls(prefix: str, n: int) -> list[dict[str, Any]]:
    return [{"id": f"{prefix}.{i}", "function": {"name": "f", "arguments": ""}} for i in range(n)]


def _many_calls() -> list[dict[str, Any]]:
    """2,048 tool calls: 16 assistant messages of 128 calls, the most one may make."""
    return [{"role": "assistant", "content": None, "tool_calls": _calls(str(k), 128)}
            for k in range(16)]  # fmt: skip


@on_loop
async def test_thousands_of_messages_are_refused_at_the_edge_before_any_is_read(
    gw: Gateway,
) -> None:
    user = await gw.new_user()
    token = (await gw.init_ok(user, {"messages": [HI], "max_tokens": 16}))["stream_token"]
    # 34,000 one-line messages, the last one malformed: refused on their count, so
    # before any message is checked (the last one's problem is never reached) or sized.
    messages: list[dict[str, Any]] = [{"role": "user", "content": ""}] * 33_999
    status, answer = await _edge(gw, {"messages": [*messages, {"role": "nobody"}]}, token)
    assert (status, answer["error"]["code"]) == (400, "invalid_messages"), answer
    assert f"at most {MAX_MESSAGES}" in answer["error"]["message"]
    # Init's long-standing cap, now the edge's too; the token was not used.
    status, answer = await _edge(gw, {"messages": [HI] * MAX_MESSAGES}, token)
    assert (status, answer["error"]["code"]) == (413, "input_too_large"), answer
    status, answer = await _edge(gw, {"messages": [HI]}, token)
    assert status == 200, answer


@on_loop
async def test_thousands_of_content_parts_are_refused_at_init_and_edge(gw: Gateway) -> None:
    user = await gw.new_user()
    before = await gw.credits(user)
    parts = [{"type": "text", "text": ""}] * 39_000
    wide = {"role": "user", "content": parts}
    # Before: init checked, copied and sized them all, then held for them (201).
    status, answer = await _init(gw, user, {"messages": [wide], "max_tokens": 16})
    assert (status, answer["error"]["code"]) == (422, "validation_error"), answer
    assert f"at most {MAX_CONTENT_PARTS} content parts" in answer["message"]
    # Spread over messages, and as tool results, they count together.
    spread = [{"role": "user", "content": [{"type": "text", "text": "a"}] * 3}] * 700
    status, answer = await _init(gw, user, {"messages": spread, "max_tokens": 16})
    assert (status, answer["error"]["code"]) == (422, "validation_error"), answer
    results = [{"tool_call_id": "c", "content": [{"type": "text", "text": "a"}] * 20}] * 128
    status, answer = await _init(gw, user, {"session_id": "s", "tool_results": results})
    assert (status, answer["error"]["code"]) == (422, "validation_error"), answer
    assert "tool_results[].content" in answer["message"]
    assert await gw.credits(user) == before
    token = (await gw.init_ok(user, ROOMY))["stream_token"]
    status, answer = await _edge(gw, {"messages": [wide]}, token)
    assert (status, answer["error"]["code"]) == (400, "invalid_messages"), answer
    # Up to the cap they are read as before.
    fine = {"role": "user", "content": [{"type": "text", "text": ""}] * MAX_CONTENT_PARTS}
    status, answer = await _edge(gw, {"messages": [fine, HI]}, token)
    assert status == 200, answer


@on_loop
async def test_thousands_of_tool_calls_are_refused_at_init_and_edge(gw: Gateway) -> None:
    user = await gw.new_user()
    before = await gw.credits(user)
    body = {"model": "mock-chat", "messages": [*_many_calls(), HI], "max_tokens": 16}
    status, answer = await _init(gw, user, body)
    assert (status, answer["error"]["code"]) == (422, "validation_error"), answer
    assert f"at most {MAX_TOOL_CALLS} tool calls" in answer["message"]
    assert await gw.credits(user) == before
    token = (await gw.init_ok(user, {"messages": [HI], "max_tokens": 16}))["stream_token"]
    status, answer = await _edge(gw, {"messages": [*_many_calls(), HI]}, token)
    assert (status, answer["error"]["code"]) == (400, "invalid_tool_call"), answer
    status, answer = await _edge(gw, {"messages": [HI]}, token)
    assert status == 200, answer


@pytest.fixture
def sized(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """How many texts the input estimate sizes (`text_tokens` calls), whatever calls it."""
    counted: list[int] = []
    real: Callable[[Sequence[bytes]], int] = input_size.text_tokens

    def counting(texts: Sequence[bytes]) -> int:
        counted.append(1)
        return real(texts)

    monkeypatch.setattr(input_size, "text_tokens", counting)
    yield counted


CHAIN_MESSAGES = [{"role": "user", "content": f"m{i}"} for i in range(MAX_MESSAGES - 1)] + [HI]


@on_loop
async def test_a_fallback_chain_sizes_a_body_once_at_init(gw: Gateway, sized: list[int]) -> None:
    """A six-model chain: init measures the request once and prices it per model
    (before: six times)."""
    user = await gw.new_user()
    sized.clear()
    grant = await gw.init_ok(user, {"model": CHAIN[0], "messages": CHAIN_MESSAGES})
    assert 0 < len(sized) <= MAX_MESSAGES + 1, len(sized)
    claims = orjson.loads(_segment(grant["stream_token"]))
    assert [entry["model"] for entry in claims["fallbacks"]] == CHAIN[1:]


@on_loop
async def test_a_fallback_chain_sizes_a_body_once_at_the_edge_even_for_a_used_token(
    gw: Gateway, sized: list[int]
) -> None:
    """The edge checks and sizes a body before it claims the token: before, once per
    model of the chain, so a used token replayed with a large body cost six passes
    each time (a 401 in the end)."""
    user = await gw.new_user()
    grant = await gw.init_ok(user, {"model": CHAIN[0], "messages": CHAIN_MESSAGES})
    status, answer = await _edge(gw, {"messages": CHAIN_MESSAGES}, grant["stream_token"])
    assert status == 200, answer
    sized.clear()
    status, answer = await _edge(gw, {"messages": CHAIN_MESSAGES}, grant["stream_token"])
    assert (status, answer["error"]["code"]) == (401, "token_used"), answer
    assert 0 < len(sized) <= MAX_MESSAGES + 1, len(sized)


def _segment(token: str) -> bytes:
    payload = token.split(".")[1]
    return base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))


@pytest.mark.parametrize(
    ("messages", "where"),
    [
        ([{"role": "user", "content": "x"}] * (MAX_MESSAGES + 1), "messages"),
        ([{"role": "user", "content": [{}] * (MAX_CONTENT_PARTS + 1)}], "messages[].content"),
        (
            [{"role": "user", "content": [{}] * 3}] * (MAX_CONTENT_PARTS // 3 + 1),
            "messages[].content",
        ),
        ([{"tool_calls": [{}] * 128}] * (MAX_TOOL_CALLS // 128 + 1), "messages[].tool_calls"),
    ],
)
def test_the_counts_are_of_the_whole_request(messages: list[Any], where: str) -> None:
    with pytest.raises(input_size.InputRejected) as refused:
        check_item_counts(messages)
    assert refused.value.where == where
    check_item_counts(messages[: len(messages) // 2])  # half of it passes
    check_item_counts([None, "x", {"content": "text", "tool_calls": None}] * 300)
    check_item_counts({"not": "a list"})  # shapes are the validators' business


def test_a_measure_prices_like_the_estimate_at_every_rate() -> None:
    image = {"type": "image_url", "image_url": {"url": "https://x.io/a.png"}}
    file = {"type": "file", "file": {"file_data": "JVBERi0=", "filename": "a.pdf"}}
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "1,2,3"}, image, file]},
        {"role": "assistant", "content": None, "tool_calls": _calls("c", 2)},
        {"role": "tool", "tool_call_id": "c.0", "content": "ok"},
    ]
    params = {"tools": [{"type": "function", "function": {"name": "f"}}], "stop": ["x"]}
    size = input_size.measure_input(messages, params)
    for rates in (
        input_size.DEFAULT_RATES,
        input_size.input_rates("anthropic_messages"),
        input_size.input_rates("gemini", 48169),
    ):
        expected = input_size.estimate_input_tokens(messages, rates)
        assert size.at(rates) == expected + input_size.params_tokens(params, rates)
    assert size.images == 2 and size.tools
