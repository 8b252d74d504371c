"""The body of ``POST /v1/chat/init``, validated: pure functions, no I/O.

Exactly one of `messages` (the client owns the history), `query` (appended to a
stored session's history) and `tool_results` (`[{"tool_call_id", "content"}]`, the
answers to the stored session's last tool calls, appended as `tool` messages).
Optional `model`, `session_id`, `max_tokens`, the sampling parameters passed through
to the backend (`temperature`, `top_p`, `stop`, `presence_penalty`,
`frequency_penalty`, `seed`, `user`: those the edge passes too) and tool calling's
`tools`, `tool_choice`, `parallel_tool_calls` (`shared.tool_shapes`). A message's `content` is
a string or an array of OpenAI content parts (`shared.input_size.check_parts`); init
checks the model takes them. An assistant message may carry `tool_calls` (content
null), a `tool` message its `tool_call_id`. `agent` names
one of the company's agents (`agents.for_init`), which fixes the model, the system
prompt and the tools: a body that also sets them is 400 ``agent_override``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from control_plane.errors import AgentOverride, UnsupportedContent, ValidationFailed
from control_plane.validation import optional_int, optional_str
from shared.input_size import InputRejected, clean_parts
from shared.request_bounds import check_item_counts
from shared.sampling import check_sampling_params
from shared.tool_shapes import (
    check_tool_calls,
    check_tool_params,
    check_tool_sequence,
    tool_message,
    uses_tools,
)

MESSAGE_ROLES = ("system", "developer", "user", "assistant", "tool")
QUERY_MAX_CHARS = 2000
MAX_FEATURES = 16
MAX_TOOLS = 128


@dataclass(frozen=True, slots=True)
class InitRequest:
    model: str | None
    messages: list[dict[str, Any]] | None
    query: str | None
    session_id: str | None
    max_tokens: int | None
    params: dict[str, Any]
    features: tuple[str, ...] = ()  # what the model must support (`tools`, `vision`, …)
    # What the messages' content parts need (`vision`, `files`, `audio`): 400
    # `unsupported_content` when the model lacks one.
    content_features: frozenset[str] = frozenset()
    # `tool` messages answering the stored session's open calls (with `session_id`).
    tool_results: list[dict[str, Any]] | None = None
    agent: str | None = None  # applied by `agents.for_init`


def _rejected(exc: InputRejected) -> Exception:
    if exc.code == "unsupported_content":
        return UnsupportedContent(str(exc))
    return ValidationFailed(exc.where, exc.problem)


def _content(content: Any, where: str, needed: set[str]) -> Any:
    if isinstance(content, list):
        try:
            # Rebuilt from the keys the estimate counts: nothing else goes upstream.
            content, features = clean_parts(content, where)
        except InputRejected as exc:
            raise _rejected(exc) from None
        needed |= features
    elif not isinstance(content, str):
        raise ValidationFailed(where, "must be a string or content parts")
    return content


def _messages(value: Any) -> tuple[list[dict[str, Any]], frozenset[str]]:
    """The messages, and the features their content parts need."""
    if not isinstance(value, list) or not value:
        raise ValidationFailed("messages", "must be a non-empty array")
    try:
        # Before any item is looked at: their count bounds the work (`request_bounds`).
        check_item_counts(value)
    except InputRejected as exc:
        raise _rejected(exc) from None
    result: list[dict[str, Any]] = []
    needed: set[str] = set()
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise ValidationFailed(f"messages[{i}]", "must be an object")
        role = item.get("role")
        if role not in MESSAGE_ROLES:
            raise ValidationFailed(
                f"messages[{i}].role", f"must be one of {', '.join(MESSAGE_ROLES)}"
            )
        extra: dict[str, Any] = {}
        try:
            if role == "assistant" and item.get("tool_calls") is not None:
                extra["tool_calls"] = check_tool_calls(
                    item["tool_calls"], f"messages[{i}].tool_calls"
                )
            elif role == "tool":
                extra = tool_message(item, f"messages[{i}]")
        except InputRejected as exc:
            raise _rejected(exc) from None
        content = item.get("content")
        if content is None and "tool_calls" in extra:
            content = ""  # OpenAI's null content beside calls; nothing to send
        else:
            content = _content(content, f"messages[{i}].content", needed)
        result.append({"role": str(role), "content": content, **extra})
    try:
        check_tool_sequence(result)
    except InputRejected as exc:
        raise _rejected(exc) from None
    return result, frozenset(needed)


def _params(doc: dict[str, Any]) -> dict[str, Any]:
    """The sampling parameters, by the rule the edge applies too (`shared.sampling`):
    an API-key caller's body reaches init as it is (issue 16.5)."""
    try:
        return check_sampling_params(doc)
    except InputRejected as exc:
        raise _rejected(exc) from None


