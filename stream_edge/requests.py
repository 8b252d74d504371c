"""Validate an OpenAI-style chat request against the stream grant (pure).

Runs before the token is claimed, so a malformed request does not burn the token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shared.pricing import estimate_input_tokens
from shared.tokens import StreamGrant
from stream_edge.errors import BadRequest, Forbidden, InputTooLarge

ROLES = frozenset({"system", "user", "assistant", "developer", "tool"})
# Sampling parameters a client may pass through; everything else is ours to set.
PASSTHROUGH_PARAMS = frozenset(
    {"temperature", "top_p", "stop", "presence_penalty", "frequency_penalty", "seed", "user"}
)


@dataclass(frozen=True, slots=True)
class ChatRequest:
    messages: list[dict[str, Any]]
    max_tokens: int
    stream: bool
    include_usage: bool
    params: dict[str, Any]
    input_estimate: int


def validate_messages(messages: Any) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty array", code="invalid_messages")
    clean: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise BadRequest(f"messages[{i}] needs a valid 'role'", code="invalid_messages")
        content = message.get("content")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and isinstance(p.get("text", ""), str) for p in content):
                raise BadRequest(
                    f"messages[{i}].content parts must be text", code="invalid_messages"
                )
        elif not isinstance(content, str):
            raise BadRequest(f"messages[{i}].content must be a string", code="invalid_messages")
        clean.append({"role": message["role"], "content": content})
    return clean


def parse_chat_request(body: Any, grant: StreamGrant) -> ChatRequest:
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object", code="invalid_json")
    model = body.get("model")
    if model is not None and model != grant.model:
        raise Forbidden(f"this token grants model {grant.model!r} only", code="model_not_allowed")
    messages = validate_messages(body.get("messages"))
    requested = body.get("max_completion_tokens", body.get("max_tokens"))
    if requested is None:
        max_tokens = grant.max_tokens
    elif isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
        raise BadRequest("'max_tokens' must be a positive integer", code="invalid_max_tokens")
    else:
        max_tokens = min(requested, grant.max_tokens)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("'stream' must be a boolean", code="invalid_stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise BadRequest("'stream_options' must be an object", code="invalid_stream_options")
    estimate = estimate_input_tokens(messages)
    if estimate > grant.max_input_tokens:
        raise InputTooLarge(
            f"the input is about {estimate} tokens; this token allows {grant.max_input_tokens}"
        )
    return ChatRequest(
        messages=messages,
        max_tokens=max_tokens,
        stream=stream,
        include_usage=bool(options.get("include_usage", False)),
        params={k: v for k, v in body.items() if k in PASSTHROUGH_PARAMS},
        input_estimate=estimate,
    )
