"""Anthropic Messages API: ``POST /v1/messages``.

Shapes follow https://docs.anthropic.com/en/api/messages-streaming: named events
``message_start`` (input tokens, and a placeholder ``output_tokens: 1``),
``content_block_start``, ``ping``, one ``content_block_delta`` (``text_delta``) per
token, ``content_block_stop``, ``message_delta`` (stop reason, cumulative usage) and
``message_stop``; a mid-stream failure is an ``error`` event. Tool calls
(``[[mock tool_calls=N]]`` with ``tools``) are ``tool_use`` blocks whose input streams
as ``input_json_delta`` fragments, ending with ``stop_reason: tool_use``; a user turn
of ``tool_result`` blocks answers them. Auth is ``x-api-key``
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
from mock_llm.media import anthropic_block_text
from mock_llm.request import content_text, flag, invalid, positive_int
from mock_llm.script import Completion, Message
from mock_llm.server import MockServer, json_response, require_json, secret_matches
from mock_llm.tools import ToolSpec

STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}
ROLES = frozenset({"user", "assistant"})
_EMPTY_TEXT = {"type": "text", "text": ""}


@dataclass(frozen=True, slots=True)
class MessagesRequest:
    model: str
    messages: tuple[Message, ...]  # the system prompt first, when given
    max_tokens: int
    stream: bool
    tools: tuple[ToolSpec, ...] = ()


_BLOCKS = ("text", "image", "document", "tool_use", "tool_result")


def _block_text(block: object, where: str) -> tuple[str, bool]:
    """A content block's text, and whether it is a tool result."""
    kind = block.get("type") if isinstance(block, dict) else None
    if not isinstance(block, dict) or kind not in _BLOCKS:
        raise invalid(f"{where}: must be a {', '.join(_BLOCKS)} block", where)
    if kind in ("image", "document"):
        return anthropic_block_text(block, where), False
    if kind == "text":
        return content_text([block], where), False
    if kind == "tool_use":
        return orjson.dumps(block.get("input", {})).decode(), False
    result = block.get("content", "")
    return content_text(result, f"{where}.content"), True


def _messages(value: object) -> tuple[Message, ...]:
    if not isinstance(value, list) or not value:
        raise invalid("messages: at least one message is required", "messages")
    out: list[Message] = []
    for index, item in enumerate(value):
        where = f"messages.{index}"
        role = item.get("role") if isinstance(item, dict) else None
        if role not in ROLES or not isinstance(item, dict):
            raise invalid(f"{where}.role: must be user or assistant", f"{where}.role")
        content = item.get("content")
        if not isinstance(content, list):
            out.append(Message(str(role), content_text(content, f"{where}.content")))
            continue
        read = [_block_text(b, f"{where}.content.{i}") for i, b in enumerate(content)]
        results = bool(read) and all(is_result for _, is_result in read)
        out.append(Message("tool" if results else str(role), "".join(t for t, _ in read)))
    return tuple(out)


def _tools(value: object) -> tuple[ToolSpec, ...]:
    specs = (
        ToolSpec.of(t.get("name"), t.get("input_schema"))
        for t in (value if isinstance(value, list) else [])
        if isinstance(t, dict)
    )
    return tuple(spec for spec in specs if spec is not None)


def parse_messages_request(body: object) -> MessagesRequest:
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object", None)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid("model: Field required", "model")
    max_tokens = positive_int(body, "max_tokens")
    if max_tokens is None:
        raise invalid("max_tokens: Field required", "max_tokens")
    messages = _messages(body.get("messages"))
    system = body.get("system")
    if system is not None:
        messages = (Message("system", content_text(system, "system")), *messages)
    stream = flag(body, "stream", "stream")
    if not body.get("tools") and _has_tool_blocks(body["messages"]):
        # Anthropic's own refusal (anthropic-sdk-python#494): the history's tool
        # blocks need tool definitions, even on a turn that wants none called.
        raise invalid(
            "Requests which include `tool_use` or `tool_result` blocks must define tools.",
            "tools",
        )
    return MessagesRequest(model, messages, max_tokens, stream, _tools(body.get("tools")))


def _has_tool_blocks(messages: list[Any]) -> bool:
    return any(
        isinstance(block, dict) and block.get("type") in ("tool_use", "tool_result")
        for message in messages
        if isinstance(message.get("content"), list)
        for block in message["content"]
    )


def _tool_id(call_id: str) -> str:
    return "toolu_" + call_id.removeprefix("call_")


def _event(name: str, payload: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"


def _input_usage(completion: Completion) -> dict[str, int]:
    # Anthropic's input_tokens leaves cache reads and writes out; they come apart.
    fresh = completion.prompt_tokens - completion.cached_tokens - completion.cache_write_tokens
    usage = {"input_tokens": max(0, fresh)}
    if completion.cached_tokens or completion.cache_write_tokens:
        usage["cache_read_input_tokens"] = completion.cached_tokens
        usage["cache_creation_input_tokens"] = completion.cache_write_tokens
    return usage


def message_object(model: str, completion: Completion, report_usage: bool) -> dict[str, Any]:
    # Thinking tokens are part of output_tokens.
    usage = {**_input_usage(completion), "output_tokens": completion.output_tokens}
    return {
        "id": f"msg_mock{uuid.uuid4().hex[:20]}",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [
            {"type": "tool_use", "id": _tool_id(c.id), "name": c.name, "input": c.args()}
            for c in completion.calls
        ]
        or [{"type": "text", "text": completion.text}],
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
        start["usage"] = {**_input_usage(self._completion), "output_tokens": 1}
        head = _event("message_start", {"type": "message_start", "message": start})
        if not self._completion.calls:
            block = {"type": "content_block_start", "index": 0, "content_block": _EMPTY_TEXT}
            head += _event("content_block_start", block)
        return head + _event("ping", {"type": "ping"})

    def token(self, index: int, text: str) -> bytes:
        if not self._completion.calls:
            delta = {"type": "text_delta", "text": text}
            return _event(
                "content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta}
            )
        number, first = self._completion.owner(index)
        frames = b""
        if first:
            if number:
                frames += _event(
                    "content_block_stop", {"type": "content_block_stop", "index": number - 1}
                )
            call = self._completion.calls[number]
            use = {"type": "tool_use", "id": _tool_id(call.id), "name": call.name, "input": {}}
            start = {"type": "content_block_start", "index": number, "content_block": use}
            frames += _event("content_block_start", start)
        delta = {"type": "input_json_delta", "partial_json": text}
        event = {"type": "content_block_delta", "index": number, "delta": delta}
        return frames + _event("content_block_delta", event)

    def tail(self) -> bytes:
        stop = STOP_REASONS.get(self._completion.finish_reason, "end_turn")
        delta: dict[str, Any] = {
            "type": "message_delta",
            "delta": {"stop_reason": stop, "stop_sequence": None},
        }
        if self._report_usage:
            delta["usage"] = {"output_tokens": self._completion.output_tokens}
        last_block = max(0, len(self._completion.calls) - 1)
        return (
            _event("content_block_stop", {"type": "content_block_stop", "index": last_block})
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
        if call.model not in server.models:
            raise MockAPIError(404, f"model: {call.model}")  # Anthropic's words
        completion, behaviour = server.plan(
            call.model, call.messages, request.headers, call.max_tokens, call.tools
        )
        if call.stream:
            frames = MessageFrames(call.model, completion, behaviour.report_usage)
            return server.stream(frames, completion, behaviour)
        await server.whole(request, completion, behaviour)
        return json_response(message_object(call.model, completion, behaviour.report_usage))

    return [Route("/v1/messages", messages, methods=["POST"])]
