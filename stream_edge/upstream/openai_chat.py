"""OpenAI Chat Completions wire format (OpenAI, OpenRouter, vLLM, llama.cpp, Ollama).

Reference: https://platform.openai.com/docs/api-reference/chat/streaming. We always
ask for `stream_options.include_usage` so usage comes from the backend; it arrives in
a last chunk with `choices: []`, and every earlier chunk carries `usage: null`. An
interrupted stream has no usage chunk at all, and no `data: [DONE]`.
"""

from __future__ import annotations

from typing import Any

import orjson

from stream_edge.upstream.base import (
    Completion,
    Delta,
    Finish,
    HttpRequest,
    JsonEventParser,
    Passthrough,
    ReasoningDelta,
    UpstreamCall,
    UpstreamEvent,
    Usage,
    openai_tool_calls,
    openai_tool_deltas,
    trusted_headers,
    vendor_failure,
    vendor_usage,
)

DONE = "[DONE]"


def _details(doc: dict[str, Any], name: str) -> dict[str, Any]:
    value = doc.get(name)
    return value if isinstance(value, dict) else {}


def _usage(doc: Any, raw: bytes = b"") -> Usage | None:
    """`prompt_tokens` includes `prompt_tokens_details.cached_tokens`, and
    `completion_tokens` includes `completion_tokens_details.reasoning_tokens`
    (https://platform.openai.com/docs/api-reference/chat/object#chat/object-usage).
    Not at every OpenAI-compatible vendor: xAI's Grok counts its reasoning beside
    `completion_tokens`, Gemini's OpenAI-compatible endpoint its thinking, and both
    bill it as output; their `total_tokens` counts it. So the output is at least
    what the total says lies past the prompt (`_output`)."""
    if not isinstance(doc, dict):
        return None
    prompt, completion = doc.get("prompt_tokens"), doc.get("completion_tokens")
    if isinstance(prompt, int) and isinstance(completion, int):
        return vendor_usage(
            prompt,
            _output(prompt, completion, doc.get("total_tokens")),
            raw,
            cached=_details(doc, "prompt_tokens_details").get("cached_tokens"),
            reasoning=_details(doc, "completion_tokens_details").get("reasoning_tokens"),
        )
    return None


def _output(prompt: int, completion: int, total: Any) -> int:
    """The output a usage bills: `completion_tokens`, or what `total_tokens` counts
    past the prompt when that is more (reasoning counted beside the completion). Not
    the reasoning count added to the completion: a vendor that counts it inside may
    still report one more reasoning token than completion (Moonshot's Kimi), and
    adding would bill it twice."""
    if isinstance(total, int) and not isinstance(total, bool) and prompt >= 0:
        return max(completion, total - prompt)
    return completion


class OpenAIStreamParser(JsonEventParser):
    __slots__ = ()
    done_marker = DONE.encode()

    def _interpret(self, doc: dict[str, Any], raw: bytes) -> list[UpstreamEvent]:
        if "error" in doc:
            error = doc["error"]
            detail = error.get("message") if isinstance(error, dict) else error
            return [vendor_failure("openai", detail, self.withheld)]
        out: list[UpstreamEvent] = []
        choices = doc.get("choices")
        # A backend's `choices` that is no list of objects (a number, an object, `true`)
        # carries no choice: indexed as it came, it raised out of the parser and the
        # pump's catch-all ended a healthy stream as "the stream broke off".
        choice = (
            choices[0]
            if isinstance(choices, list) and choices and isinstance(choices[0], dict)
            else {}
        )
        delta = choice.get("delta") if isinstance(choice.get("delta"), dict) else {}
        if delta:
            thought = delta.get("reasoning_content") or delta.get("reasoning")
            if isinstance(thought, str) and thought:
                # Output the client reads: billed even when the usage never comes. It
                # may share a delta with the answer's first text (vLLM's reasoning
                # parser, a batching stream interval): both count.
                out.append(ReasoningDelta(raw, thought))
            text = delta.get("content")
            if isinstance(text, str) and text:
                out.append(Delta(text, raw))
        # Per event, a text delta with `usage: null`: the helpers below are called
        # only when there is something for them (a call saved is ~1 µs an event).
        if delta and delta.get("tool_calls") is not None:
            out.extend(openai_tool_deltas(delta["tool_calls"], raw))
        if isinstance(choice.get("finish_reason"), str):
            out.append(Finish(choice["finish_reason"], raw))
        if doc.get("usage") is not None:
            usage = _usage(doc["usage"], raw)
            if usage is not None:
                out.append(usage)
        if not out:
            out.append(Passthrough(raw))
        return out


class OpenAIChatAdapter:
    """OpenAI-compatible backends; an in-house vLLM with `service_token_env` also gets
    the trusted caller headers."""

    def build_request(self, call: UpstreamCall) -> HttpRequest:
        body: dict[str, Any] = {
            **call.params,
            "model": call.upstream_model,
            "messages": call.messages,
            "max_tokens": call.max_tokens,
            "stream": call.stream,
        }
        if call.stream:
            body["stream_options"] = {"include_usage": True}
        headers = {"content-type": "application/json", "x-request-id": call.request_id}
        if call.stream:
            headers["accept"] = "text/event-stream"
        if call.api_key:
            headers["authorization"] = f"Bearer {call.api_key}"
        headers |= trusted_headers(call)
        return HttpRequest(f"{call.base_url}/chat/completions", headers, orjson.dumps(body))

    def stream_parser(self) -> OpenAIStreamParser:
        return OpenAIStreamParser()

    def parse_completion(self, body: bytes, withheld: tuple[str, ...] = ()) -> Completion:
        try:
            doc = orjson.loads(body)
            choice = doc["choices"][0]
            text = choice["message"].get("content") or ""
            reason = choice.get("finish_reason") or "stop"
            calls = openai_tool_calls(choice["message"].get("tool_calls"))
        except (orjson.JSONDecodeError, KeyError, IndexError, TypeError, AttributeError) as exc:
            raise ValueError("the backend's answer is malformed") from exc
        if not isinstance(text, str):
            raise ValueError("the backend's answer is malformed")
        return Completion(text, str(reason), _usage(doc.get("usage")), calls)

    def error_status(self, status: int, body: bytes) -> int:
        # OpenAI answers a request over its organization's tokens per minute on its own
        # with a 429 like a load 429's: its size, not the key's load (every key would
        # refuse it, and resting them would rest them for everyone): a 413.
        if status == 429 and _too_large_for_the_limit(body):
            return 413
        return status

    def retry_after(self, body: bytes) -> float | None:
        return None  # its wait comes in the `Retry-After` header


def _too_large_for_the_limit(body: bytes) -> bool:
    """Whether OpenAI's 429 says the request alone exceeds the limit: code
    ``rate_limit_exceeded`` and a message starting ``Request too large for`` (a load
    429 starts ``Rate limit reached for``). The message is OpenAI's own words, never
    the request's."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return False
    error = doc.get("error") if isinstance(doc, dict) else None
    if not isinstance(error, dict) or error.get("code") != "rate_limit_exceeded":
        return False
    message = error.get("message")
    return isinstance(message, str) and message.startswith("Request too large for ")
