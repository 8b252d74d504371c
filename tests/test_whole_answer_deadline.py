"""A whole answer (`"stream": false`) has a streamed answer's maximum life.

An in-house SSE backend serves a whole answer as a stream the edge reads to its end,
each read within the idle timeout: without a limit of its own, such a request ran
past `LLMGW_MAX_STREAM_SECONDS`, past the slot that expires then and past the hold's
deadline (sized for the longest stream), where the hold of an answer that has no
checkpoint is released for free and its real report becomes a duplicate.

The edge is given a half-second life through its settings (the environment takes
10 s at least), so the test waits for the cut, not for ten seconds."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.adapter_stack import AdapterStack
from tests.stack import base_env

MAX_STREAM_SECONDS = 0.5


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AdapterStack]:
    workdir = tmp_path_factory.mktemp("whole-answer-deadline")
    env = base_env(f"sqlite:///{workdir / 'gateway.db'}")
    life = {"max_stream_seconds": MAX_STREAM_SECONDS}
    with AdapterStack(env, workdir, edge_changes=life) as running:
        yield running


def test_a_whole_answer_cannot_outlive_the_maximum_stream_life(stack: AdapterStack) -> None:
    client = stack.client
    token = client.new_user(client.new_company("100"))
    # 600 tokens 20 ms apart: 12 s of answer, each token well within the idle
    # timeout, 24 times the maximum life.
    slow = "slow [[mock tokens=600 delay_ms=20]]"
    grant = client.init_ok(
        token, {"model": "inhouse-test", "messages": [{"role": "user", "content": slow}]}
    )
    response = client.http.post(
        f"{client.edge_url}/v1/chat/completions",
        headers={"authorization": f"Bearer {grant['stream_token']}"},
        json={"messages": [{"role": "user", "content": slow}], "stream": False},
        timeout=httpx.Timeout(180.0),
    )
    assert response.status_code == 504, response.text
    assert response.json()["error"]["code"] == "upstream_timeout"
    record = client.wait_usage(token, grant["reservation_id"])
    assert record["status"] == "failed"
    # What the backend sent before the cut is billed, read as the stream it is
    # (`completion.bill_unread`): before, nothing was.
    assert record["usage_source"] == "estimated" and record["output_tokens"] > 0
