"""Google Gemini API (`generativelanguage.googleapis.com`) wire format.

Reference: https://ai.google.dev/api/generate-content. We stream with
`models/{model}:streamGenerateContent?alt=sse`: each `data:` frame is a whole
`GenerateContentResponse` and frames end in CRLF (`\\r\\n\\r\\n`), which our SSE decoder
handles split anywhere. There is no `[DONE]`: the stream is over at the frame with
`finishReason` (or a blocked prompt's `promptFeedback.blockReason`).

`usageMetadata` rides on many frames and grows as the answer does, so a partial count
is not billable: we emit `Usage` only from the finishing frame on, and before it the
output counted so far (`OutputSoFar`, thinking included), the floor of the estimate
for a stream that ends before its usage (a client leaving while the model thinks). Output counts the
model's thinking tokens too (`thoughtsTokenCount`), which Google bills as output; they
are also reported as `reasoning_tokens`, and `cachedContentTokenCount` (part of
`promptTokenCount`) as `cached_input_tokens`.
The key goes in the `x-goog-api-key` header, never in the URL, where logs keep it.

Tool calls (https://ai.google.dev/gemini-api/docs/function-calling): OpenAI's `tools`
become `functionDeclarations`, `tool_choice` a `toolConfig`; an assistant's
`tool_calls` become `functionCall` parts and `tool` messages `functionResponse` parts
(named after the call they answer). Gemini streams each call whole, in one part,
often without an id, and finishes with `STOP`: we give each call an id, send its
arguments as one fragment and report `tool_calls` as the finish reason. A call's
`thoughtSignature` rides on its `ToolCallDelta` / `ToolCall` (never to the client);
the edge keeps it and passes it back in `UpstreamCall.thought_signatures`
(`stream_edge.thought_signatures`).

Images, PDFs and audio become `inlineData` / `fileData` parts
(`stream_edge/upstream/parts.py`).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

import orjson

from stream_edge.upstream.base import (
    MALFORMED_EVENT,
    Completion,
    Delta,
    Failure,
    Finish,
    HttpRequest,
    JsonEventParser,
    OutputSoFar,
    ToolCall,
    ToolCallDelta,
    UpstreamCall,
    UpstreamEvent,
    Usage,
    arguments_object,
    json_object,
    json_text,
    message_text,
    token_count,
    trusted_headers,
    vendor_failure,
    vendor_usage,
)
from stream_edge.upstream.parts import gemini_parts, has_media

FINISH_REASONS = {
    "STOP": "stop",
    "MAX_TOKENS": "length",
    "SAFETY": "content_filter",
    "RECITATION": "content_filter",
    "BLOCKLIST": "content_filter",
    "PROHIBITED_CONTENT": "content_filter",
    "SPII": "content_filter",
    "IMAGE_SAFETY": "content_filter",
    "MALFORMED_FUNCTION_CALL": "tool_calls",
}


def finish_reason(reason: str) -> str:
    return FINISH_REASONS.get(reason, "stop")


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _usage(doc: dict[str, Any], raw: bytes = b"") -> Usage | None:
    meta = _dict(doc.get("usageMetadata"))
    prompt = meta.get("promptTokenCount")
    if not isinstance(prompt, int):
        return None
    thoughts = meta.get("thoughtsTokenCount")
    output = _answer_and_thoughts(meta)
    # `promptTokenCount` includes `cachedContentTokenCount`; thoughts are reasoning.
    return vendor_usage(
        prompt, output, raw, cached=meta.get("cachedContentTokenCount"), reasoning=thoughts
    )


def _answer_and_thoughts(meta: dict[str, Any]) -> int:
    """Gemini's output: its answer and its thoughts (reasoning), both billed."""
    return token_count(meta.get("candidatesTokenCount")) + token_count(
        meta.get("thoughtsTokenCount")
    )


