"""Anthropic's own rules, applied by a test backend behind the gateway in this process.

- Anthropic answers 529 (`overloaded_error`) when it is overloaded, and its own
  client retries it as it retries a 503. Attack (measured before the fix): the edge
  retried 429/502/503/504 only, so a single 529 reached the member as a 502
  "the backend answered 529" where one retry would have served.
- Anthropic takes only tool-use ids matching `^[a-zA-Z0-9_-]+$` (its 400 says
  "String should match pattern"); an OpenAI-compatible backend may make ids of any
  characters. Attack (measured before the fix): a session whose tool calls an
  OpenAI-compatible model made, continued on an Anthropic model, sent those ids as
  they were: Anthropic refused every later turn (502 upstream_error), for good.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from shared.sse import SSEDecoder
from tests.harness import ServerGroup, bind_free_socket, url_of
from tests.hostile_catalog import PACKAGED, sse_frame
from tests.stack import InProcessStack, base_env

TOOLS = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
# Ids an OpenAI-compatible backend may make (OpenAI allows any characters).
ODD_IDS = ["call:7/a.b c", "x" * 200]
ANTHROPIC_ID = re.compile(r"^[a-zA-Z0-9_-]+$")
SEEN: list[dict[str, Any]] = []  # every Anthropic request body, as the backend got it
OVERLOADED: set[str] = set()  # prompts already answered 529 once


def anthropic_problem(messages: list[dict[str, Any]], *, defines_tools: bool = True) -> str | None:
    """Anthropic's rules on tool blocks: a request holding any defines `tools`; each
    `tool_use` id matches its pattern (at most 64 characters kept as the safe bound),
    and each `tool_result` answers a `tool_use` of the assistant turn right before it."""
    previous: set[str] = set()
    for i, turn in enumerate(messages):
        blocks = turn["content"] if isinstance(turn["content"], list) else []
        uses = set()
        for j, block in enumerate(blocks):
            if block.get("type") in ("tool_use", "tool_result") and not defines_tools:
                return (
                    "Requests which include `tool_use` or `tool_result` blocks must define tools."
                )
            if block.get("type") == "tool_use":
                if not ANTHROPIC_ID.match(block["id"]) or len(block["id"]) > 64:
                    return f"messages.{i}.content.{j}.tool_use.id: String should match pattern"
                uses.add(block["id"])
            if block.get("type") == "tool_result" and block["tool_use_id"] not in previous:
                return f"messages.{i}.content.{j}: unexpected `tool_use_id` found"
        previous = uses
    return None


def _event(kind: str, doc: dict[str, Any]) -> bytes:
    return f"event: {kind}\n".encode() + b"data: " + orjson.dumps({"type": kind, **doc}) + b"\n\n"


async def _messages(request: Request) -> Response:
    body = orjson.loads(await request.body())
    SEEN.append(body)
    last = str(body["messages"][-1]["content"])
    if "[[down]]" in last and body["model"] == "claude-chain":
        error = {"type": "error", "error": {"type": "api_error", "message": "down"}}
        return JSONResponse(error, status_code=500)
    if "[[overloaded]]" in last and last not in OVERLOADED:
        OVERLOADED.add(last)
        error = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
        return JSONResponse(error, status_code=529)
    problem = anthropic_problem(body["messages"], defines_tools=bool(body.get("tools")))
    if problem is not None:
        error = {"type": "error", "error": {"type": "invalid_request_error", "message": problem}}
        return JSONResponse(error, status_code=400)

    async def frames() -> AsyncIterator[bytes]:
        usage = {"input_tokens": 20, "output_tokens": 1}
        yield _event("message_start", {"message": {"usage": usage}})
        yield _event("content_block_start", {"index": 0, "content_block": {"type": "text"}})
        delta = {"type": "text_delta", "text": "ok"}
        yield _event("content_block_delta", {"index": 0, "delta": delta})
        yield _event("content_block_stop", {"index": 0})
        done = {"delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 5}}
        yield _event("message_delta", done)
        yield _event("message_stop", {})

    return StreamingResponse(frames(), media_type="text/event-stream")


async def _chat(request: Request) -> Response:
    """An OpenAI-compatible backend that calls tools with ids Anthropic would refuse."""
    body = orjson.loads(await request.body())

    async def frames() -> AsyncIterator[bytes]:
        for index, call_id in enumerate(ODD_IDS):
            call = {
                "index": index,
                "id": call_id,
                "type": "function",
                "function": {"name": "lookup", "arguments": "{}"},
            }
            yield sse_frame({"choices": [{"index": 0, "delta": {"tool_calls": [call]}}]})
        yield sse_frame({"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]})
        usage = {"prompt_tokens": 20, "completion_tokens": 5, "total_tokens": 25}
        yield sse_frame({"choices": [], "usage": usage})
        yield b"data: [DONE]\n\n"

    assert body["messages"]
    return StreamingResponse(frames(), media_type="text/event-stream")


def _catalog(directory: Path, backend_url: str) -> str:
    doc = yaml.safe_load(PACKAGED.read_text())
    doc["providers"]["compat"] = {"api_type": "openai_chat", "base_url": f"{backend_url}/v1"}
    doc["providers"]["claude"] = {"api_type": "anthropic_messages", "base_url": backend_url}
    for provider, name, features in [
        ("compat", "compat-model", ["streaming", "tools"]),
        ("claude", "claude-model", ["streaming", "tools"]),
        ("claude", "claude-plain", ["streaming"]),  # a model without the tools feature
        ("claude", "claude-chain", ["streaming", "tools"]),  # falls back to claude-plain
    ]:
        doc["models"][name] = {
            "provider": provider,
            "upstream_model": name,
            "context_length": 8192,
            "max_output_tokens": 1024,
            "features": features,
            "price": {"input_per_mtok": 1.0, "output_per_mtok": 2.0},
        }
    doc["models"]["claude-chain"]["fallbacks"] = ["claude-plain"]
    path = directory / "models.yaml"
    path.write_text(yaml.safe_dump(doc))
    return str(path)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessStack]:
    directory: Path = tmp_path_factory.mktemp("anthropic-rules")
    sock = bind_free_socket()
    backend = Starlette(
        routes=[
            Route("/v1/chat/completions", _chat, methods=["POST"]),
            Route("/v1/messages", _messages, methods=["POST"]),
        ]
    )
    with ServerGroup([(backend, sock)]):
        settings = base_env(f"sqlite:///{directory / 'gateway.db'}")
        settings["LLMGW_MODELS_FILE"] = _catalog(directory, url_of(sock))
        with InProcessStack(settings) as gateway:
            yield gateway


def _turn(
    stack: InProcessStack, token: str, body: dict[str, Any], *, tools: bool = True
) -> tuple[int, dict[str, Any]]:
    """One turn streamed: its stream's status code, and its usage record."""
    c = stack.client
    grant = c.init_ok(token, {"tools": TOOLS, **body} if tools else body)
    decoder, events = SSEDecoder(), []
    with c.http.stream("GET", grant["stream_url"]) as response:
        for raw in response.iter_raw():
            events.extend(decoder.feed(raw))
    return response.status_code, c.wait_usage(token, grant["reservation_id"])


