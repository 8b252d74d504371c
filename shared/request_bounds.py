"""How many messages, content parts and tool calls one chat request may carry (pure).

Both services check a request with `check_item_counts` before validating or sizing
any item: the control plane at init (the messages, or the ``tool_results``), the edge
at ``/v1/chat/completions``. Each item costs a few microseconds of Python on the
event loop (its checks, its rebuilt copy, its share of the input estimate), and the
body's own caps (1 MiB, `shared.input_size.MAX_JSON_CONTAINERS`) still let 34,000
one-line messages, 39,000 empty text parts or 20,000 tool calls through: 40 to 80 ms
of an event loop per request, every stream on it stalled meanwhile, and at the edge
repeatable at will, as a refused body never uses its token. The caps keep one
request to a few milliseconds at most and stay far above real conversations:

* `MAX_MESSAGES`: init's long-standing cap, now the edge's too (OpenAI's own is
  2,048; a stored session is capped at 1,000 messages by default);
* `MAX_CONTENT_PARTS` in the whole request: a part per message (as many SDKs send
  text) plus an image or a file for each, and more than any vendor takes in images
  (Anthropic 100 a request, OpenAI 500);
* `MAX_TOOL_CALLS` in the whole request, beside the 128 per assistant message.

Counting reads only list lengths, so it is cheap whatever the items hold; malformed
items are left for the validators that follow.
"""

from __future__ import annotations

from typing import Any

from shared.input_size import InputRejected

MAX_MESSAGES = 1000
MAX_CONTENT_PARTS = 2000
MAX_TOOL_CALLS = 2000


def check_item_counts(messages: Any, where: str = "messages") -> None:
    """Raise `InputRejected` naming the field when `messages` is a list of more than
    `MAX_MESSAGES` (``invalid_content``), or its messages hold more than
    `MAX_CONTENT_PARTS` content parts (``invalid_content``) or `MAX_TOOL_CALLS` tool
    calls (``invalid_tool_call``) together."""
    if not isinstance(messages, list):
        return
    if len(messages) > MAX_MESSAGES:
        raise InputRejected("invalid_content", where, f"must have at most {MAX_MESSAGES} items")
    parts = calls = 0
    for message in messages:
        if not isinstance(message, dict):
            continue
        content = message.get("content")
        if isinstance(content, list):
            parts += len(content)
        tool_calls = message.get("tool_calls")
        if isinstance(tool_calls, list):
            calls += len(tool_calls)
    if parts > MAX_CONTENT_PARTS:
        raise InputRejected(
            "invalid_content",
            f"{where}[].content",
            f"must hold at most {MAX_CONTENT_PARTS} content parts in all (here {parts})",
        )
    if calls > MAX_TOOL_CALLS:
        raise InputRejected(
            "invalid_tool_call",
            f"{where}[].tool_calls",
            f"must hold at most {MAX_TOOL_CALLS} tool calls in all (here {calls})",
        )
