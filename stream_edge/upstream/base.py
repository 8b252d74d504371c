"""The upstream adapter interface and the normalised events every adapter yields.

An adapter knows one vendor's wire format: how to build the request, and how to
turn the bytes of its stream into `Delta`, `Usage`, `Finish` and `Failure` events.
It does no I/O itself, so each is tested by feeding it captured bytes.

A `Failure` carries one of the generic messages below, never the vendor's text: the
message reaches our client, and a vendor's error body may quote the request, an
account id or worse. Adapters log a short vendor message instead.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import quote

import orjson

from shared.sse import SSEDecoder

log = logging.getLogger("llmgw.edge.upstream")

MALFORMED_EVENT = "the backend sent a malformed event"
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
class Usage:
    input_tokens: int
    output_tokens: int
    raw: bytes = b""


@dataclass(frozen=True, slots=True)
class Finish:
    reason: str
    raw: bytes = b""


@dataclass(frozen=True, slots=True)
class Failure:
    """The backend reported an error inside its stream."""

    message: str


@dataclass(frozen=True, slots=True)
class Passthrough:
    """A vendor event with nothing for billing (e.g. the role chunk); `raw` as received."""

    raw: bytes


UpstreamEvent = Delta | Usage | Finish | Failure | Passthrough


@dataclass(frozen=True, slots=True)
class Completion:
    """A whole (non-streamed) answer."""

    text: str
    finish_reason: str
    usage: Usage | None


class JsonEventParser:
    """The shared loop of every JSON-over-SSE vendor: decode SSE, parse each event's
    data as a JSON object, hand it to `_interpret`. A vendor with an end marker line
    (OpenAI's `[DONE]`) sets `done_marker`; the others set `done` in `_interpret`."""

    __slots__ = ("_decoder", "done")
    done_marker: str | None = None

    def __init__(self) -> None:
        self._decoder = SSEDecoder()
        self.done = False

    def feed(self, chunk: bytes) -> list[UpstreamEvent]:
        events: list[UpstreamEvent] = []
        for sse in self._decoder.feed(chunk):
            if sse.data == self.done_marker:
                self.done = True
                continue
            try:
                doc = orjson.loads(sse.data)
            except orjson.JSONDecodeError:
                events.append(Failure(MALFORMED_EVENT))
                continue
            if not isinstance(doc, dict):
                events.append(Failure(MALFORMED_EVENT))
                continue
            events.extend(self._interpret(doc, sse.data.encode()))
        return events

    def _interpret(self, doc: dict[str, Any], raw: bytes) -> list[UpstreamEvent]:
        raise NotImplementedError


class StreamParser(Protocol):
    def feed(self, chunk: bytes) -> list[UpstreamEvent]: ...

    @property
    def done(self) -> bool:
        """True once the vendor's end-of-stream marker arrived."""
        ...


class Adapter(Protocol):
    def build_request(self, call: UpstreamCall) -> HttpRequest: ...

    def stream_parser(self) -> StreamParser: ...

    def parse_completion(self, body: bytes) -> Completion:
        """Raise ValueError when the body is not a valid answer."""
        ...

    def error_status(self, status: int, body: bytes) -> int:
        """The HTTP status that best describes a vendor's error answer (usually
        `status`; Gemini reports a refused key as 400 `API_KEY_INVALID`, i.e. 401)."""
        ...


def vendor_failure(kind: str, detail: object) -> Failure:
    """A mid-stream vendor error: logged briefly, reported to the client generically."""
    log.warning("upstream error event: %s %.200s", kind, detail)
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
