"""Validate an OpenAI-style chat request against the stream grant (pure).

Runs before the token is claimed, so a malformed request does not burn the token.
The body is checked and measured once (`read_chat_body`), then fitted to each model
of the grant's fallback chain (`fit_chat_body`: features, limits, the estimate at its
rates), so a chain of six costs one pass over the body, not six.
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
    InputSize,
    carries_files,
    clean_parts,
    json_too_deep,
    measure_input,
    missing_features,
)
from shared.request_bounds import check_item_counts
from shared.sampling import check_sampling_params
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


def _rejected(exc: InputRejected) -> BadRequest:
    code = "invalid_messages" if exc.code == "invalid_content" else exc.code
    if exc.code == "invalid_parameter":
        code = f"invalid_{exc.where}"  # `invalid_stop`, as `invalid_max_tokens`
    return BadRequest(str(exc), code=code)


@dataclass(frozen=True, slots=True)
class ChatRequest:
    messages: list[dict[str, Any]]
    max_tokens: int
    stream: bool
    include_usage: bool
    params: dict[str, Any]
    input_estimate: int


@dataclass(frozen=True, slots=True)
class CheckedMessages:
    """Messages as sent upstream, and which of them need model features: `needs`
    holds (index, features) for each message with parts other than text."""

    messages: list[dict[str, Any]]
    needs: tuple[tuple[int, frozenset[str]], ...] = ()

    def require(self, features: tuple[str, ...]) -> None:
        """400 `unsupported_content` naming the first message a model with `features`
        cannot take."""
        for i, needed in self.needs:
            missing = missing_features(needed, features)
            if missing:
                raise BadRequest(
                    f"messages[{i}].content: this model cannot take {', '.join(missing)} content",
                    code="unsupported_content",
                )


def check_messages(messages: Any) -> CheckedMessages:
    """The messages as sent upstream (role and content, an assistant's `tool_calls`,
    a tool result's `tool_call_id`), whatever the model; what each needs of it."""
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty array", code="invalid_messages")
    try:
        # Before any item is looked at: their count bounds the work (`request_bounds`).
        check_item_counts(messages)
    except InputRejected as exc:
        raise _rejected(exc) from None
    clean: list[dict[str, Any]] = []
    needs: list[tuple[int, frozenset[str]]] = []
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
            if needed:
                needs.append((i, frozenset(needed)))
        elif not isinstance(content, str):
            raise BadRequest(f"messages[{i}].content must be a string", code="invalid_messages")
        clean.append({"role": message["role"], "content": content, **extra})
    try:
        check_tool_sequence(clean)
    except InputRejected as exc:
        raise _rejected(exc) from None
    return CheckedMessages(clean, tuple(needs))


@dataclass(frozen=True, slots=True)
class ChatBody:
    """A request body checked and measured once, for whichever model of the grant's
    chain serves it (`fit_chat_body` sizes it for each in constant time)."""

    checked: CheckedMessages
    requested_max_tokens: int | None
    stream: bool
    include_usage: bool
    params: dict[str, Any]
    size: InputSize
    uses_tools: bool
    carries_files: bool


def chat_object(body: Any) -> dict[str, Any]:
    """`body`, parsed JSON, if it can be a chat request at all: a JSON object, nested
    no deeper than `MAX_JSON_DEPTH` (deeper, walking it could exhaust the stack)."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object", code="invalid_json")
    if json_too_deep(body):
        raise BadRequest(
            f"the request body nests arrays and objects more than {MAX_JSON_DEPTH} levels deep",
            code="json_too_deep",
        )
    return body


def read_chat_body(body: Any, grant: StreamGrant) -> ChatBody:
    """Everything about the body that does not depend on the model that serves it."""
    body = chat_object(body)
    if body.get("model") is not None and body.get("model") != grant.model:
        raise Forbidden(f"this token grants model {grant.model!r} only", code="model_not_allowed")
    checked = check_messages(body.get("messages"))
    requested = body.get("max_completion_tokens", body.get("max_tokens"))
    if requested is not None and (
        isinstance(requested, bool) or not isinstance(requested, int) or requested < 1
    ):
        raise BadRequest("'max_tokens' must be a positive integer", code="invalid_max_tokens")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("'stream' must be a boolean", code="invalid_stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise BadRequest("'stream_options' must be an object", code="invalid_stream_options")
    try:
        # The sampling parameters a client may pass through, by init's rule; everything
        # else is ours to set.
        params = check_sampling_params(body)
    except InputRejected as exc:
        raise _rejected(exc) from None
    tool_doc = {k: body.get(k) for k in TOOL_PARAMS}
    if tool_doc["tools"] == []:
        tool_doc["tools"] = None  # some clients send an empty list for "no tools"
    try:
        params |= check_tool_params(tool_doc)
    except InputRejected as exc:
        raise _rejected(exc) from None
    return ChatBody(
        checked=checked,
        requested_max_tokens=requested,
        stream=stream,
        include_usage=bool(options.get("include_usage", False)),
        params=params,
        # Everything that goes upstream counts: the messages and the parameters.
        size=measure_input(checked.messages, params),
        uses_tools=uses_tools(checked.messages, params),
        carries_files=carries_files(checked.messages),
    )


def fit_chat_body(
    chat: ChatBody, grant: StreamGrant, model: ModelSpec, api_type: str = "openai_chat"
) -> ChatRequest:
    """`chat` for `model` as routed (its features, image price and context) on its
    provider's wire format `api_type` (the vendor's own overheads), within `grant`."""
    chat.checked.require(model.features)
    requested = chat.requested_max_tokens
    max_tokens = grant.max_tokens if requested is None else min(requested, grant.max_tokens)
    if chat.uses_tools and "tools" not in model.features:
        raise BadRequest(f"{model.id} cannot call tools", code="unsupported_feature")
    estimate = chat.size.at(model.input_rates(api_type))
    if estimate > grant.max_input_tokens:
        raise InputTooLarge(
            f"the input is about {estimate} tokens; this token allows {grant.max_input_tokens}"
        )
    # A file is billed per page, up to what the context leaves the input: only a token
    # that holds all of it carries one (`input_size.carries_files`, as init holds it).
    if chat.carries_files and grant.max_input_tokens < model.context_length - max_tokens:
        raise InputTooLarge(
            "a request carrying a file is held at the model's whole context "
            f"({model.context_length - max_tokens} input tokens with max_tokens "
            f"{max_tokens}); this token holds {grant.max_input_tokens}: "
            "send the file in the init"
        )
    return ChatRequest(
        messages=chat.checked.messages,
        max_tokens=max_tokens,
        stream=chat.stream,
        include_usage=chat.include_usage,
        params=chat.params,
        input_estimate=estimate,
    )


def parse_chat_request(
    body: Any, grant: StreamGrant, model: ModelSpec, api_type: str = "openai_chat"
) -> ChatRequest:
    """`model`: the grant's model as routed (its features, image price and context),
    `api_type`: its provider's wire format (the vendor's own overheads)."""
    return fit_chat_body(read_chat_body(body, grant), grant, model, api_type)
