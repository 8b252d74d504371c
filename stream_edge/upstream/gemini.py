"""Google Gemini API (`generativelanguage.googleapis.com`) wire format.

Reference: https://ai.google.dev/api/generate-content. We stream with
`models/{model}:streamGenerateContent?alt=sse`: each `data:` frame is a whole
`GenerateContentResponse` and frames end in CRLF (`\\r\\n\\r\\n`), which our SSE decoder
handles split anywhere. There is no `[DONE]`: the stream is over at the frame with
`finishReason` (or a blocked prompt's `promptFeedback.blockReason`).

`usageMetadata` rides on many frames and grows as the answer does, so a partial count
is not billable: we emit `Usage` only from the finishing frame on. Output counts the
model's thinking tokens too (`thoughtsTokenCount`), which Google bills as output.
The key goes in the `x-goog-api-key` header, never in the URL, where logs keep it.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import orjson

from stream_edge.upstream.base import (
    Completion,
    Delta,
    Finish,
    HttpRequest,
    JsonEventParser,
    UpstreamCall,
    UpstreamEvent,
    Usage,
    message_text,
    trusted_headers,
    vendor_failure,
)

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


def _usage(doc: dict[str, Any]) -> Usage | None:
    meta = _dict(doc.get("usageMetadata"))
    prompt = meta.get("promptTokenCount")
    if not isinstance(prompt, int):
        return None
    output = sum(
        n
        for n in (meta.get("candidatesTokenCount"), meta.get("thoughtsTokenCount"))
        if isinstance(n, int)
    )
    return Usage(prompt, output)


def _read(doc: dict[str, Any]) -> tuple[str, str | None]:
    """The text of the first candidate (thought summaries left out) and its finish."""
    candidates = doc.get("candidates")
    candidate = _dict(candidates[0]) if isinstance(candidates, list) and candidates else {}
    parts = _dict(candidate.get("content")).get("parts")
    text = "".join(
        p["text"]
        for p in (parts if isinstance(parts, list) else [])
        if isinstance(p, dict) and isinstance(p.get("text"), str) and not p.get("thought")
    )
    reason = candidate.get("finishReason")
    if isinstance(reason, str):
        return text, finish_reason(reason)
    if not candidate and _dict(doc.get("promptFeedback")).get("blockReason"):
        return text, "content_filter"
    return text, None


class GeminiStreamParser(JsonEventParser):
    __slots__ = ("_last_usage",)

    def __init__(self) -> None:
        super().__init__()
        self._last_usage: tuple[int, int] | None = None

    def _interpret(self, doc: dict[str, Any], raw: bytes) -> list[UpstreamEvent]:
        if "error" in doc:
            error = _dict(doc["error"])
            return [vendor_failure(str(error.get("status")), error.get("message"))]
        text, reason = _read(doc)
        out: list[UpstreamEvent] = []
        if text:
            out.append(Delta(text, raw))
        if reason is not None and not self.done:
            self.done = True
            out.append(Finish(reason, raw))
        usage = _usage(doc) if self.done else None
        if usage is not None and (usage.input_tokens, usage.output_tokens) != self._last_usage:
            self._last_usage = (usage.input_tokens, usage.output_tokens)
            out.append(Usage(usage.input_tokens, usage.output_tokens, raw))
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


def request_body(call: UpstreamCall) -> dict[str, Any]:
    system: list[dict[str, str]] = []
    contents: list[dict[str, Any]] = []
    for message in call.messages:
        role, text = message.get("role"), message_text(message)
        if role in ("system", "developer"):
            system.append({"text": text})
        else:
            contents.append(
                {"role": "model" if role == "assistant" else "user", "parts": [{"text": text}]}
            )
    body: dict[str, Any] = {"contents": contents, "generationConfig": _generation_config(call)}
    if system:
        body["systemInstruction"] = {"parts": system}
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

    def parse_completion(self, body: bytes) -> Completion:
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise ValueError("the backend's answer is not JSON") from exc
        if not isinstance(doc, dict) or "error" in doc:
            raise ValueError("the backend's answer is not a GenerateContentResponse")
        if not doc.get("candidates") and not doc.get("promptFeedback"):
            raise ValueError("the backend's answer has no candidates")
        text, reason = _read(doc)
        return Completion(text=text, finish_reason=reason or "stop", usage=_usage(doc))

    def error_status(self, status: int, body: bytes) -> int:
        # Google answers a wrong or expired key with 400 INVALID_ARGUMENT, reason
        # API_KEY_INVALID (a missing key is 403): it is an auth failure, not a bad request.
        if status == 400 and b"API_KEY_INVALID" in body:
            return 401
        return status
