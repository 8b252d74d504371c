"""The packaged catalog plus one OpenAI-compatible provider and model of a test's own
(a hostile or unusual backend on the test's socket), written for `LLMGW_MODELS_FILE`;
and the gateway in this process in front of such a backend."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import yaml
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from tests.conftest import REDIS_URL
from tests.harness import ServerGroup, bind_free_socket, url_of
from tests.stack import InProcessStack, base_env

PACKAGED = Path(__file__).parent.parent / "shared" / "models.yaml"


def catalog_with_backend(
    directory: Path,
    provider: str,
    backend_url: str,
    *,
    context_length: int,
    max_output_tokens: int,
    features: tuple[str, ...] = ("streaming",),
) -> str:
    """Write the catalog to `directory` and return its path: `provider` on
    `backend_url` serves `<provider>-model` (streaming only unless `features` says
    more), at 1 / 2 per million."""
    doc = yaml.safe_load(PACKAGED.read_text())
    doc["providers"][provider] = {"api_type": "openai_chat", "base_url": f"{backend_url}/v1"}
    doc["models"][f"{provider}-model"] = {
        "provider": provider,
        "upstream_model": f"{provider}-model",
        "context_length": context_length,
        "max_output_tokens": max_output_tokens,
        "features": list(features),
        "price": {"input_per_mtok": 1.0, "output_per_mtok": 2.0},
    }
    path = directory / "models.yaml"
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def sse_frame(doc: dict[str, Any]) -> bytes:
    """One SSE event carrying `doc` as JSON, as an OpenAI-compatible backend sends it."""
    return b"data: " + orjson.dumps(doc) + b"\n\n"


def openai_ending(finish_reason: str, prompt_tokens: int, completion_tokens: int) -> list[bytes]:
    """The frames an OpenAI-compatible stream ends with: its finish, its usage, `[DONE]`."""
    usage = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    return [
        sse_frame({"choices": [{"index": 0, "delta": {}, "finish_reason": finish_reason}]}),
        sse_frame({"choices": [], "usage": usage}),
        b"data: [DONE]\n\n",
    ]


def bulky_backend(deltas: int, delta: str) -> Callable[[Request], Awaitable[Response]]:
    """An OpenAI-compatible backend streaming `deltas` deltas of `delta` each, then
    the finish (`stop`) and its usage (10 prompt, 500 completion tokens)."""

    async def chat(request: Request) -> Response:
        async def frames() -> AsyncIterator[bytes]:
            for _ in range(deltas):
                yield sse_frame({"choices": [{"index": 0, "delta": {"content": delta}}]})
            for frame in openai_ending("stop", 10, 500):
                yield frame

        return StreamingResponse(frames(), media_type="text/event-stream")

    return chat


@contextlib.contextmanager
def hostile_backend_stack(
    directory: Path,
    provider: str,
    chat: Callable[[Request], Awaitable[Response]],
    *,
    context_length: int = 8192,
    max_output_tokens: int = 1024,
    redis_prefix: str | None = None,
    env: dict[str, str] | None = None,
    features: tuple[str, ...] = ("streaming",),
) -> Iterator[InProcessStack]:
    """The gateway in this process (SQLite in `directory`; Redis under `redis_prefix`
    when given, else its in-memory store), whose `<provider>-model` streams from
    `chat`, an OpenAI-compatible endpoint of the test's own on a free socket. `env`
    adds to or overrides the gateway's settings; `features`: the model's."""
    sock = bind_free_socket()
    backend = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])
    with ServerGroup([(backend, sock)]):
        database = f"sqlite:///{directory / 'gateway.db'}"
        settings = (
            base_env(database)
            if redis_prefix is None
            else base_env(database, REDIS_URL, redis_prefix)
        )
        settings["LLMGW_MODELS_FILE"] = catalog_with_backend(
            directory,
            provider,
            url_of(sock),
            context_length=context_length,
            max_output_tokens=max_output_tokens,
            features=features,
        )
        settings.update(env or {})
        with InProcessStack(settings) as gateway:
            yield gateway
