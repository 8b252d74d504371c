"""What a backend sends before its first token, while the edge waits for it to commit
to that backend (a fallback is left: `fallback.await_first_token`), is bounded.

Attack (measured before the fix): a backend the chain's first model runs on (an
in-house one, a company's own route to a server it controls) answers at once, then
sends megabytes of what is no token (SSE comments, role-only chunks) before its
first one. The edge kept every chunk of it to replay once committed: 24 MB sent
before the token, 27 MB traced in the edge (43 MB for 40 MB sent), growing for as
long as the first-token timeout allows (60 s at network speed), per stream. The
relay, which holds nothing past one read, never had this problem; only the wait for
the first token did."""

from __future__ import annotations

import tracemalloc
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import yaml
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from tests.harness import ServerGroup, bind_free_socket, url_of
from tests.hostile_catalog import catalog_with_backend, openai_ending, sse_frame
from tests.stack import InProcessStack, base_env

CHUNKS = 24
COMMENT = b": " + b"x" * 999_996 + b"\n\n"  # 1 MB of nothing a parser yields
MB = 1_000_000


async def _chat(request: Request) -> Response:
    """Headers at once, then 24 MB of comments, then an answer."""

    async def frames() -> AsyncIterator[bytes]:
        for _ in range(CHUNKS):
            yield COMMENT
        yield sse_frame({"choices": [{"index": 0, "delta": {"content": "late"}}]})
        for frame in openai_ending("stop", 10, 1):
            yield frame

    return StreamingResponse(frames(), media_type="text/event-stream")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessStack]:
    directory: Path = tmp_path_factory.mktemp("fallback-head")
    sock = bind_free_socket()
    backend = Starlette(routes=[Route("/v1/chat/completions", _chat, methods=["POST"])])
    with ServerGroup([(backend, sock)]):
        path = Path(
            catalog_with_backend(
                directory, "hoard", url_of(sock), context_length=8192, max_output_tokens=1024
            )
        )
        doc = yaml.safe_load(path.read_text())
        doc["models"]["hoard-model"]["fallbacks"] = ["mock-fast"]
        path.write_text(yaml.safe_dump(doc))
        env = {
            **base_env(f"sqlite:///{directory / 'gateway.db'}"),
            "LLMGW_MODELS_FILE": str(path),
            "LLMGW_UPSTREAM_RETRIES": "0",
        }
        with InProcessStack(env) as gateway:
            yield gateway


def test_what_a_backend_sends_before_its_first_token_is_bounded(stack: InProcessStack) -> None:
    c = stack.client
    token = c.new_user(c.new_company("100"))
    messages = [{"role": "user", "content": "hello [[mock tokens=3]]"}]
    grant = c.init_ok(token, {"model": "hoard-model", "messages": messages})
    tracemalloc.start()  # the edge serves in this process: its allocations are traced
    try:
        answer = c.http.post(
            f"{c.edge_url}/v1/chat/completions",
            headers={"Authorization": f"Bearer {grant['stream_token']}"},
            json={"messages": messages, "stream": True},
            timeout=60,
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert answer.status_code == 200
    assert peak < 12 * MB, f"{peak / MB:.0f} MB traced"
    # The backend that hoarded was given up for the chain's next model, which served.
    assert b"data: [DONE]" in answer.content
    record = c.wait_usage(token, grant["reservation_id"], timeout=30)
    assert (record["status"], record["model"]) == ("completed", "mock-fast")
