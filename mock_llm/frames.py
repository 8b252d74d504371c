"""OpenAI Chat Completions response objects and SSE frames (pure).

Shapes follow https://platform.openai.com/docs/api-reference/chat/streaming: every
chunk of one stream shares ``id`` and ``created``; the first delta carries the role,
then one delta per token, then an empty delta with ``finish_reason``; when
``stream_options.include_usage`` is set every chunk has ``"usage": null`` and a last
chunk with ``choices: []`` carries the counts; ``data: [DONE]`` ends the stream.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import orjson

from mock_llm.script import Completion

SYSTEM_FINGERPRINT = "fp_mock"
DONE_FRAME = b"data: [DONE]\n\n"


def sse_frame(payload: dict[str, Any]) -> bytes:
    # orjson never emits a raw newline, so one ``data:`` line always suffices.
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def usage(completion: Completion) -> dict[str, int]:
    output = len(completion.tokens)
    return {
        "prompt_tokens": completion.prompt_tokens,
        "completion_tokens": output,
        "total_tokens": completion.prompt_tokens + output,
    }


def new_completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def completion_object(model: str, completion: Completion) -> dict[str, Any]:
    """The ``chat.completion`` object answered when ``stream`` is false."""
    return {
        "id": new_completion_id(),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": SYSTEM_FINGERPRINT,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": completion.text, "refusal": None},
                "logprobs": None,
                "finish_reason": completion.finish_reason,
            }
        ],
        "usage": usage(completion),
    }


class ChunkWriter:
    """Builds the encoded frames of one stream, sharing its id and timestamp."""

    def __init__(self, model: str, completion: Completion, include_usage: bool) -> None:
        self._model = model
        self._completion = completion
        self._include_usage = include_usage
        self._id = new_completion_id()
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

    def _choice(self, delta: dict[str, str], finish_reason: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return self._chunk([choice])

    def role(self) -> bytes:
        return self._choice({"role": "assistant", "content": ""})

    def content(self, token: str) -> bytes:
        return self._choice({"content": token})

    def finish(self) -> bytes:
        return self._choice({}, self._completion.finish_reason)

    def usage(self) -> bytes | None:
        """The trailing usage chunk, or ``None`` when the client did not ask for it."""
        if not self._include_usage:
            return None
        return self._chunk([], usage=usage(self._completion))
