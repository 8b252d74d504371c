"""Validate a Chat Completions request body into a small value object (pure).

Only the fields the mock acts on are checked (``tools`` by name and schema, for
``[[mock tool_calls=N]]``); anything else OpenAI accepts (``temperature``, ...) is
ignored. An assistant message may carry ``tool_calls`` with no content, and a
``tool`` message answers one. Every problem is a 400 in OpenAI's
error shape, never a 500. `proto_field` reads a Gemini request's fields in either
proto3 JSON spelling.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson

from mock_llm.errors import MockAPIError
from mock_llm.script import Message
from mock_llm.tools import ToolSpec, openai_tools


@dataclass(frozen=True, slots=True)
class ChatRequest:
    model: str
    messages: tuple[Message, ...]
    stream: bool
    include_usage: bool
    max_tokens: int | None
    tools: tuple[ToolSpec, ...] = ()


def invalid(message: str, param: str | None) -> MockAPIError:
    return MockAPIError(400, message, code="invalid_request", param=param)


_UPPER = re.compile(r"(?<=[a-z0-9])([A-Z])")


def proto_field(message: object, name: str) -> Any:
    """A field of a Google (proto3 JSON) message by its lowerCamelCase ``name`` or the
    proto's own snake_case name; None when absent or null.

    A proto3 JSON parser must accept both (https://protobuf.dev/programming-guides/json/),
    Google's does, and its own SDK sends both (``{"inlineData": {"mime_type": …}}``).
    Only message fields are looked up so: the keys inside a Struct (a call's ``args``,
    a schema's ``properties``) are the caller's own names.
    """
    if not isinstance(message, dict):
        return None
    value = message.get(name)
    return value if value is not None else message.get(_UPPER.sub(r"_\1", name).lower())


def content_text(content: object, param: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise invalid(f"{param} must be a string or a list of text parts", param)
    texts: list[str] = []
    for index, part in enumerate(content):
        where = f"{param}[{index}]"
        media = _media_placeholder(part)
        if media is not None:
            texts.append(media)
            continue
        if (
            not isinstance(part, dict)
            or part.get("type") != "text"
            or not isinstance(part.get("text"), str)
        ):
            raise invalid(f'{where} must be {{"type": "text", "text": "..."}}', where)
        texts.append(part["text"])
    return "".join(texts)


# OpenAI's media parts and the field each must carry; the mock reads them as a
# placeholder in the prompt it answers.
_MEDIA_PARTS = {"image_url": "url", "file": "file_data", "input_audio": "data"}


def _media_placeholder(part: object) -> str | None:
    kind = part.get("type") if isinstance(part, dict) else None
    if not isinstance(part, dict) or kind not in _MEDIA_PARTS:
        return None
    body = part.get(kind)
    if not isinstance(body, dict) or not isinstance(body.get(_MEDIA_PARTS[kind]), str):
        return None
    return f"[{kind}]"


def parse_messages(value: object, roles: frozenset[str] | None = None) -> tuple[Message, ...]:
    """OpenAI-style ``[{role, content}]``; ``roles`` narrows the accepted roles."""
    if not isinstance(value, list) or not value:
        raise invalid("messages must be a non-empty array", "messages")
    messages: list[Message] = []
    for index, item in enumerate(value):
        where = f"messages[{index}]"
        if not isinstance(item, dict):
            raise invalid(f"{where} must be an object", where)
        role = item.get("role")
        if not isinstance(role, str) or not role or (roles is not None and role not in roles):
            allowed = f"one of {sorted(roles)}" if roles else "a non-empty string"
            raise invalid(f"{where}.role must be {allowed}", f"{where}.role")
        calls = item.get("tool_calls")
        if role == "assistant" and isinstance(calls, list) and item.get("content") is None:
            # What the model said is its calls: their JSON counts as its text.
            messages.append(Message(role, orjson.dumps(calls).decode()))
            continue
        messages.append(Message(role, content_text(item.get("content"), f"{where}.content")))
    return tuple(messages)


def positive_int(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    # bool is an int subclass; ``true`` is not a token count.
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise invalid(f"{name} must be a positive integer", name)
    return value


def flag(container: dict[str, Any], name: str, param: str) -> bool:
    value = container.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise invalid(f"{param} must be a boolean", param)
    return value


def parse_chat_request(body: object) -> ChatRequest:
    """The validated request, or :class:`MockAPIError` (400) naming the bad field."""
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object", None)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid("model must be a non-empty string", "model")
    messages = parse_messages(body.get("messages"))
    stream = flag(body, "stream", "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise invalid("stream_options must be an object", "stream_options")
    include_usage = flag(options or {}, "include_usage", "stream_options.include_usage")
    given = (positive_int(body, "max_tokens"), positive_int(body, "max_completion_tokens"))
    limits = [limit for limit in given if limit is not None]
    return ChatRequest(
        model=model,
        messages=messages,
        stream=stream,
        include_usage=include_usage,
        max_tokens=min(limits) if limits else None,
        tools=openai_tools(body.get("tools")),
    )
