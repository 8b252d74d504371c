"""Anthropic Messages API wire format.

Reference: https://docs.anthropic.com/en/api/messages-streaming. A stream is
`message_start` (input tokens; its `output_tokens` is a placeholder), content blocks
(`content_block_start`, `content_block_delta` with `text_delta`, `content_block_stop`),
`ping`s at any point, one or more `message_delta` (the stop reason, and usage that is
cumulative), then `message_stop`. A vendor `error` event may arrive at any time.

Tool calls (https://docs.anthropic.com/en/docs/agents-and-tools/tool-use): a
`tool_use` block starts with its `id` and `name` and streams its input as
`input_json_delta` fragments; we number tool blocks 0, 1, … as OpenAI numbers its
calls. Requests turn OpenAI's `tool_calls` into `tool_use` blocks and `tool`
messages into `tool_result` blocks of one user turn (docs/tool-calls.md). Images and
PDFs become `image` / `document` blocks (`stream_edge/upstream/parts.py`).

We emit one `Usage` per `message_delta`, combining `message_start`'s input with the
delta's cumulative output, so every `Usage` is complete when emitted (the meter keeps
the last). Input counts cache reads and writes too: the model processed them, and
Anthropic's `input_tokens` leaves them out; they are also reported apart
(`cached_input_tokens` = `cache_read_input_tokens`, `cache_write_tokens` =
`cache_creation_input_tokens`) to be priced at their own rates. `message_start`'s
input is also emitted at once (`InputUsage`): a stream cut before the last
`message_delta` is billed that input, not the estimate.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

import orjson

from stream_edge.upstream.base import (
    Completion,
    Delta,
    Finish,
    HttpRequest,
    InputUsage,
    JsonEventParser,
    ToolCall,
    ToolCallDelta,
    UpstreamCall,
    UpstreamEvent,
    Usage,
    arguments_object,
    json_text,
    message_text,
    token_count,
    trusted_headers,
    vendor_failure,
    vendor_usage,
)
from stream_edge.upstream.parts import anthropic_blocks, has_media

API_VERSION = "2023-06-01"
# Anthropic's stop reasons in OpenAI's vocabulary.
FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}
_INPUT_FIELDS = ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")


def finish_reason(stop_reason: str) -> str:
    return FINISH_REASONS.get(stop_reason, "stop")


def _input_tokens(usage: dict[str, Any]) -> tuple[int, int, int] | None:
    """(total input, cache reads, cache writes). Anthropic's `input_tokens` leaves
    both cache counts out, so the total is the sum of the three."""
    counts = [usage.get(name) for name in _INPUT_FIELDS]
    if not isinstance(counts[0], int):
        return None
    fresh, write, read = (token_count(c) for c in counts)
    return fresh + write + read, read, write


def _parts(input_counts: tuple[int, int, int]) -> tuple[int, int, int]:
    """`_input_tokens`'s answer back in `_INPUT_FIELDS` order (fresh, writes, reads)."""
    total, read, write = input_counts
    return total - read - write, write, read


def _usage(input_counts: tuple[int, int, int], output: int, raw: bytes = b"") -> Usage:
    total, read, write = input_counts
    return vendor_usage(total, output, raw, cached=read, cache_write=write)


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _block_index(doc: dict[str, Any]) -> int | None:
    """A content block event's `index`, None when it is no integer: such an event is
    malformed and skipped, as OpenAI's tool-call entry without one is. Looked up as
    it came, `[]` or `{}` raised TypeError (unhashable) and broke the stream off."""
    index = doc.get("index")
    return None if isinstance(index, bool) or not isinstance(index, int) else index


