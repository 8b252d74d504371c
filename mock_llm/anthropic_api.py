"""Anthropic Messages API: ``POST /v1/messages``.

Shapes follow https://docs.anthropic.com/en/api/messages-streaming: named events
``message_start`` (input tokens, and a placeholder ``output_tokens: 1``),
``content_block_start``, ``ping``, one ``content_block_delta`` (``text_delta``) per
token, ``content_block_stop``, ``message_delta`` (stop reason, cumulative usage) and
``message_stop``; a mid-stream failure is an ``error`` event. Auth is ``x-api-key``
(or ``Authorization: Bearer``, which recent official clients send), and
``anthropic-version`` is required, as on the real API.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from mock_llm.errors import MockAPIError
from mock_llm.request import content_text, flag, invalid, parse_messages, positive_int
from mock_llm.script import Completion, Message
from mock_llm.server import MockServer, json_response, require_json, secret_matches

STOP_REASONS = {"stop": "end_turn", "length": "max_tokens"}
ROLES = frozenset({"user", "assistant"})
_EMPTY_TEXT = {"type": "text", "text": ""}


@dataclass(frozen=True, slots=True)
class MessagesRequest:
    model: str
    messages: tuple[Message, ...]  # the system prompt first, when given
    max_tokens: int
    stream: bool


def parse_messages_request(body: object) -> MessagesRequest:
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object", None)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid("model: Field required", "model")
    max_tokens = positive_int(body, "max_tokens")
    if max_tokens is None:
        raise invalid("max_tokens: Field required", "max_tokens")
    messages = parse_messages(body.get("messages"), ROLES)
    system = body.get("system")
    if system is not None:
        messages = (Message("system", content_text(system, "system")), *messages)
    return MessagesRequest(model, messages, max_tokens, flag(body, "stream", "stream"))


def _event(name: str, payload: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"


def message_object(model: str, completion: Completion, report_usage: bool) -> dict[str, Any]:
    usage = {"input_tokens": completion.prompt_tokens, "output_tokens": len(completion.tokens)}
    return {
        "id": f"msg_mock{uuid.uuid4().hex[:20]}",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": completion.text}],
        "stop_reason": STOP_REASONS.get(completion.finish_reason, "end_turn"),
        "stop_sequence": None,
        "usage": usage if report_usage else {"input_tokens": 0, "output_tokens": 0},
    }


class MessageFrames:
    def __init__(self, model: str, completion: Completion, report_usage: bool) -> None:
        self._model = model
        self._completion = completion
        self._report_usage = report_usage

    def head(self) -> bytes:
        start = message_object(self._model, self._completion, True)
        start.update(content=[], stop_reason=None)
        # The real API's message_start reports output_tokens 1, a placeholder.
        start["usage"] = {"input_tokens": self._completion.prompt_tokens, "output_tokens": 1}
        block = {"type": "content_block_start", "index": 0, "content_block": _EMPTY_TEXT}
        return (
            _event("message_start", {"type": "message_start", "message": start})
            + _event("content_block_start", block)
            + _event("ping", {"type": "ping"})
        )

    def token(self, index: int, text: str) -> bytes:
        delta = {"type": "text_delta", "text": text}
        return _event(
            "content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta}
        )

    def tail(self) -> bytes:
        stop = STOP_REASONS.get(self._completion.finish_reason, "end_turn")
        delta: dict[str, Any] = {
            "type": "message_delta",
            "delta": {"stop_reason": stop, "stop_sequence": None},
        }
        if self._report_usage:
            delta["usage"] = {"output_tokens": len(self._completion.tokens)}
        return (
            _event("content_block_stop", {"type": "content_block_stop", "index": 0})
            + _event("message_delta", delta)
            + _event("message_stop", {"type": "message_stop"})
        )

    def error(self) -> bytes:
        error = {"type": "overloaded_error", "message": "Overloaded"}
        return _event("error", {"type": "error", "error": error})


def routes(server: MockServer) -> list[Route]:
    def authorize(request: Request) -> None:
        if server.api_key is None:
            return
        key = request.headers.get("x-api-key")
        scheme, _, bearer = request.headers.get("authorization", "").partition(" ")
        if key is None and scheme == "Bearer":
            key = bearer  # recent official clients send the key as a Bearer token
        if not secret_matches(key, server.api_key):
            raise MockAPIError(401, "invalid x-api-key")
        if not request.headers.get("anthropic-version"):
            raise MockAPIError(400, "anthropic-version: header is required")

    async def messages(request: Request) -> Response:
        body = await server.accept(request)
        authorize(request)
        call = parse_messages_request(require_json(body))
        completion, behaviour = server.plan(
            call.model, call.messages, request.headers, call.max_tokens
        )
        if call.stream:
            frames = MessageFrames(call.model, completion, behaviour.report_usage)
            return server.stream(frames, completion, behaviour)
        await server.whole(completion, behaviour)
        return json_response(message_object(call.model, completion, behaviour.report_usage))

    return [Route("/v1/messages", messages, methods=["POST"])]
