"""The upstream adapter interface and the normalised events every adapter yields.

An adapter knows one vendor's wire format: how to build the request, and how to
turn the bytes of its stream into `Delta`, `ToolCallDelta`, `Usage`, `Finish` and
`Failure` events. Tool calls are normalised to OpenAI's streaming shape whatever the
vendor sends (docs/tool-calls.md): the first fragment of call `index` carries its
`id` and `name`, later ones only more `arguments` text.
It does no I/O itself, so each is tested by feeding it captured bytes.

A `Failure` carries one of the generic messages below, never the vendor's text: the
message reaches our client, and a vendor's error body may quote the request, an
account id or worse. Adapters log a short vendor message instead.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import quote

import orjson

from shared.logs import REDACTED
from shared.sse import MAX_EVENT, SSEDecoder, SSEError
from shared.webhooks import MAX_TOKENS_REPORTED

log = logging.getLogger("llmgw.edge.upstream")

MALFORMED_EVENT = "the backend sent a malformed event"
OVERSIZED_EVENT = f"the backend sent an event or line over {MAX_EVENT >> 20} MiB"
VENDOR_ERROR = "the backend reported an error mid-stream"


@dataclass(frozen=True, slots=True)
class CallerContext:
    """Who the stream is for. Sent to in-house backends that trust the gateway
    (providers with `service_token_env`), never to public vendors."""

    user_id: str
    company_id: str
    role: str
    session_id: str
    request_id: str


@dataclass(frozen=True, slots=True)
class UpstreamCall:
    """What to ask the backend for."""

    base_url: str
    api_key: str | None
    upstream_model: str
    messages: list[dict[str, Any]]
    max_tokens: int
    stream: bool
    params: dict[str, Any]
    request_id: str
    context: CallerContext | None = None
    service_token: str | None = None
    # Gemini's thought signatures for the history's calls, by call id: the ones the
    # edge kept for this company (`stream_edge.thought_signatures`); other vendors
    # have none.
    thought_signatures: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class HttpRequest:
    url: str
    headers: dict[str, str]
    body: bytes


@dataclass(frozen=True, slots=True)
class Delta:
    """A piece of the answer. `raw` is the vendor's event payload, kept for pass-through."""

    text: str
    raw: bytes = b""


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    """A fragment of tool call number `index` (0, 1, … in the order the calls start).
    `id` and `name` come with the call's first fragment; `arguments` is a piece of
    its JSON arguments text, to be concatenated."""

    index: int
    id: str | None
    name: str | None
    arguments: str
    raw: bytes = b""
    # Gemini's `thoughtSignature` on the call's part (opaque, up to kilobytes): kept
    # server-side and sent back with the call (`stream_edge.thought_signatures`),
    # never shown to the client. Not part of the call's identity.
    signature: str = field(default="", compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A whole tool call: `arguments` is the complete JSON text."""

    id: str
    name: str
    arguments: str
    signature: str = field(default="", compare=False, repr=False)  # see `ToolCallDelta`

    def openai(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


# Pieces a `Joined` keeps apart before joining them into one string.
JOIN_EVERY = 64


class Joined:
    """Text gathered a piece at a time (a stream's deltas, a call's argument
    fragments) and read once at the end, held as a few strings rather than one per
    piece. A delta kept whole is a str object of its own, ~60 bytes for a 4-character
    token (plus its list slot), for the stream's life: a 128k-token answer held 8 MB,
    200 such streams of one company 1.6 GB of the edge every company streams through.
    Every `JOIN_EVERY` pieces are joined into one (linear: each character is copied
    once more), so a token costs its characters and ~1 byte."""

    __slots__ = ("_joined", "_pieces")

    def __init__(self) -> None:
        self._joined: list[str] = []
        self._pieces: list[str] = []

    def append(self, piece: str) -> None:
        pieces = self._pieces
        pieces.append(piece)
        if len(pieces) >= JOIN_EVERY:
            self._joined.append("".join(pieces))
            pieces.clear()

    def text(self) -> str:
        return "".join(self._joined) + "".join(self._pieces)

    def __len__(self) -> int:
        """Characters held."""
        return sum(map(len, self._joined)) + sum(map(len, self._pieces))

    def __bool__(self) -> bool:
        return bool(self._joined or self._pieces)


class _PendingCall:
    __slots__ = ("arguments", "id", "name", "signature")

    def __init__(self) -> None:
        self.id = ""
        self.name = ""
        self.arguments = Joined()
        self.signature = ""  # Gemini's, kept server-side (`ToolCallDelta.signature`)


class ToolCalls:
    """Gathers `ToolCallDelta` fragments into whole calls, in index order.

    The fragments are gathered in a `Joined`: appending each to a growing string
    copies it whole every time, quadratic in the call's length (a backend sending
    200,000 fragments of 10 bytes held the event loop for over a minute)."""

    __slots__ = ("_calls",)

    def __init__(self) -> None:
        self._calls: dict[int, _PendingCall] = {}

    def add(self, delta: ToolCallDelta) -> None:
        call = self._calls.get(delta.index)
        if call is None:
            call = self._calls[delta.index] = _PendingCall()
        if delta.id:
            call.id = delta.id
        if delta.name:
            call.name = delta.name
        if delta.arguments:
            call.arguments.append(delta.arguments)
        if delta.signature:
            call.signature = delta.signature

    def __bool__(self) -> bool:
        return bool(self._calls)

    def complete(self) -> list[ToolCall]:
        calls = (self._calls[i] for i in sorted(self._calls))
        return [ToolCall(c.id, c.name, c.arguments.text(), c.signature) for c in calls]


@dataclass(frozen=True, slots=True)
class Usage:
    """What the backend says the stream used. `input_tokens` is the whole input, of
    which `cached_input_tokens` were cache reads and `cache_write_tokens` cache writes;
    `reasoning_tokens` are part of `output_tokens` (DESIGN §11 "Prices"). Build it with
    `vendor_usage()`, which keeps every part within its whole."""

    input_tokens: int
    output_tokens: int
    raw: bytes = b""
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0

    def counts(self) -> tuple[int, int, int, int, int]:
        return (
            self.input_tokens,
            self.output_tokens,
            self.cached_input_tokens,
            self.cache_write_tokens,
            self.reasoning_tokens,
        )


def token_count(value: Any) -> int:
    """A vendor's count, or 0 when it is not a positive integer (JSON `true` is not 1),
    at most what a usage webhook may carry: a wilder count would have the control
    plane refuse the report (422) and the stream go unsettled until its hold's end."""
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        return 0
    return min(value, MAX_TOKENS_REPORTED)


