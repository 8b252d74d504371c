"""Sampling parameters passed through to the backend (`shared/sampling.py`): init and
the edge's ``/v1/chat/completions`` apply one rule.

Init refused more than 4 stop sequences, an object for a temperature, a 1 KB end-user
id; the edge took a stream token's body and passed the same parameters on as sent
(measured, on a token with room for them: 1,000 stop sequences, a temperature of
``"hot"``, a 1,000-character end-user id: 200 each, the token used), leaving each
vendor to refuse them or not. Now the edge refuses them with 400 in
OpenAI's shape, before the token is used. The whole gateway in one event loop
(`tests/inproc.py`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from shared.input_size import InputRejected
from shared.sampling import STOP_MAX, USER_MAX, check_sampling_params
from tests.inproc import Gateway, gateway_env

on_loop = pytest.mark.asyncio(loop_scope="module")

HI = {"role": "user", "content": "hi [[mock tokens=2]]"}
BAD_PARAMS: list[tuple[dict[str, Any], str]] = [
    ({"stop": [f"s{i}" for i in range(STOP_MAX + 1)]}, "stop"),
    ({"stop": [f"s{i}" for i in range(10_000)]}, "stop"),
    ({"stop": []}, "stop"),
    ({"stop": [""]}, "stop"),
    ({"stop": {"a": 1}}, "stop"),
    ({"stop": ["x", 3]}, "stop"),
    ({"temperature": "hot"}, "temperature"),
    ({"temperature": 2.5}, "temperature"),
    ({"top_p": True}, "top_p"),
    ({"presence_penalty": -3}, "presence_penalty"),
    ({"frequency_penalty": [1]}, "frequency_penalty"),
    ({"seed": 2**63}, "seed"),
    ({"seed": 1.5}, "seed"),
    ({"user": "u" * (USER_MAX + 1)}, "user"),
    ({"user": " "}, "user"),
]


@pytest.mark.parametrize(("doc", "field"), BAD_PARAMS)
def test_bad_sampling_params_name_their_field(doc: dict[str, Any], field: str) -> None:
    with pytest.raises(InputRejected) as caught:
        check_sampling_params(doc)
    assert (caught.value.code, caught.value.where) == ("invalid_parameter", field)


def test_good_sampling_params_pass_and_nulls_are_dropped() -> None:
    doc = {
        "temperature": 0,
        "top_p": 1,
        "presence_penalty": -2,
        "frequency_penalty": 2.0,
        "seed": -(2**63) + 1,
        "user": "end-user",
        "stop": "END",
        "max_tokens": 3,  # not a sampling parameter: not ours here
    }
    expected = {k: v for k, v in doc.items() if k != "max_tokens"} | {"stop": ["END"]}
    assert check_sampling_params(doc) == expected
    assert check_sampling_params({"stop": ["a"] * STOP_MAX})["stop"] == ["a"] * STOP_MAX
    assert check_sampling_params({"temperature": None, "stop": None}) == {}


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def gw(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Gateway]:
    async with Gateway(gateway_env(str(tmp_path_factory.mktemp("sampling")))) as gateway:
        yield gateway


@on_loop
async def test_the_edge_refuses_the_sampling_params_init_refuses(gw: Gateway) -> None:
    """Attack: a stream token's holder sends the edge what init refuses (5 or 10,000
    stop sequences, a temperature of "hot", a 1 KB end-user id): each is 400 at init
    and at the edge alike, the token stays unused, and a good body then streams."""
    user = await gw.new_user()
    good = {"messages": [HI], "stop": ["a"] * STOP_MAX, "temperature": 0.5, "user": "u"}
    token = (await gw.init_ok(user, {**good, "max_tokens": 16}))["stream_token"]
    for params, field in BAD_PARAMS:
        status, answer = await gw.complete(token, {"messages": [HI], **params})
        assert status == 400, (params, answer)
        assert answer["error"]["code"] == f"invalid_{field}", answer
        assert answer["error"]["type"] == "invalid_request_error"
        assert answer["error"]["message"].startswith(f"{field}: "), answer
        refused = await gw.http.post(
            "/v1/chat/init",
            json={"messages": [HI], "max_tokens": 16, **params},
            headers={"Authorization": f"Bearer {user}"},
        )
        assert refused.status_code == 422, refused.text
        assert refused.json()["error"]["code"] == "validation_error"
    status, answer = await gw.complete(token, good)
    assert status == 200, answer
    assert answer["choices"][0]["message"]["content"]