def _tool_history(stack: InProcessStack, token: str) -> tuple[str, int, dict[str, Any]]:
    """A session whose history holds tool calls (made on compat-model, their ids in
    another vendor's alphabet) and their results (sent on claude-model): its id, and
    the second turn's status code and usage record."""
    _status, record = _turn(stack, token, {"model": "compat-model", "query": "look both up"})
    sid = record["session_id"]
    results = [{"tool_call_id": i, "content": "42"} for i in ODD_IDS]
    body = {"model": "claude-model", "session_id": sid, "tool_results": results}
    status, record = _turn(stack, token, body)
    return sid, status, record


def test_anthropics_529_is_retried_like_a_503(stack: InProcessStack) -> None:
    c = stack.client
    token = c.new_user(c.new_company("100"))
    SEEN.clear()
    status, record = _turn(stack, token, {"model": "claude-model", "query": "hi [[overloaded]]"})
    assert status == 200  # before: 502, "the backend answered 529"
    assert record["status"] == "completed"
    assert len(SEEN) == 2  # the 529, then the retry that served


def test_tool_ids_from_another_vendor_are_sent_to_anthropic_in_its_alphabet(
    stack: InProcessStack,
) -> None:
    c = stack.client
    token = c.new_user(c.new_company("100"))
    status, record = _turn(stack, token, {"model": "compat-model", "query": "look both up"})
    assert status == 200 and record["status"] == "completed"
    sid = record["session_id"]
    stored = c.as_user(token, "GET", f"/v1/sessions/{sid}").json()["data"]["messages"]
    assert [call["id"] for call in stored[-1]["tool_calls"]] == ODD_IDS  # kept as made
    SEEN.clear()
    results = [{"tool_call_id": i, "content": "42"} for i in ODD_IDS]
    body = {"model": "claude-model", "session_id": sid, "tool_results": results}
    status, record = _turn(stack, token, body)
    assert anthropic_problem(SEEN[-1]["messages"]) is None, SEEN[-1]["messages"]
    assert status == 200 and record["status"] == "completed"  # before: 502, for good
    # A later turn sends the same history again, mapped the same way.
    status, record = _turn(stack, token, {"model": "claude-model", "session_id": sid, "query": "?"})
    assert status == 200 and record["status"] == "completed"
    uses = [b["id"] for b in SEEN[-1]["messages"][1]["content"] if b["type"] == "tool_use"]
    results_sent = [b["tool_use_id"] for b in SEEN[-1]["messages"][2]["content"]]
    assert uses == results_sent and len(set(uses)) == 2


