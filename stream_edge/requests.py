"""Validate an OpenAI-style chat request against the stream grant (pure).

Runs before the token is claimed, so a malformed request does not burn the token.
The input is sized with `shared.input_size`, the formula init used for the hold:
the messages with their content parts and every parameter passed upstream must fit
the grant's `max_input_tokens`, and non-text parts need the model's feature. Tool
calling (`tools`, `tool_choice`, `parallel_tool_calls`, assistant `tool_calls`, `tool`
messages) is checked by `shared.tool_shapes` and needs the model's `tools` feature.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shared.catalog import ModelSpec
from shared.input_size import (
    MAX_JSON_DEPTH,
    InputRejected,
    carries_files,
    clean_parts,
    estimate_input_tokens,
    json_too_deep,
    missing_features,
    params_tokens,
)
from shared.request_bounds import check_item_counts
from shared.tokens import StreamGrant
from shared.tool_shapes import (
    TOOL_PARAMS,
    check_tool_calls,
    check_tool_params,
    check_tool_sequence,
    tool_message,
    uses_tools,
)
from stream_edge.errors import BadRequest, Forbidden, InputTooLarge

ROLES = frozenset({"system", "user", "assistant", "developer", "tool"})
# Sampling parameters a client may pass through; everything else is ours to set.
PASSTHROUGH_PARAMS = frozenset(
    {"temperature", "top_p", "stop", "presence_penalty", "frequency_penalty", "seed", "user"}
)


def _rejected(exc: InputRejected) -> BadRequest:
    code = "invalid_messages" if exc.code == "invalid_content" else exc.code
    return BadRequest(str(exc), code=code)


@dataclass(frozen=True, slots=True)
class ChatRequest:
    messages: list[dict[str, Any]]
    max_tokens: int
    stream: bool
    include_usage: bool
    params: dict[str, Any]
    input_estimate: int


def validate_messages(
    messages: Any, features: tuple[str, ...] = ("streaming",)
) -> list[dict[str, Any]]:
    """The messages as sent upstream (role and content, an assistant's `tool_calls`,
    a tool result's `tool_call_id`); content parts other than text need the model's
    `features` (400 `unsupported_content`)."""
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty array", code="invalid_messages")
    try:
        # Before any item is looked at: their count bounds the work (`request_bounds`).
        check_item_counts(messages)
    except InputRejected as exc:
        raise _rejected(exc) from None
    clean: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        # A string first: `in ROLES` (a set) raises TypeError on a list or an object.
        role = message.get("role") if isinstance(message, dict) else None
        if not isinstance(role, str) or role not in ROLES:
            raise BadRequest(f"messages[{i}] needs a valid 'role'", code="invalid_messages")
        content = message.get("content")
        extra: dict[str, Any] = {}
        try:
            if message["role"] == "assistant" and message.get("tool_calls") is not None:
                calls = check_tool_calls(message["tool_calls"], f"messages[{i}].tool_calls")
                extra["tool_calls"] = calls
            elif message["role"] == "tool":
                extra = tool_message(message, f"messages[{i}]")
        except InputRejected as exc:
            raise _rejected(exc) from None
        if content is None and "tool_calls" in extra:
            clean.append({"role": "assistant", "content": None, **extra})
            continue
        if isinstance(content, list):
            try:
                # Rebuilt from the keys the estimate counts: nothing else goes upstream.
                content, needed = clean_parts(content, f"messages[{i}].content")
            except InputRejected as exc:
                raise _rejected(exc) from None
            missing = missing_features(needed, features)
            if missing:
                raise BadRequest(
                    f"messages[{i}].content: this model cannot take {', '.join(missing)} content",
                    code="unsupported_content",
                )
        elif not isinstance(content, str):
            raise BadRequest(f"messages[{i}].content must be a string", code="invalid_messages")
        clean.append({"role": message["role"], "content": content, **extra})
    try:
        check_tool_sequence(clean)
    except InputRejected as exc:
        raise _rejected(exc) from None
    return clean


def parse_chat_request(
    body: Any, grant: StreamGrant, model: ModelSpec, api_type: str = "openai_chat"
) -> ChatRequest:
    """`model`: the grant's model as routed (its features, image price and context),
    `api_type`: its provider's wire format (the vendor's own overheads)."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object", code="invalid_json")
    if json_too_deep(body):
        raise BadRequest(
            f"the request body nests arrays and objects more than {MAX_JSON_DEPTH} levels deep",
            code="json_too_deep",
        )
    if body.get("model") is not None and body.get("model") != grant.model:
        raise Forbidden(f"this token grants model {grant.model!r} only", code="model_not_allowed")
    messages = validate_messages(body.get("messages"), model.features)
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
    params = {k: v for k, v in body.items() if k in PASSTHROUGH_PARAMS}
    tool_doc = {k: body.get(k) for k in TOOL_PARAMS}
    if tool_doc["tools"] == []:
        tool_doc["tools"] = None  # some clients send an empty list for "no tools"
    try:
        params |= check_tool_params(tool_doc)
    except InputRejected as exc:
        raise _rejected(exc) from None
    if uses_tools(messages, params) and "tools" not in model.features:
        raise BadRequest(f"{model.id} cannot call tools", code="unsupported_feature")
    # Everything that goes upstream counts: the messages and the parameters.
    rates = model.input_rates(api_type)
    estimate = estimate_input_tokens(messages, rates) + params_tokens(params, rates)
    if estimate > grant.max_input_tokens:
        raise InputTooLarge(
            f"the input is about {estimate} tokens; this token allows {grant.max_input_tokens}"
        )
    # A file is billed per page, up to what the context leaves the input: only a token
    # that holds all of it carries one (`input_size.carries_files`, as init holds it).
    if carries_files(messages) and grant.max_input_tokens < model.context_length - max_tokens:
        raise InputTooLarge(
            "a request carrying a file is held at the model's whole context "
            f"({model.context_length - max_tokens} input tokens with max_tokens "
            f"{max_tokens}); this token holds {grant.max_input_tokens}: "
            "send the file in the init"
        )
    return ChatRequest(
        messages=messages,
        max_tokens=max_tokens,
        stream=stream,
        include_usage=bool(options.get("include_usage", False)),
        params=params,
        input_estimate=estimate,
    )