def _output_so_far(doc: dict[str, Any]) -> int:
    """The output `_usage` would count (answer and thoughts), 0 without a usage."""
    meta = _dict(doc.get("usageMetadata"))
    if not isinstance(meta.get("promptTokenCount"), int):
        return 0
    return token_count(_answer_and_thoughts(meta))


def _signature(part: dict[str, Any]) -> str:
    """A part's `thoughtSignature` (Gemini 3 signs the first call of each step)."""
    value = part.get("thoughtSignature")
    return value if isinstance(value, str) else ""


def _read(doc: dict[str, Any]) -> tuple[str, list[ToolCall], str | None]:
    """The text of the first candidate (thought summaries left out), its function
    calls (ids made up where Gemini sends none) and its finish."""
    candidates = doc.get("candidates")
    candidate = _dict(candidates[0]) if isinstance(candidates, list) and candidates else {}
    parts = _dict(candidate.get("content")).get("parts")
    parts = [p for p in (parts if isinstance(parts, list) else []) if isinstance(p, dict)]
    text = "".join(
        p["text"] for p in parts if isinstance(p.get("text"), str) and not p.get("thought")
    )
    calls = [
        ToolCall(
            str(call.get("id") or f"call_{uuid.uuid4().hex[:24]}"),
            call["name"],
            json_text(_dict(call.get("args"))),
            _signature(part),
        )
        for part, call in ((p, _dict(p.get("functionCall"))) for p in parts)
        if isinstance(call.get("name"), str)
    ]
    reason = candidate.get("finishReason")
    if isinstance(reason, str):
        return text, calls, finish_reason(reason)
    if not candidate and _dict(doc.get("promptFeedback")).get("blockReason"):
        return text, calls, "content_filter"
    return text, calls, None


class GeminiStreamParser(JsonEventParser):
    __slots__ = ("_calls", "_last_usage", "_output_so_far")

    def __init__(self) -> None:
        super().__init__()
        self._last_usage: tuple[int, ...] | None = None
        self._output_so_far = 0
        self._calls = 0

    def _interpret(self, doc: dict[str, Any], raw: bytes) -> list[UpstreamEvent]:
        if "error" in doc:
            error = _dict(doc["error"])
            return [vendor_failure(error.get("status"), error.get("message"), self.withheld)]
        try:
            text, calls, reason = _read(doc)
        except ValueError:  # a call whose args cannot be forwarded (`json_text`)
            return [Failure(MALFORMED_EVENT)]
        out: list[UpstreamEvent] = []
        if text:
            out.append(Delta(text, raw))
        for call in calls:
            out.append(
                ToolCallDelta(self._calls, call.id, call.name, call.arguments, raw, call.signature)
            )
            self._calls += 1
        if reason is not None and not self.done:
            self.done = True
            out.append(Finish("tool_calls" if self._calls and reason == "stop" else reason, raw))
        if not self.done:
            # Before the finish only the running output count matters (a floor for a
            # client that leaves): read it alone, not the whole usage, on every frame.
            so_far = _output_so_far(doc)
            if so_far > self._output_so_far:
                self._output_so_far = so_far
                out.append(OutputSoFar(raw, so_far))
            return out
        usage = _usage(doc, raw)
        if usage is not None and usage.counts() != self._last_usage:
            self._last_usage = usage.counts()
            out.append(usage)
        return out


def _generation_config(call: UpstreamCall) -> dict[str, Any]:
    config: dict[str, Any] = {"maxOutputTokens": call.max_tokens}
    names = {
        "temperature": "temperature",
        "top_p": "topP",
        "seed": "seed",
        "presence_penalty": "presencePenalty",
        "frequency_penalty": "frequencyPenalty",
    }
    for ours, theirs in names.items():
        value = call.params.get(ours)
        if isinstance(value, int | float) and not isinstance(value, bool):
            config[theirs] = value
    stop = call.params.get("stop")
    if isinstance(stop, str):
        config["stopSequences"] = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        config["stopSequences"] = stop
    return config


