"""A stored session sends its vendor only tool calls that have their results.

Attack (measured before the fix): a session's assistant made tool calls (stored with
its turn's usage webhook), and the member's next turn was a `query` instead of the
calls' `tool_results`, or `tool_results` answering only some of the calls. Init
accepted both (every stored result answered *a* call made earlier), stored the
turn, and sent the history as it was: an assistant message whose calls are not all
answered by the `tool` messages right after it, which OpenAI, Anthropic and Gemini
all refuse (400). The turn failed, and so did every later turn of the session, for
good: the unanswered call stays in the stored history. Now the history a stored
session sends pairs every call with its results (`shared.tool_shapes.paired`): a
call nobody answered, or a result not right after its call, stays in the transcript
but is not sent; new `tool_results` must answer calls of the session's last
assistant message (422 otherwise, 409 while that turn is unsettled).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from shared.sse import SSEDecoder
from shared.tool_shapes import paired
from tests.hostile_catalog import hostile_backend_stack, sse_frame
from tests.stack import InProcessStack

MODEL = "strict-model"
TOOLS = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
SEEN: list[list[dict[str, Any]]] = []  # every request's messages, as the backend got them


def vendor_problem(messages: list[dict[str, Any]]) -> str | None:
    """OpenAI's rule (Anthropic's and Gemini's say the same in their words): an
    assistant message with `tool_calls` is followed by one `tool` message for each
    call, and a `tool` message answers a call of the assistant message right before
    its run of results."""
    expected: set[str] = set()
    for i, message in enumerate(messages):
        # Anthropic's rule: "all messages must have non-empty content except for the
        # optional final assistant message" (a call is content).
        if not message.get("content") and not message.get("tool_calls"):
            return f"messages.{i}: all messages must have non-empty content"
        if message["role"] == "tool":
            if message.get("tool_call_id") not in expected:
                return f"messages[{i}]: a tool message must answer a preceding tool call"
            expected.discard(message["tool_call_id"])
            continue
        if expected:
            return f"messages[{i}]: tool_call_ids did not have response messages: {expected}"
        expected = {c["id"] for c in message.get("tool_calls") or []}
    return f"tool_call_ids did not have response messages: {expected}" if expected else None


async def _chat(request: Request) -> Response:
    body = orjson.loads(await request.body())
    messages: list[dict[str, Any]] = body["messages"]
    SEEN.append(messages)
    problem = vendor_problem(messages)
    if problem is not None:
        error = {"message": problem, "type": "invalid_request_error", "code": None}
        return JSONResponse({"error": error}, status_code=400)
    last = messages[-1]
    calls = last["role"] == "user" and "[[call]]" in str(last["content"])

    async def frames() -> AsyncIterator[bytes]:
        if calls:
            for index in (0, 1):
                call = {
                    "index": index,
                    "id": f"call_{len(SEEN)}_{index}",
                    "type": "function",
                    "function": {"name": "lookup", "arguments": "{}"},
                }
                yield sse_frame({"choices": [{"index": 0, "delta": {"tool_calls": [call]}}]})
            finish = "tool_calls"
        else:
            yield sse_frame({"choices": [{"index": 0, "delta": {"content": "ok"}}]})
            finish = "stop"
        yield sse_frame({"choices": [{"index": 0, "delta": {}, "finish_reason": finish}]})
        usage = {"prompt_tokens": 20, "completion_tokens": 5, "total_tokens": 25}
        yield sse_frame({"choices": [], "usage": usage})
        yield b"data: [DONE]\n\n"

    return StreamingResponse(frames(), media_type="text/event-stream")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessStack]:
    directory: Path = tmp_path_factory.mktemp("pairs")
    with hostile_backend_stack(
        directory, "strict", _chat, features=("streaming", "tools")
    ) as gateway:
        yield gateway


def _turn(stack: InProcessStack, token: str, body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """One turn streamed to its end: its last event's name, and its usage record."""
    c = stack.client
    grant = c.init_ok(token, {"model": MODEL, "tools": TOOLS, **body})
    decoder, events = SSEDecoder(), []
    with c.http.stream("GET", grant["stream_url"]) as response:
        assert response.status_code == 200, response.read()
        for raw in response.iter_raw():
            events.extend(decoder.feed(raw))
    return events[-1].event, c.wait_usage(token, grant["reservation_id"])


def _roles(stack: InProcessStack, token: str, session_id: str) -> list[str]:
    response = stack.client.as_user(token, "GET", f"/v1/sessions/{session_id}")
    assert response.status_code == 200, response.text
    return [m["role"] for m in response.json()["data"]["messages"]]


def _calls(stack: InProcessStack, token: str, session_id: str) -> list[str]:
    response = stack.client.as_user(token, "GET", f"/v1/sessions/{session_id}")
    stored = response.json()["data"]["messages"]
    return [c["id"] for m in stored for c in m.get("tool_calls") or []]


def _session_with_open_calls(stack: InProcessStack, token: str) -> str:
    last, record = _turn(stack, token, {"query": "[[call]] look both up"})
    assert last == "complete" and record["status"] == "completed"
    session_id: str = record["session_id"]
    assert _roles(stack, token, session_id) == ["user", "assistant"]
    assert len(_calls(stack, token, session_id)) == 2
    return session_id


