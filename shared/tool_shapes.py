"""OpenAI's tool-calling request shapes, validated (pure; DESIGN §11 "Tool calls").

Both services check a request's tools with these functions before anything is held
or sent: the control plane at init, the edge at ``/v1/chat/completions``. A problem
raises `InputRejected` (`shared.input_size`) with code ``invalid_tools`` (the
``tools`` / ``tool_choice`` / ``parallel_tool_calls`` parameters) or
``invalid_tool_call`` (an assistant's ``tool_calls`` or a ``tool`` message); each
service maps it to its own 4xx. The adapters can then rely on the shapes: every
call has an ``id``, ``type: "function"``, a ``function.name`` and ``function.arguments``
text, and every ``tool`` message answers a call made earlier in the conversation.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from shared.input_size import InputRejected

MAX_TOOLS = 128
MAX_CALLS_PER_MESSAGE = 128
MAX_ID_CHARS = 256
# OpenAI's rule for function names; Anthropic and Gemini accept the same set.
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
TOOL_PARAMS = ("tools", "tool_choice", "parallel_tool_calls")


def _tools_error(where: str, problem: str) -> InputRejected:
    return InputRejected("invalid_tools", where, problem)


def _call_error(where: str, problem: str) -> InputRejected:
    return InputRejected("invalid_tool_call", where, problem)


def _function_name(value: Any, where: str, error: Any) -> str:
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise error(where, "must be 1-64 letters, digits, '_' or '-'")
    return value


def check_tools(value: Any) -> list[dict[str, Any]]:
    """``tools``: 1-128 ``{"type": "function", "function": {"name", "description"?,
    "parameters"?, "strict"?}}``, names unique."""
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_TOOLS:
        raise _tools_error("tools", f"must be an array of 1-{MAX_TOOLS} tools")
    names: set[str] = set()
    for i, tool in enumerate(value):
        at = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise _tools_error(f"{at}.type", "must be 'function'")
        function = tool.get("function")
        if not isinstance(function, dict):
            raise _tools_error(f"{at}.function", "must be an object")
        name = _function_name(function.get("name"), f"{at}.function.name", _tools_error)
        if name in names:
            raise _tools_error(f"{at}.function.name", f"repeats {name!r}")
        names.add(name)
        if "description" in function and not isinstance(function["description"], str):
            raise _tools_error(f"{at}.function.description", "must be a string")
        if "parameters" in function and not isinstance(function["parameters"], dict):
            raise _tools_error(f"{at}.function.parameters", "must be a JSON Schema object")
        if "strict" in function and not isinstance(function["strict"], bool | None):
            raise _tools_error(f"{at}.function.strict", "must be a boolean")
    return value


def check_tool_params(doc: Mapping[str, Any]) -> dict[str, Any]:
    """The tool parameters present in a request body, validated."""
    params: dict[str, Any] = {}
    tools = doc.get("tools")
    if tools is not None:
        params["tools"] = check_tools(tools)
    names = {t["function"]["name"] for t in params.get("tools", [])}
    choice = doc.get("tool_choice")
    if choice is not None:
        if isinstance(choice, dict):
            function = choice.get("function")
            if choice.get("type") != "function" or not isinstance(function, dict):
                raise _tools_error("tool_choice", "must name a function as OpenAI does")
            # A string first: `in names` (a set) raises TypeError on a list or an object.
            name = function.get("name")
            if not isinstance(name, str) or name not in names:
                raise _tools_error("tool_choice.function.name", "must name one of the tools")
        elif choice not in ("none", "auto", "required"):
            raise _tools_error("tool_choice", "must be none, auto, required or a function")
        elif choice != "none" and not names:
            raise _tools_error("tool_choice", "needs tools")
        params["tool_choice"] = choice
    parallel = doc.get("parallel_tool_calls")
    if parallel is not None:
        if not isinstance(parallel, bool):
            raise _tools_error("parallel_tool_calls", "must be a boolean")
        params["parallel_tool_calls"] = parallel
    return params


def _call_id(value: Any, where: str) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_ID_CHARS:
        raise _call_error(where, f"must be a string of 1-{MAX_ID_CHARS} characters")
    return value


def check_tool_calls(value: Any, where: str) -> list[dict[str, Any]]:
    """An assistant message's ``tool_calls``, in the clean shape sent upstream."""
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_CALLS_PER_MESSAGE:
        raise _call_error(where, f"must be an array of 1-{MAX_CALLS_PER_MESSAGE} calls")
    calls: list[dict[str, Any]] = []
    for i, call in enumerate(value):
        at = f"{where}[{i}]"
        if not isinstance(call, dict) or call.get("type", "function") != "function":
            raise _call_error(f"{at}.type", "must be 'function'")
        function = call.get("function")
        if not isinstance(function, dict):
            raise _call_error(f"{at}.function", "must be an object")
        arguments = function.get("arguments")
        if not isinstance(arguments, str):
            raise _call_error(f"{at}.function.arguments", "must be a string of JSON")
        calls.append(
            {
                "id": _call_id(call.get("id"), f"{at}.id"),
                "type": "function",
                "function": {
                    "name": _function_name(
                        function.get("name"), f"{at}.function.name", _call_error
                    ),
                    "arguments": arguments,
                },
            }
        )
    return calls


