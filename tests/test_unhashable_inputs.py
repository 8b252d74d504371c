"""A list or an object where a string belongs is a 4xx, never a 500 (review 3B,
finding 3).

`value in SOME_SET` raises TypeError when the value is a list or a dict
(unhashable): a message `role` at the edge and a `tool_choice.function.name` at init
and at the edge (both via `shared/tool_shapes.py`) answered 500 (through an API key,
503). Each is refused before anything is held or claimed: the stream token stays
usable. The whole gateway in one event loop (`tests/inproc.py`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from shared.input_size import InputRejected
from shared.tool_shapes import check_tool_params
from tests.conftest import new_webhook_secret
from tests.inproc import Gateway, gateway_env

on_loop = pytest.mark.asyncio(loop_scope="module")

HI = {"role": "user", "content": "hi [[mock tokens=2]]"}
TOOLS = [{"type": "function", "function": {"name": "f"}}]
BAD_EDGE: list[tuple[dict[str, Any], str]] = [
    ({"messages": [{"role": ["user"], "content": "hi"}]}, "invalid_messages"),
    ({"messages": [{"role": {"user": 1}, "content": "hi"}]}, "invalid_messages"),
    (
        {
            "messages": [HI],
            "tools": TOOLS,
            "tool_choice": {"type": "function", "function": {"name": ["f"]}},
        },
        "invalid_tools",
    ),
    (
        {
            "messages": [HI],
            "tools": TOOLS,
            "tool_choice": {"type": "function", "function": {"name": {"f": 1}}},
        },
        "invalid_tools",
    ),
]


@pytest.mark.parametrize("name", [["f"], {"f": 1}, None, 3])
def test_a_tool_choice_name_that_is_not_a_string_is_invalid_tools(name: Any) -> None:
    doc = {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": name}}}
    with pytest.raises(InputRejected) as info:
        check_tool_params(doc)
    assert (info.value.code, info.value.where) == ("invalid_tools", "tool_choice.function.name")


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def gw(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Gateway]:
    env = gateway_env(
        str(tmp_path_factory.mktemp("unhashable")),
        LLMGW_EDGE_SERVICE_SECRET=new_webhook_secret(),
    )
    async with Gateway(env) as gateway:
        yield gateway


@on_loop
async def test_unhashable_values_at_the_edge_are_400_and_burn_nothing(gw: Gateway) -> None:
    access = await gw.new_user()
    grant = await gw.init_ok(access, {"messages": [HI], "tools": TOOLS, "max_tokens": 16})
    for body, code in BAD_EDGE:
        status, answer = await gw.complete(grant["stream_token"], body)
        assert (status, answer["error"]["code"]) == (400, code), answer
    status, answer = await gw.complete(grant["stream_token"], {"messages": [HI], "tools": TOOLS})
    assert status == 200, answer


@on_loop
async def test_an_unhashable_tool_choice_name_at_init_is_422_and_holds_nothing(
    gw: Gateway,
) -> None:
    access = await gw.new_user()
    before = await gw.credits(access)
    for name in (["f"], {"f": 1}):
        body = {
            "query": "hi",
            "tools": TOOLS,
            "tool_choice": {"type": "function", "function": {"name": name}},
        }
        answer = await gw.http.post(
            "/v1/chat/init", json=body, headers={"Authorization": f"Bearer {access}"}
        )
        assert answer.status_code == 422, answer.text
        assert answer.json()["error"]["code"] == "validation_error"
    assert await gw.credits(access) == before


@on_loop
async def test_an_api_key_callers_unhashable_values_are_400_and_hold_nothing(
    gw: Gateway,
) -> None:
    key = await gw.new_api_key()
    for body, _ in BAD_EDGE:
        status, answer = await gw.complete(key, body)
        assert 400 <= status < 500, answer
    me = await gw.http.get("/v1/me", headers={"Authorization": f"Bearer {key}"})
    assert me.json()["data"]["credits"]["held"] == "0.000000"