# Google's documented stand-in for a thought signature we do not hold
# (https://ai.google.dev/gemini-api/docs/thought-signatures, "dummy signatures").
SKIP_SIGNATURE = "skip_thought_signature_validator"


def _function_call_turn(
    message: dict[str, Any], names: dict[str, str], signatures: Mapping[str, str]
) -> dict[str, Any]:
    """A `model` turn of `functionCall` parts. Gemini 3 refuses a history whose
    function call (the first of each step) comes back without the `thoughtSignature`
    it was made with, and without its own signature loses the reasoning behind the
    call. A call's OpenAI shape carries no signature: the edge keeps the model's
    server-side (`stream_edge.thought_signatures`) and `signatures` holds those found
    for this history's calls. A turn whose first call has none (a call the edge did
    not keep: another vendor's, expired, the store down) gets Google's stand-in there.
    Gemini 2.5 takes both."""
    text = message_text(message)
    parts: list[dict[str, Any]] = [{"text": text}] if text else []
    for i, call in enumerate(message["tool_calls"]):
        function = call["function"]
        names[call["id"]] = function["name"]
        args = arguments_object(function["arguments"])
        part: dict[str, Any] = {"functionCall": {"name": function["name"], "args": args}}
        signature = signatures.get(call["id"]) or (SKIP_SIGNATURE if i == 0 else None)
        if signature:
            part["thoughtSignature"] = signature
        parts.append(part)
    return {"role": "model", "parts": parts}


def _function_response(message: dict[str, Any], names: dict[str, str]) -> dict[str, Any]:
    # Gemini matches a response to its call by the function's name; a JSON object
    # result goes as it is, anything else under `content`.
    text = message_text(message)
    response = json_object(text)
    if response is None:
        response = {"content": text}
    name = names.get(message["tool_call_id"], "unknown")
    return {"functionResponse": {"name": name, "response": response}}


def _tool_config(params: dict[str, Any]) -> dict[str, Any]:
    tools = params.get("tools")
    if not tools:
        return {}
    declarations = []
    for tool in tools:
        function = tool["function"]
        declaration = {"name": function["name"]}
        if "description" in function:
            declaration["description"] = function["description"]
        if function.get("parameters"):
            # OpenAI's `parameters` is full JSON Schema; Gemini's `parameters` is an
            # OpenAPI subset that refuses `additionalProperties`, `$schema`, `$ref`,
            # `oneOf`, `const`… (a 400 for the whole turn). `parametersJsonSchema`
            # takes JSON Schema as it is.
            declaration["parametersJsonSchema"] = function["parameters"]
        declarations.append(declaration)
    out: dict[str, Any] = {"tools": [{"functionDeclarations": declarations}]}
    choice = params.get("tool_choice")
    if isinstance(choice, dict):
        config = {"mode": "ANY", "allowedFunctionNames": [choice["function"]["name"]]}
        out["toolConfig"] = {"functionCallingConfig": config}
    elif choice in ("none", "required"):
        mode = {"none": "NONE", "required": "ANY"}[choice]
        out["toolConfig"] = {"functionCallingConfig": {"mode": mode}}
    return out


def request_body(call: UpstreamCall) -> dict[str, Any]:
    system: list[dict[str, str]] = []
    contents: list[dict[str, Any]] = []
    names: dict[str, str] = {}  # tool call id → function name
    for message in call.messages:
        role, text = message.get("role"), message_text(message)
        if role in ("system", "developer"):
            system.append({"text": text})
        elif role == "assistant" and message.get("tool_calls"):
            contents.append(_function_call_turn(message, names, call.thought_signatures))
        elif role == "tool":
            part = _function_response(message, names)
            last = contents[-1] if contents else None
            if (
                last is not None
                and last["role"] == "user"
                and "functionResponse" in last["parts"][0]
            ):
                last["parts"].append(part)  # one turn answers one round of calls
            else:
                contents.append({"role": "user", "parts": [part]})
        else:
            content = message.get("content")
            parts = gemini_parts(content) if has_media(content) else [{"text": text}]
            contents.append({"role": "model" if role == "assistant" else "user", "parts": parts})
    body: dict[str, Any] = {"contents": contents, "generationConfig": _generation_config(call)}
    if system:
        body["systemInstruction"] = {"parts": system}
    body |= _tool_config(call.params)
    return body