def tool_message(message: Mapping[str, Any], where: str) -> dict[str, Any]:
    """A ``tool`` message's extra field, checked: ``{"tool_call_id": …}``."""
    return {"tool_call_id": _call_id(message.get("tool_call_id"), f"{where}.tool_call_id")}


def check_tool_sequence(messages: Sequence[Mapping[str, Any]], where: str = "messages") -> None:
    """Every ``tool`` message answers a call made by an earlier assistant message,
    once: a result for no call cannot be sent to Anthropic or Gemini."""
    open_calls: set[str] = set()
    for i, message in enumerate(messages):
        if message.get("role") == "assistant":
            open_calls |= {c["id"] for c in message.get("tool_calls") or []}
        elif message.get("role") == "tool":
            call_id = message.get("tool_call_id")
            if call_id not in open_calls:
                raise _call_error(
                    f"{where}[{i}].tool_call_id", "must answer a tool call made before it"
                )
            open_calls.discard(str(call_id))


def paired(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """`messages` as every vendor takes them: each assistant message's tool calls cut
    down to those answered by the run of `tool` messages right after it, with those
    results only (the first for each call), and no `tool` message anywhere else.

    OpenAI, Anthropic and Gemini refuse a call without its result before the next
    turn, and a result that does not follow its call. A stored session holds both
    when a member answered calls with a query, answered some of them, or a turn
    settled between two others: sent as stored, that turn and every later one of the
    session were refused. An assistant message left with neither calls nor text is
    left out."""
    out: list[dict[str, Any]] = []
    i = 0
    while i < len(messages):
        message = dict(messages[i])
        i += 1
        if message.get("role") == "tool":
            continue  # not in the run right after its call
        calls = message.get("tool_calls") if message.get("role") == "assistant" else None
        if not calls:
            out.append(message)
            continue
        ids = {call["id"] for call in calls}
        results: list[dict[str, Any]] = []
        answered: set[str] = set()
        while i < len(messages) and messages[i].get("role") == "tool":
            call_id = messages[i].get("tool_call_id")
            if call_id in ids and call_id not in answered:
                answered.add(str(call_id))
                results.append(dict(messages[i]))
            i += 1
        kept: list[dict[str, Any]] = []
        for call in calls:
            if call["id"] in answered:
                answered.discard(call["id"])  # one call per id, as one result per id
                kept.append(call)
        if kept:
            out.append({**message, "tool_calls": kept})
        elif message.get("content"):
            del message["tool_calls"]
            out.append(message)
        out.extend(results)
    return out


def without_tool_calls(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """`messages` for a model without the ``tools`` feature: no `tool` message, and
    each assistant message without its calls (its text kept; one with no text left
    out). A stored session keeps the calls a model with tools made; a later turn on a
    model without tools sends the conversation's text, not what it cannot take."""
    out: list[dict[str, Any]] = []
    for message in messages:
        if message.get("role") == "tool":
            continue
        if message.get("role") == "assistant" and "tool_calls" in message:
            if not message.get("content"):
                continue
            message = {k: v for k, v in message.items() if k != "tool_calls"}
        out.append(dict(message))
    return out


def check_results_follow_calls(
    history: Sequence[Mapping[str, Any]], results: Sequence[Mapping[str, Any]], where: str
) -> None:
    """The `tool` messages `results`, appended to `history`, each answer once a call
    of the assistant message they follow (`paired` keeps them all): a result that
    cannot be sent next to its call is refused, not stored."""
    sent = paired([*history, *results])
    if len(sent) < len(results) or sent[len(sent) - len(results) :] != list(results):
        raise _call_error(
            where, "must answer, once each, tool calls of the session's last assistant message"
        )


def uses_tools(messages: Sequence[Mapping[str, Any]], params: Mapping[str, Any]) -> bool:
    """Whether the request needs the model's ``tools`` feature."""
    return bool(params.get("tools")) or any(
        m.get("role") == "tool" or m.get("tool_calls") for m in messages
    )
