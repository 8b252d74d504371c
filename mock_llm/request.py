"""Validate a Chat Completions request body into a small value object (pure).

Only the fields the mock acts on are checked; anything else OpenAI accepts
(``temperature``, ``tools``, ...) is ignored. Every problem is a 400 in OpenAI's
error shape, never a 500.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mock_llm.errors import MockAPIError
from mock_llm.script import Message


@dataclass(frozen=True, slots=True)
class ChatRequest:
    model: str
    messages: tuple[Message, ...]
    stream: bool
    include_usage: bool
    max_tokens: int | None


def _invalid(message: str, param: str | None) -> MockAPIError:
    return MockAPIError(400, message, code="invalid_request", param=param)


def _content_text(content: object, param: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _invalid(f"{param} must be a string or a list of text parts", param)
    texts: list[str] = []
    for index, part in enumerate(content):
        where = f"{param}[{index}]"
        if (
            not isinstance(part, dict)
            or part.get("type") != "text"
            or not isinstance(part.get("text"), str)
        ):
            raise _invalid(f'{where} must be {{"type": "text", "text": "..."}}', where)
        texts.append(part["text"])
    return "".join(texts)


def _messages(value: object) -> tuple[Message, ...]:
    if not isinstance(value, list) or not value:
        raise _invalid("messages must be a non-empty array", "messages")
    messages: list[Message] = []
    for index, item in enumerate(value):
        where = f"messages[{index}]"
        if not isinstance(item, dict):
            raise _invalid(f"{where} must be an object", where)
        role = item.get("role")
        if not isinstance(role, str) or not role:
            raise _invalid(f"{where}.role must be a non-empty string", f"{where}.role")
        messages.append(Message(role, _content_text(item.get("content"), f"{where}.content")))
    return tuple(messages)


def _limit(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    # bool is an int subclass; ``true`` is not a token count.
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _invalid(f"{name} must be a positive integer", name)
    return value


def _flag(container: dict[str, Any], name: str, param: str) -> bool:
    value = container.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _invalid(f"{param} must be a boolean", param)
    return value


def parse_chat_request(body: object) -> ChatRequest:
    """The validated request, or :class:`MockAPIError` (400) naming the bad field."""
    if not isinstance(body, dict):
        raise _invalid("the request body must be a JSON object", None)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _invalid("model must be a non-empty string", "model")
    messages = _messages(body.get("messages"))
    stream = _flag(body, "stream", "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise _invalid("stream_options must be an object", "stream_options")
    include_usage = _flag(options or {}, "include_usage", "stream_options.include_usage")
    given = (_limit(body, "max_tokens"), _limit(body, "max_completion_tokens"))
    limits = [limit for limit in given if limit is not None]
    return ChatRequest(
        model=model,
        messages=messages,
        stream=stream,
        include_usage=include_usage,
        max_tokens=min(limits) if limits else None,
    )