def vendor_usage(
    input_tokens: int,
    output_tokens: int,
    raw: bytes = b"",
    *,
    cached: Any = 0,
    cache_write: Any = 0,
    reasoning: Any = 0,
) -> Usage:
    """A `Usage` from a vendor's figures, clamped: a part never exceeds its whole, a
    count that is not a positive integer is 0. A backend that reports more cached
    than total input cannot make the uncached remainder (and the charge) negative;
    the control plane refuses such an event outright (`usage_events.parse_usage_event`)."""
    input_tokens, output_tokens = token_count(input_tokens), token_count(output_tokens)
    cached_tokens = min(token_count(cached), input_tokens)
    write_tokens = min(token_count(cache_write), input_tokens - cached_tokens)
    return Usage(
        input_tokens,
        output_tokens,
        raw,
        cached_tokens,
        write_tokens,
        min(token_count(reasoning), output_tokens),
    )


@dataclass(frozen=True, slots=True)
class Finish:
    reason: str
    raw: bytes = b""


@dataclass(frozen=True, slots=True)
class Failure:
    """The backend reported an error inside its stream."""

    message: str


class OutputLimit(Exception):
    """Raised by a stream's writer for an event past what it may hold for its client
    (`formats.EventSourceWriter`'s tool calls): the relay ends the stream as on a
    backend's `Failure`, with this message (a generic one, as a `Failure`'s)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True, slots=True)
class Passthrough:
    """A vendor event with nothing for billing (e.g. the role chunk); `raw` as received."""

    raw: bytes


@dataclass(frozen=True, slots=True)
class ReasoningDelta(Passthrough):
    """Reasoning an OpenAI-compatible backend streams beside the answer (DeepSeek's
    and vLLM's `reasoning_content`, OpenRouter's `reasoning`): forwarded as it came,
    like any passthrough, and counted as output (the vendor bills it as such)."""

    text: str = ""


@dataclass(frozen=True, slots=True)
class OutputSoFar(Passthrough):
    """A vendor's running count of the output generated so far, before its final
    usage (Gemini's `usageMetadata` on every frame, thinking included): not billable
    as the usage, but a floor for the estimate when that never comes."""

    output_tokens: int = 0


@dataclass(frozen=True, slots=True)
class InputUsage(Passthrough):
    """A vendor's count of the input before its final usage (Anthropic's
    `message_start`), cache reads and writes apart: what a stream cut before that
    usage is billed for its input, each part at its own rate, instead of every token
    of the estimate at the input rate. Parts within the whole, as `vendor_usage`."""

    input_tokens: int = 0
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0


UpstreamEvent = Delta | ToolCallDelta | Usage | Finish | Failure | Passthrough


@dataclass(frozen=True, slots=True)
class Completion:
    """A whole (non-streamed) answer."""

    text: str
    finish_reason: str
    usage: Usage | None
    tool_calls: tuple[ToolCall, ...] = ()


class CutStream(ValueError):
    """A whole answer that is a stream (an in-house SSE backend's) and is not a whole
    one: it failed or ended early. What it generated is billed from the events its
    reader counted as they were parsed (`completion._Tally`), not parsed again."""


class JsonEventParser:
    """The shared loop of every JSON-over-SSE vendor: decode SSE, parse each event's
    data as a JSON object, hand it to `_interpret`. A vendor with an end marker line
    (OpenAI's `[DONE]`) sets `done_marker`; the others set `done` in `_interpret`."""

    __slots__ = ("_decoder", "done", "withheld")
    done_marker: bytes | None = None

    def __init__(self) -> None:
        self._decoder = SSEDecoder()
        self.done = False
        self.withheld: tuple[str, ...] = ()

    def withhold(self, secrets: tuple[str, ...]) -> None:
        """The credentials this stream was sent with: a vendor's error that echoes
        one is logged without it (`vendor_failure`)."""
        self.withheld = tuple(s for s in secrets if s)

    def feed(self, chunk: bytes) -> list[UpstreamEvent]:
        events: list[UpstreamEvent] = []
        # Each event's data as bytes: parsed by orjson as is and kept as the raw
        # pass-through payload, never decoded to a str and encoded back.
        marker = self.done_marker
        try:
            datas = self._decoder.feed_data(chunk)
        except SSEError:  # an endless line or event: the stream cannot go on
            return [Failure(OVERSIZED_EVENT)]
        for data in datas:
            if data == marker:
                self.done = True
                continue
            try:
                doc = orjson.loads(data)
            except orjson.JSONDecodeError:
                events.append(Failure(MALFORMED_EVENT))
                continue
            if not isinstance(doc, dict):
                events.append(Failure(MALFORMED_EVENT))
                continue
            events.extend(self._interpret(doc, data))
        return events

    def _interpret(self, doc: dict[str, Any], raw: bytes) -> list[UpstreamEvent]:
        raise NotImplementedError


class StreamParser(Protocol):
    def feed(self, chunk: bytes) -> list[UpstreamEvent]: ...

    def withhold(self, secrets: tuple[str, ...]) -> None:
        """Keep `secrets` (the credentials sent) out of whatever the parser logs."""
        ...

    @property
    def done(self) -> bool:
        """True once the vendor's end-of-stream marker arrived."""
        ...


class Adapter(Protocol):
    def build_request(self, call: UpstreamCall) -> HttpRequest: ...

    def stream_parser(self) -> StreamParser: ...

    def parse_completion(self, body: bytes, withheld: tuple[str, ...] = ()) -> Completion:
        """Raise ValueError when the body is not a valid answer; `withheld` are the
        credentials sent, never logged should the answer quote them."""
        ...

    def error_status(self, status: int, body: bytes) -> int:
        """The HTTP status that best describes a vendor's error answer (usually
        `status`; Gemini reports a refused key as 400 `API_KEY_INVALID`, i.e. 401)."""
        ...

    def retry_after(self, body: bytes) -> float | None:
        """The seconds an error answer's body says to wait, for a vendor that says it
        there rather than in `Retry-After` (Gemini's `RetryInfo`); None otherwise."""
        ...


def parser_for(adapter: Adapter, withheld: tuple[str, ...]) -> StreamParser:
    """`adapter`'s parser for one stream sent `withheld` (its credentials): made here
    only, so no stream is parsed by one that could log them (`vendor_failure`)."""
    parser = adapter.stream_parser()
    parser.withhold(withheld)
    return parser


def _as_text(value: object) -> str:
    """A vendor's error field as log text: a string as it came, anything else as
    compact JSON. Not its Python repr: repr escapes a backslash or a quote depending
    on what surrounds it, so a credential holding one no longer matched the value
    cut out; and on a list nested 1,000 deep (orjson reads 1,024) repr raised
    RecursionError inside the parser. JSON escapes each character on its own, and
    orjson refuses what it cannot write (past 255 levels) with a TypeError."""
    if isinstance(value, str):
        return value
    try:
        return orjson.dumps(value).decode()
    except TypeError:
        return "(unprintable)"


def vendor_failure(kind: object, detail: object, withheld: tuple[str, ...] = ()) -> Failure:
    """A mid-stream vendor error: logged briefly, reported to the client generically.

    A backend may echo the credential it was sent (a hostile one, or a vendor quoting
    the key it refuses); a company's own key has any shape, so the log's pattern
    redaction cannot be trusted to know it: each credential sent is cut out by value,
    as sent and as JSON writes it (`_as_text`).
    """
    text = f"{_as_text(kind)} {_as_text(detail)}"
    for secret in withheld:
        text = text.replace(secret, REDACTED).replace(_as_text([secret])[2:-2], REDACTED)
    log.warning("upstream error event: %.240s", text)
    return Failure(VENDOR_ERROR)


def message_text(message: dict[str, Any]) -> str:
    """A message's content as one string (OpenAI allows a list of text parts)."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            part["text"]
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""


def openai_tool_deltas(value: Any, raw: bytes) -> list[ToolCallDelta]:
    """OpenAI's `delta.tool_calls` list (also the in-house convention) as fragments;
    entries without an integer `index` are malformed and skipped."""
    out: list[ToolCallDelta] = []
    for item in value if isinstance(value, list) else []:
        if not isinstance(item, dict):
            continue
        index = item.get("index")
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            continue
        function = item.get("function")
        function = function if isinstance(function, dict) else {}
        call_id, name, arguments = item.get("id"), function.get("name"), function.get("arguments")
        out.append(
            ToolCallDelta(
                index,
                call_id if isinstance(call_id, str) and call_id else None,
                name if isinstance(name, str) and name else None,
                arguments if isinstance(arguments, str) else "",
                raw,
            )
        )
    return out


def json_text(value: Any) -> str:
    """A tool call's arguments that a backend sent as JSON (Anthropic's `input`,
    Gemini's `args`) as JSON text again. ValueError when it cannot be: orjson writes
    at most 255 levels of nesting where it reads up to 1024, and its TypeError made a
    backend's unusable answer pass for an edge bug ("could not open the backend
    stream", an unexpected exception logged)."""
    try:
        return orjson.dumps(value).decode()
    except orjson.JSONEncodeError:
        raise ValueError("the backend sent a tool call nested too deep") from None


def openai_tool_calls(value: Any) -> tuple[ToolCall, ...]:
    """A whole message's `tool_calls` (OpenAI's non-streamed shape)."""
    calls: list[ToolCall] = []
    for item in value if isinstance(value, list) else []:
        function = item.get("function") if isinstance(item, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise ValueError("the backend's answer has a malformed tool call")
        arguments = function.get("arguments")
        calls.append(
            ToolCall(
                str(item.get("id") or ""),
                function["name"],
                arguments if isinstance(arguments, str) else json_text(arguments),
            )
        )
    return tuple(calls)


def json_object(text: str) -> dict[str, Any] | None:
    """`text` parsed, when it is a JSON object."""
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def arguments_object(arguments: str) -> dict[str, Any]:
    """An OpenAI call's `arguments` text as the JSON object Anthropic and Gemini want.
    Models write JSON objects; anything else is kept whole under `arguments`."""
    found = json_object(arguments)
    return found if found is not None else {"arguments": arguments}


def _header_value(value: str) -> str:
    # Claims are ours, but a header must never carry CR/LF or non-ASCII bytes.
    if value.isascii() and value.isprintable():
        return value
    return quote(value, safe="")


def trusted_headers(call: UpstreamCall) -> dict[str, str]:
    """`X-Service-Token` and the caller's context, for providers that trust the gateway.

    Only a provider configured with `service_token_env` gets them (jobs fill
    `service_token` from it); public vendors never learn who the caller is. The
    client's stream token is not among them: adapters never see it.
    """
    if not call.service_token:
        return {}
    headers = {"x-service-token": call.service_token}
    if call.context is not None:
        context = call.context
        headers |= {
            "x-user-id": _header_value(context.user_id),
            "x-company-id": _header_value(context.company_id),
            "x-user-role": _header_value(context.role),
            "x-session-id": _header_value(context.session_id),
            "x-request-id": _header_value(context.request_id),
        }
    return headers