class AnthropicStreamParser(JsonEventParser):
    __slots__ = ("_input", "_last_usage", "_tool_blocks")

    def __init__(self) -> None:
        super().__init__()
        self._input: tuple[int, int, int] | None = None
        self._last_usage: Usage | None = None
        self._tool_blocks: dict[int, int] = {}  # content block index → tool call index

    def _interpret(self, doc: dict[str, Any], raw: bytes) -> list[UpstreamEvent]:
        kind = doc.get("type")
        if kind == "content_block_delta":
            delta = _dict(doc.get("delta"))
            text = delta.get("text")
            if delta.get("type") == "text_delta" and isinstance(text, str) and text:
                return [Delta(text, raw)]
            fragment = delta.get("partial_json")
            index = _block_index(doc)
            tool = None if index is None else self._tool_blocks.get(index)
            if delta.get("type") == "input_json_delta" and isinstance(fragment, str):
                if tool is not None and fragment:
                    return [ToolCallDelta(tool, None, None, fragment, raw)]
        elif kind == "content_block_start":
            block = _dict(doc.get("content_block"))
            index = _block_index(doc)
            if (
                index is not None
                and block.get("type") == "tool_use"
                and isinstance(block.get("name"), str)
            ):
                tool = self._tool_blocks[index] = len(self._tool_blocks)
                return [ToolCallDelta(tool, str(block.get("id") or ""), block["name"], "", raw)]
        elif kind == "message_start":
            # Its `output_tokens` is a placeholder (usually 1): only the input counts.
            self._input = _input_tokens(_dict(_dict(doc.get("message")).get("usage")))
            if self._input is not None:
                known = _usage(self._input, 0)  # clamped as the final usage will be
                return [
                    InputUsage(
                        raw, known.input_tokens, known.cached_input_tokens, known.cache_write_tokens
                    )
                ]
        elif kind == "message_delta":
            return self._message_delta(doc, raw)
        elif kind == "message_stop":
            self.done = True
        elif kind == "error":
            error = _dict(doc.get("error"))
            return [vendor_failure(error.get("type"), error.get("message"), self.withheld)]
        # ping, content_block_stop, and event types added later carry nothing
        # we bill or show; Anthropic's versioning policy says to ignore unknown ones.
        return []

    def _message_delta(self, doc: dict[str, Any], raw: bytes) -> list[UpstreamEvent]:
        out: list[UpstreamEvent] = []
        stop_reason = _dict(doc.get("delta")).get("stop_reason")
        if isinstance(stop_reason, str):
            out.append(Finish(finish_reason(stop_reason), raw))
        usage = _dict(doc.get("usage"))
        output = usage.get("output_tokens")
        # Newer API versions repeat the (cumulative) input counts here, each left out
        # when it does not apply: a count given replaces `message_start`'s, one left
        # out keeps it (as the official client does). Replacing all three with the
        # delta's dropped the cache reads and writes from the bill.
        if self._input is not None and any(isinstance(usage.get(n), int) for n in _INPUT_FIELDS):
            start = dict(zip(_INPUT_FIELDS, _parts(self._input), strict=True))
            input_tokens = _input_tokens(
                {n: usage[n] if isinstance(usage.get(n), int) else start[n] for n in _INPUT_FIELDS}
            )
        else:
            input_tokens = _input_tokens(usage)
        if input_tokens is not None:
            self._input = input_tokens
        if isinstance(output, int) and self._input is not None:
            current = _usage(self._input, output, raw)
            if self._last_usage is None or current.counts() != self._last_usage.counts():
                self._last_usage = current
                out.append(current)
        return out


# Anthropic takes only tool-use ids of this alphabet (its 400: "String should match
# pattern '^[a-zA-Z0-9_-]+$'"); OpenAI-compatible backends make ids of any
# characters, up to 256 of them. 64 is kept as a safe bound on the length.
_ANTHROPIC_ID = re.compile(r"[a-zA-Z0-9_-]{1,64}")


def tool_use_id(call_id: str) -> str:
    """`call_id` as Anthropic takes it (pure, deterministic): as it is when Anthropic
    would accept it, else a valid id derived from a hash of it, so a `tool_use` and
    its `tool_result` still match and a session sends the same id on every turn. A
    session may hold ids another vendor made (a turn on an OpenAI-compatible model):
    sent as they were, Anthropic refused every later turn of the session."""
    if _ANTHROPIC_ID.fullmatch(call_id):
        return call_id
    return "toolu_gw_" + hashlib.sha256(call_id.encode()).hexdigest()[:32]


def _tool_use_turn(message: dict[str, Any]) -> dict[str, Any]:
    text = message_text(message)
    blocks: list[dict[str, Any]] = [{"type": "text", "text": text}] if text else []
    for call in message["tool_calls"]:
        function = call["function"]
        blocks.append(
            {
                "type": "tool_use",
                "id": tool_use_id(call["id"]),
                "name": function["name"],
                "input": arguments_object(function["arguments"]),
            }
        )
    return {"role": "assistant", "content": blocks}


def _system_and_messages(
    messages: list[dict[str, Any]],
) -> tuple[str, list[dict[str, Any]]]:
    system: list[str] = []
    turns: list[dict[str, Any]] = []
    for message in messages:
        role, text = message.get("role"), message_text(message)
        if role in ("system", "developer"):
            system.append(text)
        elif role == "assistant" and message.get("tool_calls"):
            turns.append(_tool_use_turn(message))
        elif role == "tool":
            # Every result of one round of calls goes in one user turn, as Anthropic
            # requires right after the assistant's tool_use blocks.
            result = {
                "type": "tool_result",
                "tool_use_id": tool_use_id(message["tool_call_id"]),
                "content": text,
            }
            last = turns[-1] if turns else None
            if last is not None and last["role"] == "user" and isinstance(last["content"], list):
                last["content"].append(result)
            else:
                turns.append({"role": "user", "content": [result]})
        else:
            # Anthropic knows only user and assistant turns.
            content = message.get("content")
            turns.append(
                {
                    "role": "assistant" if role == "assistant" else "user",
                    "content": anthropic_blocks(content) if has_media(content) else text,
                }
            )
    return "\n\n".join(system), turns