def test_a_query_over_unanswered_tool_calls_does_not_break_the_session(
    stack: InProcessStack,
) -> None:
    c = stack.client
    token = c.new_user(c.new_company("100"))
    sid = _session_with_open_calls(stack, token)
    SEEN.clear()
    # The member answers the calls with a question instead of their results.
    last, record = _turn(stack, token, {"session_id": sid, "query": "never mind, hello"})
    assert vendor_problem(SEEN[-1]) is None, SEEN[-1]  # before: the calls went unanswered
    assert last == "complete" and record["status"] == "completed"
    # And every later turn of the session still runs.
    last, record = _turn(stack, token, {"session_id": sid, "query": "and now?"})
    assert vendor_problem(SEEN[-1]) is None, SEEN[-1]
    assert last == "complete" and record["status"] == "completed"
    # The transcript keeps what happened; only what is sent is paired.
    assert _roles(stack, token, sid) == [
        "user",
        "assistant",
        "user",
        "assistant",
        "user",
        "assistant",
    ]


def test_results_for_some_of_the_calls_do_not_break_the_session(stack: InProcessStack) -> None:
    c = stack.client
    token = c.new_user(c.new_company("100"))
    sid = _session_with_open_calls(stack, token)
    first, _second = _calls(stack, token, sid)
    SEEN.clear()
    results = [{"tool_call_id": first, "content": "42"}]
    last, record = _turn(stack, token, {"session_id": sid, "tool_results": results})
    assert vendor_problem(SEEN[-1]) is None, SEEN[-1]
    assert last == "complete" and record["status"] == "completed"
    last, record = _turn(stack, token, {"session_id": sid, "query": "thanks"})
    assert vendor_problem(SEEN[-1]) is None, SEEN[-1]
    assert last == "complete" and record["status"] == "completed"
    sent = SEEN[-1]
    # The answered call and its result went together; the other call did not go.
    assert [m["role"] for m in sent] == ["user", "assistant", "tool", "assistant", "user"]
    assert [call["id"] for call in sent[1]["tool_calls"]] == [first]


def test_results_for_calls_of_an_older_assistant_message_are_refused(
    stack: InProcessStack,
) -> None:
    """A result stored after other turns could never be sent next to its call."""
    c = stack.client
    token = c.new_user(c.new_company("100"))
    sid = _session_with_open_calls(stack, token)
    first, _second = _calls(stack, token, sid)
    _turn(stack, token, {"session_id": sid, "query": "something else"})
    before = c.credits(token)
    response = c.init(
        token,
        {
            "model": MODEL,
            "tools": TOOLS,
            "session_id": sid,
            "tool_results": [{"tool_call_id": first, "content": "late"}],
        },
    )
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "validation_error"
    assert c.credits(token) == before
    assert _roles(stack, token, sid) == ["user", "assistant", "user", "assistant"]


def _a(*ids: str, content: str = "") -> dict[str, Any]:
    calls = [
        {"id": i, "type": "function", "function": {"name": "f", "arguments": "{}"}} for i in ids
    ]
    return {"role": "assistant", "content": content, "tool_calls": calls}


def _t(call_id: str) -> dict[str, Any]:
    return {"role": "tool", "content": "r", "tool_call_id": call_id}


U = {"role": "user", "content": "q"}


@pytest.mark.parametrize(
    ("stored", "sent"),
    [
        ([U, _a("a", "b"), _t("a"), _t("b"), U], [U, _a("a", "b"), _t("a"), _t("b"), U]),
        ([U, _a("a", "b"), U], [U, U]),  # answered by a query
        ([U, _a("a", content="hm"), U], [U, {"role": "assistant", "content": "hm"}, U]),
        ([U, _a("a", "b"), _t("b"), U], [U, _a("b"), _t("b"), U]),  # some answered
        ([U, _a("a"), _t("a"), _t("a")], [U, _a("a"), _t("a")]),  # answered twice
        ([U, _a("a", "a"), _t("a")], [U, _a("a"), _t("a")]),  # one id called twice
        # A turn settled between two others: the result is not next to its call.
        (
            [U, U, _a("a"), {"role": "assistant", "content": "x"}, _t("a")],
            [U, U, {"role": "assistant", "content": "x"}],
        ),
    ],
)
def test_a_stored_history_is_sent_with_each_call_next_to_its_results(
    stored: list[dict[str, Any]], sent: list[dict[str, Any]]
) -> None:
    assert paired(stored) == sent
    assert vendor_problem(paired(stored)) is None


def test_an_empty_message_stored_in_a_session_is_not_sent_again(stack: InProcessStack) -> None:
    """Attack: a client-owned history holding an empty message (OpenAI takes it) starts
    a session; the session keeps it, and every later turn sent it to a vendor that
    refuses empty content (Anthropic): the session was broken for good."""
    c = stack.client
    token = c.new_user(c.new_company("100"))
    grant = c.init_ok(
        token,
        {
            "model": MODEL,
            "messages": [
                {"role": "user", "content": ""},
                {"role": "assistant", "content": "?"},
                {"role": "user", "content": "hello"},
            ],
        },
    )
    sid = grant["session_id"]
    with c.http.stream("GET", grant["stream_url"]) as response:
        response.read()  # the client's own history: refused as sent, its own choice
    c.wait_usage(token, grant["reservation_id"])
    SEEN.clear()
    last, record = _turn(stack, token, {"session_id": sid, "query": "and now?"})
    assert vendor_problem(SEEN[-1]) is None, SEEN[-1]
    assert last == "complete" and record["status"] == "completed"
    assert _roles(stack, token, sid)[:3] == ["user", "assistant", "user"]  # kept as stored