def _features(doc: dict[str, Any], params: dict[str, Any]) -> tuple[str, ...]:
    """Features asked for explicitly (``features: ["tools"]``) or implied by the body
    (``tools`` → ``tools``); the model must list each one."""
    wanted: list[str] = []
    raw = doc.get("features")
    if raw is not None:
        if (
            not isinstance(raw, list)
            or len(raw) > MAX_FEATURES
            or not all(isinstance(f, str) and 0 < len(f) <= 50 for f in raw)
        ):
            raise ValidationFailed("features", f"must be at most {MAX_FEATURES} feature names")
        wanted.extend(raw)
    try:
        params |= check_tool_params(doc)
    except InputRejected as exc:
        raise _rejected(exc) from None
    if "tools" in params:
        wanted.append("tools")
    return tuple(dict.fromkeys(wanted))


def _tool_results(value: Any) -> tuple[list[dict[str, Any]], frozenset[str]]:
    """`tool_results` as the `tool` messages they become."""
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_TOOLS:
        raise ValidationFailed("tool_results", f"must be an array of 1-{MAX_TOOLS} results")
    try:
        check_item_counts(value, "tool_results")
    except InputRejected as exc:
        raise _rejected(exc) from None
    needed: set[str] = set()
    out: list[dict[str, Any]] = []
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise ValidationFailed(f"tool_results[{i}]", "must be an object")
        try:
            call = tool_message(item, f"tool_results[{i}]")
        except InputRejected as exc:
            raise _rejected(exc) from None
        content = _content(item.get("content"), f"tool_results[{i}].content", needed)
        out.append({"role": "tool", "content": content, **call})
    return out, frozenset(needed)


# What an agent fixes (issue 15.4): a body naming an agent may not set these.
AGENT_FIXED = ("model", "tools", "tool_choice", "parallel_tool_calls")
# Messages that instruct the model: an agent's turn carries only its own prompt.
AGENT_FIXED_ROLES = ("system", "developer")
AGENT_NAME_MAX = 64


def _agent(doc: dict[str, Any]) -> str | None:
    """The agent named by the body; 400 ``agent_override`` when the body also tries
    to set what the agent fixes: its model, its tools, or a system prompt."""
    name = optional_str(doc, "agent", max_len=AGENT_NAME_MAX)
    if name is None:
        return None
    fixed = [key for key in AGENT_FIXED if doc.get(key) is not None]
    messages = doc.get("messages")
    if isinstance(messages, list) and any(
        isinstance(m, dict) and m.get("role") in AGENT_FIXED_ROLES for m in messages
    ):
        fixed.append("a system message")
    if fixed:
        raise AgentOverride(
            f"Agent {name!r} sets the model, system prompt and tools; "
            f"remove {', '.join(fixed)} from the request."
        )
    return name


def parse_init_request(doc: dict[str, Any]) -> InitRequest:
    """Validate an init body: exactly one of `messages`, `query` and `tool_results`."""
    has_messages = doc.get("messages") is not None
    has_query = doc.get("query") is not None
    has_results = doc.get("tool_results") is not None
    if has_messages + has_query + has_results != 1:
        raise ValidationFailed("messages", "send exactly one of messages, query or tool_results")
    if has_results and doc.get("session_id") is None:
        raise ValidationFailed("session_id", "is required with tool_results")
    query = None
    if has_query:
        query = doc["query"]
        if not isinstance(query, str) or not query.strip():
            raise ValidationFailed("query", "must be a non-empty string")
        if len(query) > QUERY_MAX_CHARS:
            raise ValidationFailed("query", f"must be at most {QUERY_MAX_CHARS} characters")
    agent = _agent(doc)
    params = _params(doc)
    features = _features(doc, params)
    messages, content_features = _messages(doc["messages"]) if has_messages else (None, None)
    results, result_features = _tool_results(doc["tool_results"]) if has_results else (None, None)
    if (messages is not None and uses_tools(messages, params)) or results:
        features = tuple(dict.fromkeys((*features, "tools")))
    return InitRequest(
        features=features,
        content_features=content_features or result_features or frozenset(),
        tool_results=results,
        model=optional_str(doc, "model"),
        messages=messages,
        query=query,
        session_id=optional_str(doc, "session_id", max_len=64),
        max_tokens=optional_int(doc, "max_tokens", low=1, high=2**31 - 1),
        params=params,
        agent=agent,
    )
