"""The tool loop end to end on real servers, for a model on each adapter.

The official `openai` client, unchanged, runs the loop through the edge: call →
run the function → send the result → final answer (one init per turn, as every
request needs its own stream token). With a stored session, init takes
`tool_results` instead of `query`; the EventSource sends one `tool_call` event per
call before `complete`, and the session's transcript keeps the calls and results.
Malformed tool input at init is a 4xx that holds nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import openai
import orjson
import pytest

from shared.sse import ServerSentEvent, SSEDecoder
from tests.adapter_stack import AdapterStack
from tests.stack import base_env

WORKING = ["claude-test", "gemini-test", "gpt-test", "inhouse-test"]
TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                "required": ["city"],
            },
        },
    }
]


def get_weather(city: str, days: int = 1) -> str:
    return orjson.dumps({"city": city, "days": days, "sky": "clear"}).decode()


@pytest.fixture(scope="module")
def vendors(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AdapterStack]:
    workdir = tmp_path_factory.mktemp("tools")
    with AdapterStack(base_env(f"sqlite:///{workdir / 'gateway.db'}"), workdir) as stack:
        yield stack


@pytest.fixture(scope="module")
def user_token(vendors: AdapterStack) -> str:
    c = vendors.client
    return c.new_user(c.new_company("100"))


def edge(vendors: AdapterStack, grant: dict[str, Any]) -> openai.OpenAI:
    return vendors.client.openai(grant["stream_token"], max_retries=0)


@pytest.mark.parametrize("model", WORKING)
def test_openai_client_tool_loop_through_the_edge(
    vendors: AdapterStack, user_token: str, model: str
) -> None:
    messages: list[Any] = [
        {"role": "user", "content": f"Weather for two cities on {model}? [[mock tool_calls=2]]"}
    ]
    grant = vendors.client.init_ok(
        user_token,
        {"model": model, "messages": messages, "tools": TOOLS, "parallel_tool_calls": True},
    )
    first = edge(vendors, grant).chat.completions.create(
        model=model, messages=messages, tools=TOOLS, parallel_tool_calls=True
    )
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls or []
    assert [c.function.name for c in calls] == ["get_weather", "get_weather"]
    assert len({c.id for c in calls}) == 2
    record = vendors.client.wait_usage(user_token, grant["reservation_id"])
    assert record["status"] == "completed" and record["output_tokens"] > 0

    # Run the functions; send the results with the history (the client owns it).
    messages.append(choice.message.model_dump(exclude_none=True))
    for call in calls:
        result = get_weather(**orjson.loads(call.function.arguments))
        messages.append({"role": "tool", "tool_call_id": call.id, "content": result})
    grant = vendors.client.init_ok(
        user_token,
        {"model": model, "messages": messages, "tools": TOOLS, "session_id": grant["session_id"]},
    )
    with edge(vendors, grant).chat.completions.stream(
        model=model, messages=messages, tools=TOOLS
    ) as stream:
        final = stream.get_final_completion()
    assert final.choices[0].finish_reason == "stop"
    assert final.choices[0].message.content and not final.choices[0].message.tool_calls

    # And streamed: the client rebuilds the calls from OpenAI-shaped deltas.
    ask = [{"role": "user", "content": f"Again on {model} [[mock tool_calls=2]]"}]
    grant = vendors.client.init_ok(user_token, {"model": model, "messages": ask, "tools": TOOLS})
    with edge(vendors, grant).chat.completions.stream(
        model=model, messages=ask, tools=TOOLS
    ) as stream:
        streamed = stream.get_final_completion()
    assert streamed.choices[0].finish_reason == "tool_calls"
    rebuilt = streamed.choices[0].message.tool_calls or []
    assert len(rebuilt) == 2
    for call in rebuilt:
        assert call.function.name == "get_weather" and call.id
        assert set(orjson.loads(call.function.arguments)) == {"city", "days"}


def eventsource(vendors: AdapterStack, url: str) -> list[ServerSentEvent]:
    decoder, out = SSEDecoder(), []
    with vendors.client.http.stream("GET", url) as response:
        assert response.status_code == 200, response.read()
        for raw in response.iter_raw():
            out.extend(decoder.feed(raw))
    return out


def session_messages(vendors: AdapterStack, token: str, session_id: str) -> list[dict[str, Any]]:
    response = vendors.client.as_user(token, "GET", f"/v1/sessions/{session_id}")
    assert response.status_code == 200, response.text
    found: list[dict[str, Any]] = response.json()["data"]["messages"]
    return found


@pytest.mark.parametrize("model", ["claude-test", "gemini-test"])
def test_stored_session_tool_loop_over_eventsource(
    vendors: AdapterStack, user_token: str, model: str
) -> None:
    c = vendors.client
    question = f"Plan my trip on {model} [[mock tool_calls=2]]"
    grant = c.init_ok(user_token, {"model": model, "query": question, "tools": TOOLS})
    received = eventsource(vendors, grant["stream_url"])
    kinds = [e.event for e in received]
    assert kinds[-3:] == ["tool_call", "tool_call", "complete"]
    calls = [orjson.loads(e.data) for e in received if e.event == "tool_call"]
    assert [(call["index"], call["name"]) for call in calls] == [
        (0, "get_weather"),
        (1, "get_weather"),
    ]
    assert all(isinstance(call["arguments"], str) and call["id"] for call in calls)
    assert orjson.loads(received[-1].data)["finish_reason"] == "tool_calls"
    c.wait_usage(user_token, grant["reservation_id"])

    stored = session_messages(vendors, user_token, grant["session_id"])
    assert [m["role"] for m in stored] == ["user", "assistant"]
    assert [t["id"] for t in stored[1]["tool_calls"]] == [call["id"] for call in calls]

    results = [
        {"tool_call_id": call["id"], "content": get_weather(**orjson.loads(call["arguments"]))}
        for call in calls
    ]
    grant = c.init_ok(
        user_token,
        {
            "model": model,
            "session_id": grant["session_id"],
            "tool_results": results,
            "tools": TOOLS,
        },
    )
    received = eventsource(vendors, grant["stream_url"])
    assert "tool_call" not in [e.event for e in received]
    assert orjson.loads(received[-1].data)["finish_reason"] == "stop"
    c.wait_usage(user_token, grant["reservation_id"])
    stored = session_messages(vendors, user_token, grant["session_id"])
    assert [m["role"] for m in stored] == ["user", "assistant", "tool", "tool", "assistant"]
    assert [m["tool_call_id"] for m in stored[2:4]] == [call["id"] for call in calls]
    assert stored[4]["content"]


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"tool_results": [{"tool_call_id": "call_x", "content": "1"}]}, 422),
        ({"messages": [{"role": "tool", "tool_call_id": "call_x", "content": "1"}]}, 422),
        ({"messages": [{"role": "user", "content": "hi"}], "tool_choice": "sometimes"}, 422),
        (
            {
                "messages": [{"role": "user", "content": "hi"}],
                "tools": TOOLS,
                "parallel_tool_calls": 1,
            },
            422,
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [
                            {"id": "c1", "type": "function", "function": {"name": "get_weather"}}
                        ],
                    },
                ]
            },
            422,
        ),
        ({"query": "hi", "tool_results": [{"tool_call_id": "c", "content": "1"}]}, 422),
    ],
)
def test_bad_tool_input_at_init_is_a_4xx_and_holds_nothing(
    vendors: AdapterStack, user_token: str, body: dict[str, Any], status: int
) -> None:
    before = vendors.client.credits(user_token)
    response = vendors.client.init(user_token, {"model": "gpt-test", **body})
    assert response.status_code == status, response.text
    assert response.json()["success"] is False and response.json()["error"]["code"]
    assert vendors.client.credits(user_token) == before


def test_tool_results_must_answer_the_sessions_open_calls(
    vendors: AdapterStack, user_token: str
) -> None:
    c = vendors.client
    grant = c.init_ok(user_token, {"model": "gpt-test", "query": "Hello [[mock tokens=3]]"})
    eventsource(vendors, grant["stream_url"])
    c.wait_usage(user_token, grant["reservation_id"])
    before = c.credits(user_token)
    response = c.init(
        user_token,
        {
            "model": "gpt-test",
            "session_id": grant["session_id"],
            "tool_results": [{"tool_call_id": "call_never_made", "content": "x"}],
        },
    )
    assert response.status_code == 422, response.text
    assert c.credits(user_token) == before
    assert [m["role"] for m in session_messages(vendors, user_token, grant["session_id"])] == [
        "user",
        "assistant",
    ]


def test_tool_results_before_the_previous_turn_settled_are_409_turn_in_progress(
    vendors: AdapterStack, user_token: str
) -> None:
    """The calls reach the session with the turn's usage webhook: results sent while
    that turn still holds credits get 409 `turn_in_progress` (retry), not a 422,
    and nothing is held or stored."""
    c = vendors.client
    grant = c.init_ok(user_token, {"model": "gpt-test", "query": "Hello [[mock tokens=3]]"})
    before = c.credits(user_token)  # the first turn's hold is still active: not streamed
    response = c.init(
        user_token,
        {
            "model": "gpt-test",
            "session_id": grant["session_id"],
            "tool_results": [{"tool_call_id": "call_not_yet_stored", "content": "x"}],
        },
    )
    assert response.status_code == 409, response.text
    assert response.json()["error"]["code"] == "turn_in_progress"
    assert response.headers["retry-after"] == "1"
    assert c.credits(user_token) == before
    assert [m["role"] for m in session_messages(vendors, user_token, grant["session_id"])] == [
        "user"
    ]


def test_tool_call_fragments_are_billed_when_the_vendor_reports_no_usage(
    vendors: AdapterStack, user_token: str
) -> None:
    ask = [{"role": "user", "content": "Weather? [[mock tool_calls=2 usage=0]]"}]
    grant = vendors.client.init_ok(
        user_token, {"model": "claude-test", "messages": ask, "tools": TOOLS}
    )
    with edge(vendors, grant).chat.completions.stream(
        model="claude-test", messages=ask, tools=TOOLS
    ) as stream:
        answer = stream.get_final_completion()
    calls = answer.choices[0].message.tool_calls or []
    assert len(calls) == 2
    record = vendors.client.wait_usage(user_token, grant["reservation_id"])
    assert record["usage_source"] == "estimated"
    # One token per 4 bytes of the calls' names and arguments, at least.
    size = sum(len(c.function.name) + len(c.function.arguments.encode()) for c in calls)
    assert record["output_tokens"] >= size // 4 > 0


def test_bad_tool_input_at_the_edge_is_a_400_and_keeps_the_token(
    vendors: AdapterStack, user_token: str
) -> None:
    ask = [{"role": "user", "content": "Weather? [[mock tool_calls=1]]"}]
    grant = vendors.client.init_ok(
        user_token, {"model": "gpt-test", "messages": ask, "tools": TOOLS}
    )
    url = f"{vendors.client.edge_url}/v1/chat/completions"
    headers = {"Authorization": f"Bearer {grant['stream_token']}"}
    for bad, code in [
        ({"tools": [{"type": "function", "function": {"name": "no spaces"}}]}, "invalid_tools"),
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "x"}}},
            "invalid_tools",
        ),
        (
            {"messages": [*ask, {"role": "tool", "tool_call_id": "call_x", "content": "1"}]},
            "invalid_tool_call",
        ),
    ]:
        response = vendors.client.http.post(
            url, json={"model": "gpt-test", "messages": ask, **bad}, headers=headers
        )
        assert response.status_code == 400, response.text
        assert response.json()["error"]["code"] == code
    # Refused before the token was claimed: the right request still runs.
    good = edge(vendors, grant).chat.completions.create(model="gpt-test", messages=ask, tools=TOOLS)
    assert good.choices[0].finish_reason == "tool_calls"
