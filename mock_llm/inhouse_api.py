"""A stand-in for an in-house SSE service: ``POST /sse/chat``.

It takes ``{"messages", "max_tokens"?, "model"?}`` and answers only as a stream:
``data: {"delta": "…"}`` per token, then
``data: {"usage": {"input": n, "output": n}, "finish": "stop"}`` and ``data: [DONE]``.
Tool calls (``[[mock tool_calls=N]]`` with OpenAI-shaped ``tools``) stream as
``data: {"tool_calls": [{"index", "id"?, "function": {"name"?, "arguments"}}]}``.
A mid-stream failure is ``data: {"error": {"message": …}}``. It trusts the gateway:
when the mock has a service token, ``X-Service-Token`` must carry it, and the caller's
context headers are logged for tests (``GET /_mock/requests``).
"""

from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from mock_llm.errors import MockAPIError
from mock_llm.request import invalid, parse_messages, positive_int
from mock_llm.script import Completion
from mock_llm.server import MockServer, require_json, secret_matches
from mock_llm.tools import openai_tools

DEFAULT_MODEL = "mock-fast"


def _frame(doc: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(doc) + b"\n\n"


class DeltaFrames:
    def __init__(self, completion: Completion, report_usage: bool) -> None:
        self._completion = completion
        self._report_usage = report_usage

    def head(self) -> bytes:
        return b""

    def token(self, index: int, text: str) -> bytes:
        if not self._completion.calls:
            return _frame({"delta": text})
        number, first = self._completion.owner(index)
        call: dict[str, Any] = {"index": number, "function": {"arguments": text}}
        if first:
            call["id"] = self._completion.calls[number].id
            call["function"]["name"] = self._completion.calls[number].name
        return _frame({"tool_calls": [call]})

    def tail(self) -> bytes:
        last: dict[str, Any] = {"finish": self._completion.finish_reason}
        if self._report_usage:
            tokens = len(self._completion.tokens)
            last = {"usage": {"input": self._completion.prompt_tokens, "output": tokens}, **last}
        return _frame(last) + b"data: [DONE]\n\n"

    def error(self) -> bytes:
        return _frame({"error": {"message": "mock: failing mid-stream as asked"}})


def routes(server: MockServer) -> list[Route]:
    async def chat(request: Request) -> Response:
        body = await server.accept(request)
        if server.service_token is not None and not secret_matches(
            request.headers.get("x-service-token"), server.service_token
        ):
            raise MockAPIError(401, "a valid X-Service-Token is required", code="invalid_token")
        body = require_json(body)
        if not isinstance(body, dict):
            raise invalid("the request body must be a JSON object", None)
        model = body.get("model", DEFAULT_MODEL)
        if not isinstance(model, str):
            raise invalid("model must be a string", "model")
        messages = parse_messages(body.get("messages"))
        max_tokens = positive_int(body, "max_tokens")
        tools = openai_tools(body.get("tools"))
        completion, behaviour = server.plan(model, messages, request.headers, max_tokens, tools)
        return server.stream(DeltaFrames(completion, behaviour.report_usage), completion, behaviour)

    return [Route("/sse/chat", chat, methods=["POST"])]