def _tool(function: dict[str, Any]) -> dict[str, Any]:
    tool: dict[str, Any] = {"name": function["name"]}
    if "description" in function:
        tool["description"] = function["description"]
    # Anthropic requires a schema; OpenAI lets a function without parameters be.
    tool["input_schema"] = function.get("parameters") or {"type": "object", "properties": {}}
    return tool


def _tool_params(params: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's `tools` / `tool_choice` / `parallel_tool_calls` in Anthropic's words."""
    tools = params.get("tools")
    if not tools:
        return {}
    out: dict[str, Any] = {"tools": [_tool(t["function"]) for t in tools]}
    choice: Any = params.get("tool_choice", "auto")
    if isinstance(choice, dict):
        wanted: dict[str, Any] = {"type": "tool", "name": choice["function"]["name"]}
    else:
        wanted = {"type": {"required": "any"}.get(choice, choice)}
    if params.get("parallel_tool_calls") is False and wanted["type"] != "none":
        wanted["disable_parallel_tool_use"] = True
    if wanted != {"type": "auto"}:
        out["tool_choice"] = wanted
    return out


def _sampling(params: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(params.get("temperature"), int | float):
        # OpenAI allows 0 to 2, Anthropic 0 to 1.
        out["temperature"] = min(max(float(params["temperature"]), 0.0), 1.0)
    if isinstance(params.get("top_p"), int | float):
        out["top_p"] = params["top_p"]
    stop = params.get("stop")
    if isinstance(stop, str):
        out["stop_sequences"] = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        out["stop_sequences"] = stop
    if isinstance(params.get("user"), str):
        out["metadata"] = {"user_id": params["user"]}
    return out


def _history_tools(messages: list[dict[str, Any]]) -> dict[str, Any]:
    """Tools to declare for a request that offers none while its history holds
    `tool_use` blocks: Anthropic refuses such a request ("Requests which include
    `tool_use` or `tool_result` blocks must define tools"), as when a session that
    used tools goes on with a query without them. Each name the history used is
    declared with an open schema, and `tool_choice: none` keeps the model from
    calling any: the turn gets text, as asked."""
    names = dict.fromkeys(
        block["name"]
        for turn in messages
        if isinstance(turn["content"], list)
        for block in turn["content"]
        if block.get("type") == "tool_use"
    )
    if not names:
        return {}
    return {
        "tools": [_tool({"name": name}) for name in names],
        "tool_choice": {"type": "none"},
    }


class AnthropicMessagesAdapter:
    def build_request(self, call: UpstreamCall) -> HttpRequest:
        system, messages = _system_and_messages(call.messages)
        tools = _tool_params(call.params) or _history_tools(messages)
        body: dict[str, Any] = {
            **_sampling(call.params),
            **tools,
            "model": call.upstream_model,
            "max_tokens": call.max_tokens,  # required by Anthropic
            "messages": messages,
            "stream": call.stream,
        }
        if system:
            body["system"] = system
        headers = {
            "content-type": "application/json",
            "anthropic-version": API_VERSION,
            "x-request-id": call.request_id,
        }
        if call.stream:
            headers["accept"] = "text/event-stream"
        if call.api_key:
            headers["x-api-key"] = call.api_key
        headers |= trusted_headers(call)
        return HttpRequest(f"{call.base_url}/v1/messages", headers, orjson.dumps(body))

    def stream_parser(self) -> AnthropicStreamParser:
        return AnthropicStreamParser()

    def parse_completion(self, body: bytes, withheld: tuple[str, ...] = ()) -> Completion:
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise ValueError("the backend's answer is not JSON") from exc
        if not isinstance(doc, dict) or doc.get("type") != "message":
            raise ValueError("the backend's answer is not a message")
        blocks = doc.get("content")
        if not isinstance(blocks, list):
            raise ValueError("the backend's answer has no content")
        text = "".join(
            b["text"]
            for b in blocks
            if isinstance(b, dict) and b.get("type") == "text" and isinstance(b.get("text"), str)
        )
        calls = tuple(
            ToolCall(str(b.get("id") or ""), b["name"], json_text(b.get("input", {})))
            for b in blocks
            if isinstance(b, dict)
            and b.get("type") == "tool_use"
            and isinstance(b.get("name"), str)
        )
        stop_reason = doc.get("stop_reason")
        usage_doc = _dict(doc.get("usage"))
        input_tokens, output = _input_tokens(usage_doc), usage_doc.get("output_tokens")
        usage = (
            _usage(input_tokens, output)
            if input_tokens is not None and isinstance(output, int)
            else None
        )
        reason = finish_reason(stop_reason) if isinstance(stop_reason, str) else "stop"
        return Completion(text, reason, usage, calls)

    def error_status(self, status: int, body: bytes) -> int:
        return status

    def retry_after(self, body: bytes) -> float | None:
        return None  # its wait comes in the `Retry-After` header