class GeminiAdapter:
    def build_request(self, call: UpstreamCall) -> HttpRequest:
        model = quote(call.upstream_model, safe="")
        method = "streamGenerateContent?alt=sse" if call.stream else "generateContent"
        headers = {"content-type": "application/json", "x-request-id": call.request_id}
        if call.stream:
            headers["accept"] = "text/event-stream"
        if call.api_key:
            headers["x-goog-api-key"] = call.api_key
        headers |= trusted_headers(call)
        url = f"{call.base_url}/v1beta/models/{model}:{method}"
        return HttpRequest(url, headers, orjson.dumps(request_body(call)))

    def stream_parser(self) -> GeminiStreamParser:
        return GeminiStreamParser()

    def parse_completion(self, body: bytes, withheld: tuple[str, ...] = ()) -> Completion:
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise ValueError("the backend's answer is not JSON") from exc
        if not isinstance(doc, dict) or "error" in doc:
            raise ValueError("the backend's answer is not a GenerateContentResponse")
        if not doc.get("candidates") and not doc.get("promptFeedback"):
            raise ValueError("the backend's answer has no candidates")
        text, calls, reason = _read(doc)
        if calls and reason in (None, "stop"):
            reason = "tool_calls"
        return Completion(text, reason or "stop", _usage(doc), tuple(calls))

    def error_status(self, status: int, body: bytes) -> int:
        # Google answers a wrong or expired key with 400 INVALID_ARGUMENT, reason
        # API_KEY_INVALID (a missing key is 403): it is an auth failure, not a bad request.
        if status == 400 and _key_invalid(body):
            return 401
        return status

    def retry_after(self, body: bytes) -> float | None:
        return retry_delay(body)


# A protobuf Duration in JSON: decimal seconds, up to nine fractional digits, then "s".
_DURATION = re.compile(r"([0-9]{1,9})(?:\.([0-9]{1,9}))?s")


def retry_delay(body: bytes) -> float | None:
    """The wait a Google error asks for: its ``google.rpc.RetryInfo`` detail's
    ``retryDelay`` ("17s", "45.837906927s"). Google sends no ``Retry-After`` header
    with a 429: without this the edge told clients to come back in 1 s and rested the
    key for its default, whatever Google said."""
    for detail in _error_details(body):
        if not str(detail.get("@type", "")).endswith("google.rpc.RetryInfo"):
            continue
        delay = detail.get("retryDelay")
        match = _DURATION.fullmatch(delay) if isinstance(delay, str) else None
        if match is not None:
            return int(match[1]) + float(f"0.{match[2] or 0}")
    return None


def _key_invalid(body: bytes) -> bool:
    """Whether Google's error says the key is invalid: a ``google.rpc.ErrorInfo``
    detail with that reason. Not the words anywhere in the body: Google quotes a
    request's own names in its 400s (``Unknown name "…" at 'tools[0]…'``), and a
    member's tool schema would then read as a refused platform key."""
    return any(d.get("reason") == "API_KEY_INVALID" for d in _error_details(body))


def _error_details(body: bytes) -> list[dict[str, Any]]:
    """The ``error.details`` objects of a Google error body (none if it is not one)."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return []
    error = doc.get("error") if isinstance(doc, dict) else None
    details = error.get("details") if isinstance(error, dict) else None
    return [d for d in details if isinstance(d, dict)] if isinstance(details, list) else []
