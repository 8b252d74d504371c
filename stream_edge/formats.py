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

from shared.sse import encode_data, encode_event
from stream_edge.upstream.base import Delta, Failure, Finish, UpstreamEvent, Usage

DONE_FRAME = b"data: [DONE]\n\n"


class OpenAIChunkWriter:
    def __init__(self, model: str, *, include_usage: bool, passthrough: bool) -> None:
        self._model = model
        self._include_usage = include_usage
        self._passthrough = passthrough
        self._id = f"chatcmpl-{uuid.uuid4().hex}"
        self._created = int(time.time())
        self._last_raw: bytes | None = None
        self._started = False

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None) -> bytes:
        return encode_data(
            orjson.dumps(
                {
                    "id": self._id,
                    "object": "chat.completion.chunk",
                    "created": self._created,
                    "model": self._model,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
                }
            )
        )

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
        if isinstance(event, Finish):
            return self._chunk({}, event.reason)
        return b""

    def _usage_frame(self, usage: Usage) -> bytes:
        return encode_data(
            orjson.dumps(
                {
                    "id": self._id,
                    "object": "chat.completion.chunk",
                    "created": self._created,
                    "model": self._model,
                    "choices": [],
                    "usage": {
                        "prompt_tokens": usage.input_tokens,
                        "completion_tokens": usage.output_tokens,
                        "total_tokens": usage.input_tokens + usage.output_tokens,
                    },
                }
            )
        )

    def done(self) -> bytes:
        return DONE_FRAME

    @staticmethod
    def error(code: str, message: str) -> bytes:
        return encode_data(
            orjson.dumps({"error": {"message": message, "type": "upstream_error", "code": code}})
        )


def completion_object(
    model: str, text: str, finish_reason: str, usage: Usage | None
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish_reason,
            }
        ],
    }
    if usage is not None:
        body["usage"] = {
            "prompt_tokens": usage.input_tokens,
            "completion_tokens": usage.output_tokens,
            "total_tokens": usage.input_tokens + usage.output_tokens,
        }
    return body


class EventSourceWriter:
    """`chunk` / `complete` / `error` events, numbered from 1 so `Last-Event-ID` can resume."""

    def __init__(self, session_id: str) -> None:
        self._session_id = session_id
        self.last_id = 0
        self._index = 0

    def _next(self, event: str, payload: dict[str, Any]) -> bytes:
        self.last_id += 1
        return encode_event(orjson.dumps(payload).decode(), event=event, id=self.last_id)

    def write(self, event: UpstreamEvent) -> bytes:
        if isinstance(event, Delta):
            frame = self._next("chunk", {"content": event.text, "index": self._index})
            self._index += 1
            return frame
        return b""

    def complete(self, finish_reason: str | None, input_tokens: int, output_tokens: int) -> bytes:
        return self._next(
            "complete",
            {
                "done": True,
                "finish_reason": finish_reason or "stop",
                "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens},
                "session_id": self._session_id,
            },
        )

    def error(self, code: str, message: str) -> bytes:
        return self._next("error", {"code": code, "message": message})