def test_stored_tool_history_is_sent_without_its_calls_to_a_model_without_tools(
    stack: InProcessStack,
) -> None:
    """Attack (measured before the fix): a session with tool calls and results,
    continued with a `query` on a model whose catalog features lack `tools`: init
    checked only the body's features, and the stored calls and results were sent
    anyway. Anthropic refuses tool blocks in a request without `tools` (the turn
    failed, 502, and so did every later one on that model). Now such a model gets the
    history without the calls and results, the assistant's text kept, and the hold
    counts what is sent; the transcript keeps everything."""
    c = stack.client
    token = c.new_user(c.new_company("100"))
    sid, status, record = _tool_history(stack, token)
    assert status == 200 and record["status"] == "completed"
    SEEN.clear()
    grant = c.init_ok(token, {"model": "claude-plain", "session_id": sid, "query": "thanks"})
    decoder, events = SSEDecoder(), []
    with c.http.stream("GET", grant["stream_url"]) as response:
        for raw in response.iter_raw():
            events.extend(decoder.feed(raw))
    sent = SEEN[-1]
    assert "tools" not in sent
    assert anthropic_problem(sent["messages"], defines_tools=False) is None, sent["messages"]
    assert response.status_code == 200 and events[-1].event == "complete"
    record = c.wait_usage(token, grant["reservation_id"])
    assert record["status"] == "completed"
    # Only the text went: the question, the answer after the results, the new query.
    assert sent["messages"] == [
        {"role": "user", "content": "look both up"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "thanks"},
    ]
    # The transcript keeps the calls and results for a model that takes them.
    stored = c.as_user(token, "GET", f"/v1/sessions/{sid}").json()["data"]["messages"]
    assert [m["role"] for m in stored] == [
        "user",
        "assistant",
        "tool",
        "tool",
        "assistant",
        "user",
        "assistant",
    ]


def test_a_fallback_without_tools_is_not_sent_a_history_with_tool_calls(
    stack: InProcessStack,
) -> None:
    """The same on a fallback chain (measured before the fix): the model asked for
    has tools, its fallback has not; the primary failing, the fallback was sent the
    stored calls and results it cannot take (refused, 400). Now a fallback without
    tools is left out of the chain of a turn whose messages carry tool calls."""
    c = stack.client
    token = c.new_user(c.new_company("100"))
    sid, _, _ = _tool_history(stack, token)
    SEEN.clear()
    body = {"model": "claude-chain", "session_id": sid, "query": "again [[down]]"}
    status, record = _turn(stack, token, body, tools=False)
    assert status == 502
    to_plain = [b for b in SEEN if b["model"] == "claude-plain"]
    assert not [b for b in to_plain if anthropic_problem(b["messages"], defines_tools=False)]
    assert [b["model"] for b in SEEN] == ["claude-chain"] * len(SEEN)
    assert record["status"] == "failed" and record["cost"] == "0.000000"


def test_a_query_without_tools_after_tool_calls_declares_them_forbidden(
    stack: InProcessStack,
) -> None:
    """Anthropic refuses a request whose history holds `tool_use` / `tool_result`
    blocks but that defines no `tools` ("Requests which include `tool_use` or
    `tool_result` blocks must define tools", anthropic-sdk-python#494). Attack
    (measured before the fix): a session with tool calls, continued with a `query`
    that offers no tools on a model that has the feature, sent the blocks without
    `tools`: 502 on that turn and every later one without tools. Now the tools the
    history used are declared, open schemas, with `tool_choice: none`."""
    c = stack.client
    token = c.new_user(c.new_company("100"))
    sid, _, _ = _tool_history(stack, token)
    SEEN.clear()
    body = {"model": "claude-model", "session_id": sid, "query": "thanks"}
    status, record = _turn(stack, token, body, tools=False)
    sent = SEEN[-1]
    assert anthropic_problem(sent["messages"], defines_tools=bool(sent.get("tools"))) is None
    assert status == 200 and record["status"] == "completed"  # before: 502
    assert sent["tools"] == [
        {"name": "lookup", "input_schema": {"type": "object", "properties": {}}}
    ]
    assert sent["tool_choice"] == {"type": "none"}
    assert [b["type"] for b in sent["messages"][1]["content"]] == ["tool_use", "tool_use"]
