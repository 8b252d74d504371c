"""OpenAI Chat Completions: ``POST /v1/chat/completions`` and ``GET /v1/models``.

Shapes follow https://platform.openai.com/docs/api-reference/chat/streaming: every
chunk of one stream shares ``id`` and ``created``; the first delta carries the role,
then one delta per token, then an empty delta with ``finish_reason``; when
``stream_options.include_usage`` is set every chunk has ``"usage": null`` and a last
chunk with ``choices: []`` carries the counts; ``data: [DONE]`` ends the stream.
Auth is ``Authorization: Bearer <key>``.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from mock_llm.errors import MockAPIError
from mock_llm.request import parse_chat_request
from mock_llm.script import Completion
from mock_llm.server import MockServer, json_response, require_json, secret_matches

SYSTEM_FINGERPRINT = "fp_mock"
DONE_FRAME = b"data: [DONE]\n\n"
# A fixed timestamp keeps /v1/models byte-for-byte stable across restarts.
_MODELS_CREATED = 1_700_000_000


def sse_frame(payload: dict[str, Any]) -> bytes:
    # orjson never emits a raw newline, so one ``data:`` line always suffices.
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def usage(completion: Completion) -> dict[str, Any]:
    # OpenAI counts cached tokens inside prompt_tokens and reasoning inside
    # completion_tokens; it reports no cache writes. xAI (`reasoning_apart`) counts
    # the reasoning beside completion_tokens; its total_tokens has both.
    output = completion.output_tokens
    doc: dict[str, Any] = {
        "prompt_tokens": completion.prompt_tokens,
        "completion_tokens": len(completion.tokens) if completion.reasoning_apart else output,
        "total_tokens": completion.prompt_tokens + output,
    }
    if completion.cached_tokens:
        doc["prompt_tokens_details"] = {"cached_tokens": completion.cached_tokens}
    if completion.reasoning_tokens:
        doc["completion_tokens_details"] = {"reasoning_tokens": completion.reasoning_tokens}
    return doc


def tool_calls(completion: Completion) -> list[dict[str, Any]]:
    return [
        {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
        for c in completion.calls
    ]


def completion_object(model: str, completion: Completion, report_usage: bool) -> dict[str, Any]:
    """The ``chat.completion`` object answered when ``stream`` is false."""
    message: dict[str, Any] = {"role": "assistant", "content": completion.text, "refusal": None}
    if completion.calls:
        message.update(content=None, tool_calls=tool_calls(completion))
    body: dict[str, Any] = {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": SYSTEM_FINGERPRINT,
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": completion.finish_reason,
            }
        ],
    }
    if report_usage:
        body["usage"] = usage(completion)
    return body


class ChunkFrames:
    """The frames of one stream, sharing its id and timestamp."""

    def __init__(
        self, model: str, completion: Completion, include_usage: bool, report_usage: bool
    ) -> None:
        self._model = model
        self._completion = completion
        self._include_usage = include_usage
        self._report_usage = report_usage
        self._id = f"chatcmpl-{uuid.uuid4().hex}"
        self._created = int(time.time())

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> bytes:
        chunk: dict[str, Any] = {
            "id": self._id,
            "object": "chat.completion.chunk",
            "created": self._created,
            "model": self._model,
            "system_fingerprint": SYSTEM_FINGERPRINT,
            "choices": choices,
        }
        if self._include_usage:
            chunk["usage"] = None
        chunk.update(extra)
        return sse_frame(chunk)

    def _choice(self, delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return self._chunk([choice])

    def head(self) -> bytes:
        if self._completion.calls:
            return self._choice({"role": "assistant", "content": None})
        return self._choice({"role": "assistant", "content": ""})

    def token(self, index: int, text: str) -> bytes:
        if not self._completion.calls:
            return self._choice({"content": text})
        # As OpenAI streams calls: the first chunk of a call names it with empty
        # arguments; then the argument fragments, with only their index.
        number, first = self._completion.owner(index)
        frames = b""
        if first:
            call = self._completion.calls[number]
            function = {"name": call.name, "arguments": ""}
            start = {"index": number, "id": call.id, "type": "function", "function": function}
            frames = self._choice({"tool_calls": [start]})
        if not text:
            return frames
        fragment = {"index": number, "function": {"arguments": text}}
        return frames + self._choice({"tool_calls": [fragment]})

    def tail(self) -> bytes:
        frames = [self._choice({}, self._completion.finish_reason)]
        if self._include_usage and self._report_usage:
            frames.append(self._chunk([], usage=usage(self._completion)))
        frames.append(DONE_FRAME)
        return b"".join(frames)

    def error(self) -> bytes:
        error = {"message": "mock: failing mid-stream as asked", "type": "server_error"}
        return sse_frame({"error": {**error, "param": None, "code": "mock_stream_error"}})


def routes(server: MockServer) -> list[Route]:
    def authorize(request: Request) -> None:
        if server.api_key is None:
            return
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme != "Bearer" or not secret_matches(key, server.api_key):
            raise MockAPIError(401, "Incorrect API key provided.", code="invalid_api_key")

    async def chat_completions(request: Request) -> Response:
        body = await server.accept(request)
        authorize(request)
        chat = parse_chat_request(require_json(body))
        completion, behaviour = server.plan(
            chat.model, chat.messages, request.headers, chat.max_tokens, chat.tools
        )
        if chat.stream:
            frames = ChunkFrames(chat.model, completion, chat.include_usage, behaviour.report_usage)
            return server.stream(frames, completion, behaviour)
        await server.whole(request, completion, behaviour)
        return json_response(completion_object(chat.model, completion, behaviour.report_usage))

    async def list_models(request: Request) -> Response:
        authorize(request)
        data = [
            {"id": name, "object": "model", "created": _MODELS_CREATED, "owned_by": "mock"}
            for name in server.models
        ]
        return json_response({"object": "list", "data": data})

    return [
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/models", list_models, methods=["GET"]),
    ]
