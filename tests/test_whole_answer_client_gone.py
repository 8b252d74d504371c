"""A client that leaves before its whole answer (`"stream": false`) arrives has its
upstream cancelled, as a streamed answer's client has (DESIGN §9, review of the
whole answers).

The edge read the backend's answer to its end whoever was waiting for it: a client
that sent the request and hung up kept the backend generating and the stream's slots
taken for as long as the answer took (up to the stream's maximum life), and the
stream was reported `completed`. A member could start answers and leave them, past
its stream limit in effect. Now the client leaving cancels the read, which closes the
backend's response: the stream is `cancelled`, billed for what was generated (what
was read of an answer the backend sends as a stream; the input estimate for a
vendor's JSON answer, nothing of whose output can be known before its body comes),
and its slots go back. Real sockets: the client leaves by closing its connection.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.adapter_stack import AdapterStack
from tests.polling import wait_until
from tests.stack import base_env

# 600 tokens 20 ms apart: 12 s of answer, which the client does not wait for.
SLOW = "slow [[mock tokens=600 delay_ms=20]]"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AdapterStack]:
    workdir = tmp_path_factory.mktemp("whole-answer-client-gone")
    # One stream at a time per user: the next request shows the slot went back.
    env = {**base_env(f"sqlite:///{workdir / 'gateway.db'}"), "LLMGW_MAX_STREAMS_PER_USER": "1"}
    with AdapterStack(env, workdir) as running:
        yield running


def leave_after_sending(stack: AdapterStack, stream_token: str) -> None:
    """POST a whole answer, then hang up once the edge has had it for a while."""
    with httpx.Client() as http, pytest.raises(httpx.ReadTimeout):
        http.post(
            f"{stack.client.edge_url}/v1/chat/completions",
            headers={"authorization": f"Bearer {stream_token}"},
            json={"messages": [{"role": "user", "content": SLOW}], "stream": False},
            timeout=httpx.Timeout(10.0, read=1.0),
        )


@pytest.mark.parametrize("model", ["inhouse-test", "gpt-test"])
def test_a_client_leaving_a_whole_answer_cancels_the_backend(
    stack: AdapterStack, model: str
) -> None:
    client = stack.client
    token = client.new_user(client.new_company("100"))
    messages = [{"role": "user", "content": SLOW}]
    grant = client.init_ok(token, {"model": model, "messages": messages})
    before = client.mock_stats()
    leave_after_sending(stack, grant["stream_token"])
    # The backend's answer ends (before: 12 s later, generated to its end).
    wait_until(lambda: client.mock_stats()["active"] == before["active"], "the answer ended")
    after = client.mock_stats()
    assert after["cancelled"] == before["cancelled"] + 1, after
    assert after["completed"] == before["completed"], after
    record = client.wait_usage(token, grant["reservation_id"])
    assert record["status"] == "cancelled"
    assert record["usage_source"] == "estimated"
    assert record["input_tokens"] > 0  # the backend processed the prompt
    # Every backend is asked for a whole answer as a stream: what was read of it
    # before the client left (a vendor's JSON document had billed 0 output).
    assert 0 < record["output_tokens"] < 600
    # The stream's slot went back: the user's one allowed stream runs, and a client
    # that stays gets its whole answer.
    quick = [{"role": "user", "content": "quick [[mock tokens=3]]"}]
    grant = client.init_ok(token, {"model": model, "messages": quick})
    response = client.http.post(
        f"{client.edge_url}/v1/chat/completions",
        headers={"authorization": f"Bearer {grant['stream_token']}"},
        json={"messages": quick, "stream": False},
    )
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"]
    assert client.wait_usage(token, grant["reservation_id"])["status"] == "completed"
