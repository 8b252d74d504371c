"""What the client sees: OpenAI `chat.completion.chunk` frames, or EventSource events.

Pure encoders from the normalised upstream events. `OpenAIChunkWriter` passes the
backend's own bytes through untouched when the backend already speaks OpenAI's
format for our model name — the common case, and the cheapest: the event was parsed
for billing anyway, and re-serialising it would only cost CPU.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import orjson

from shared.sse import MAX_EVENT, encode_data, encode_event
from stream_edge.meter import TRANSCRIPT_PIECES
from stream_edge.upstream.base import (
    Delta,
    Failure,
    Finish,
    OutputLimit,
    ToolCall,
    ToolCallDelta,
    ToolCalls,
    UpstreamEvent,
    Usage,
)

DONE_FRAME = b"data: [DONE]\n\n"
# What an EventSource stream holds of its tool calls until `complete`, over all its
# calls: argument characters, and fragments (each a string's overhead). No legitimate
# stream reaches either: 1 Mi characters is 2x the arguments of the longest output any
# model offers (128k tokens, ~4 characters each), and a call's `tool_call` event past
# it is longer than an SSE decoder's event (`MAX_EVENT`, our own client's), so no
# client of ours could read it anyway; vendors stream one token or more a fragment.
TOOL_CALL_CHARS = MAX_EVENT
TOOL_CALL_PIECES = TRANSCRIPT_PIECES
TOO_MANY_TOOL_CALLS = f"the backend's tool calls ran over {TOOL_CALL_CHARS >> 20} MiB"


class OpenAIChunkWriter:
    def __init__(self, model: str, *, include_usage: bool, passthrough: bool) -> None:
        self._include_usage = include_usage
        self._passthrough = passthrough
        # Every chunk's first fields, in OpenAI's order (a copy per chunk, unpacked:
        # no slower than writing them out, measured).
        self._head = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model,
        }
        self._last_raw: bytes | None = None
        self._started = False

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None) -> bytes:
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
        return encode_data(orjson.dumps({**self._head, "choices": [choice]}))

    def write(self, event: UpstreamEvent) -> bytes:
        if isinstance(event, Usage) and not self._include_usage:
            return b""
        if self._passthrough and not isinstance(event, Failure):
            # Several normalised events can come from one vendor event; they share its
            # bytes, which are forwarded once.
            if event.raw is self._last_raw:
                return b""
            self._last_raw = event.raw
            return encode_data(event.raw)
        if isinstance(event, Usage):
            return self._usage_frame(event)
        if isinstance(event, Delta):
            delta: dict[str, Any] = {"content": event.text}
            if not self._started:
                delta["role"] = "assistant"
                self._started = True
            return self._chunk(delta, None)
        if isinstance(event, ToolCallDelta):
            return self._chunk(self._tool_delta(event), None)
        if isinstance(event, Finish):
            return self._chunk({}, event.reason)
        return b""

    def _tool_delta(self, event: ToolCallDelta) -> dict[str, Any]:
        """OpenAI's exact shape: the call's first fragment has `id`, `type` and
        `function.name`; later ones `index` and `function.arguments` only."""
        call: dict[str, Any] = {"index": event.index}
        if event.id is not None:
            call |= {"id": event.id, "type": "function"}
            call["function"] = {"name": event.name or "", "arguments": event.arguments}
        else:
            call["function"] = {"arguments": event.arguments}
        delta: dict[str, Any] = {"tool_calls": [call]}
        if not self._started:
            delta = {"role": "assistant", "content": None, **delta}
            self._started = True
        return delta

    def _usage_frame(self, usage: Usage) -> bytes:
        return encode_data(
            orjson.dumps({**self._head, "choices": [], "usage": openai_usage(usage)})
        )

    def done(self) -> bytes:
        return DONE_FRAME

    @staticmethod
    def error(code: str, message: str) -> bytes:
        return encode_data(
            orjson.dumps({"error": {"message": message, "type": "upstream_error", "code": code}})
        )


def openai_usage(usage: Usage) -> dict[str, Any]:
    """OpenAI's usage object, with its cache and reasoning details when known
    (whatever vendor served: Anthropic's cache reads are OpenAI's `cached_tokens`)."""
    out: dict[str, Any] = {
        "prompt_tokens": usage.input_tokens,
        "completion_tokens": usage.output_tokens,
        "total_tokens": usage.input_tokens + usage.output_tokens,
    }
    if usage.cached_input_tokens or usage.cache_write_tokens:
        out["prompt_tokens_details"] = {"cached_tokens": usage.cached_input_tokens}
    if usage.reasoning_tokens:
        out["completion_tokens_details"] = {"reasoning_tokens": usage.reasoning_tokens}
    return out


def completion_object(
    model: str,
    text: str,
    finish_reason: str,
    usage: Usage | None,
    tool_calls: tuple[ToolCall, ...] = (),
) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if tool_calls:
        # OpenAI answers `content: null` beside tool calls when there is no text.
        message = {"role": "assistant", "content": text or None}
        message["tool_calls"] = [call.openai() for call in tool_calls]
    body: dict[str, Any] = {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "finish_reason": finish_reason,
            }
        ],
    }
    if usage is not None:
        body["usage"] = openai_usage(usage)
    return body


class EventSourceWriter:
    """`chunk` / `tool_call` / `complete` / `error` events, numbered from 1 so
    `Last-Event-ID` can resume. Tool calls are gathered as they stream and sent
    whole, one `tool_call` event each, just before `complete` (`tool_call_frames`).

    What is gathered is bounded (`TOOL_CALL_CHARS`, `TOOL_CALL_PIECES`): a backend
    streaming argument fragments for the stream's whole life once grew the edge's
    memory by all it sent (32 MB sent, 362 MB traced at the peak). Past the bound
    `write` raises `OutputLimit`, and the relay ends the stream as a failed one."""

    def __init__(self, session_id: str) -> None:
        self._session_id = session_id
        self.last_id = 0
        self._index = 0
        self._tool_calls = ToolCalls()
        self._chars_room = TOOL_CALL_CHARS
        self._pieces_room = TOOL_CALL_PIECES

    def _next(self, event: str, payload: dict[str, Any]) -> bytes:
        self.last_id += 1
        return encode_event(orjson.dumps(payload).decode(), event=event, id=self.last_id)

    def write(self, event: UpstreamEvent) -> bytes:
        if isinstance(event, Delta):
            frame = self._next("chunk", {"content": event.text, "index": self._index})
            self._index += 1
            return frame
        if isinstance(event, ToolCallDelta):
            self._chars_room -= len(event.arguments)
            self._pieces_room -= 1
            if self._chars_room < 0 or self._pieces_room < 0:
                raise OutputLimit(TOO_MANY_TOOL_CALLS)
            self._tool_calls.add(event)
        return b""

    def tool_call_frames(self) -> list[bytes]:
        """One `tool_call` event per call: `{"index", "id", "name", "arguments"}`."""
        return [
            self._next(
                "tool_call",
                {"index": i, "id": call.id, "name": call.name, "arguments": call.arguments},
            )
            for i, call in enumerate(self._tool_calls.complete())
        ]

    def complete(
        self,
        finish_reason: str | None,
        input_tokens: int,
        output_tokens: int,
        model: str | None = None,
    ) -> bytes:
        """`model`: the one that served (a fallback of the chain, issue 16.2)."""
        payload: dict[str, Any] = {
            "done": True,
            "finish_reason": finish_reason or "stop",
            "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens},
            "session_id": self._session_id,
        }
        if model is not None:
            payload["model"] = model
        return self._next("complete", payload)

    def error(self, code: str, message: str) -> bytes:
        self.last_id += 1
        return error_event(self.last_id, code, message)


def error_event(event_id: int, code: str, message: str) -> bytes:
    """The `error` event numbered `event_id`: `EventSourceWriter.error`'s, and a
    resume follower's, which has no writer of its own (`resume.Follower`)."""
    return encode_event(
        orjson.dumps({"code": code, "message": message}).decode(), event="error", id=event_id
    )
