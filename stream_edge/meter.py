"""Per-stream accounting: what was relayed, when, and what to bill.

Pure: fed the normalised upstream events, it answers the usage figures for the
webhook. The backend's own usage wins (`usage_source: upstream`); without it
(cancelled, failed, or a backend that reports none) the input is the backend's own
early count when it sent one (`InputUsage`: Anthropic's `message_start`), else the
reservation's estimate, and the output is counted from what was relayed, marked `estimated`, by
the input estimate's upper bound (`stream_edge.output_estimate`): OpenAI-compatible
backends send one token per delta, so a delta counts one token, or its pieces when
it holds several (OpenRouter and vLLM may batch), or past `ONE_TOKEN_CHARS` or
`CJK_ONE_TOKEN_CHARS` CJK characters the whole bound; other vendors batch several
tokens per delta, so there it is the larger of the deltas and the bound over all the
text; never below a vendor's running count of its output when it sends one
(`OutputSoFar`: Gemini's, thinking included). A tool call's name and argument
fragments count like text (DESIGN §11), and so does the reasoning an
OpenAI-compatible backend streams (`ReasoningDelta`).

The transcript (the answer's text and tool calls, for the report when transcripts
are on) keeps what a report can carry, no more: a backend that streams for the
stream's whole life, ignoring `max_tokens`, once grew the edge's memory by all it
sent (a report is cut to fit its cap anyway, `usage_report.fit_transcript`). What
it keeps is joined as it goes (`Joined`): a string per delta held ~65 bytes a token
for the stream's life, 1.6 GB for one company's 200 streams of 128k tokens.
It also keeps the thought signatures of the answer's calls (bounded, whatever the
transcript setting) for the report to store (`stream_edge.thought_signatures`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

from shared.text_tokens import byte_tokens, text_bound, text_tokens
from shared.webhooks import MAX_USAGE_BODY_BYTES
from stream_edge.output_estimate import MEASURED, delta_measure
from stream_edge.thought_signatures import MAX_PER_ANSWER, SignedCall, keepable
from stream_edge.upstream.base import (
    Delta,
    Finish,
    InputUsage,
    Joined,
    OutputSoFar,
    ReasoningDelta,
    ToolCall,
    ToolCallDelta,
    ToolCalls,
    UpstreamEvent,
    Usage,
)

# A transcript's text, and apart its tool calls, in characters: each is at least a
# byte of the report's body, which holds at most `MAX_USAGE_BODY_BYTES`, so whatever
# is past this could never be reported. Pieces (deltas, fragments) are bounded too,
# each a string's overhead: 2x the longest answer any model offers (128k tokens).
TRANSCRIPT_CHARS = MAX_USAGE_BODY_BYTES
TRANSCRIPT_PIECES = 1 << 18


@dataclass(frozen=True, slots=True)
class Billing:
    input_tokens: int
    output_tokens: int
    source: str
    # Parts of the above as the backend reported them (DESIGN §11 "Prices"); an
    # estimate knows none, so it prices every input token at the input rate.
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0


@dataclass(slots=True)
class Meter:
    input_estimate: int
    keep_transcript: bool
    delta_is_token: bool = True
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    first_token_at: datetime | None = None
    deltas: int = 0
    # Tokens past one per delta, where deltas count as tokens (`output_estimate.delta_measure`).
    batched: int = 0
    # The vendor's own running output count (`OutputSoFar`).
    output_floor: int = 0
    # Where deltas batch tokens: the text's UTF-8 bytes and pieces (`text_pieces`).
    text_bytes: int = 0
    text_pieces: int = 0
    usage: Usage | None = None
    # The vendor's input count before its usage (`InputUsage`), billed in its place.
    input_usage: InputUsage | None = None
    finish_reason: str | None = None
    # The answer's text, as a few strings (`Joined`), not one per delta.
    parts: Joined = field(default_factory=Joined)
    calls: ToolCalls = field(default_factory=ToolCalls)
    # Gemini's thought signatures of the answer's calls (`thought_signatures`).
    signatures: list[SignedCall] = field(default_factory=list)
    # What the transcript may still keep (`TRANSCRIPT_CHARS`, `TRANSCRIPT_PIECES`); a
    # tool call past its room drops them all, as its report would.
    text_room: int = TRANSCRIPT_CHARS
    calls_room: int = TRANSCRIPT_CHARS
    pieces_room: int = TRANSCRIPT_PIECES

    def record(self, event: UpstreamEvent) -> None:
        if isinstance(event, Delta):
            self._text(event.text)
            if self.keep_transcript and self.text_room > 0:
                self._keep_text(event.text)
        elif isinstance(event, ToolCallDelta):
            if self.first_token_at is None:
                self.first_token_at = datetime.now(UTC)
            self.deltas += 1
            if self.delta_is_token:
                self.batched += delta_measure(event.arguments)[0] - 1
            else:
                if event.name:
                    self._batch(event.name)
                self._batch(event.arguments)
            if self.keep_transcript:
                self._keep_call(event)
            if event.signature:
                self._keep_signature(event.id, event.name, event.arguments, event.signature)
        elif isinstance(event, ReasoningDelta):
            # Output the client may read (the passthrough writer forwards it): billed
            # like text when the backend's usage never comes (the client left).
            self._text(event.text)
        elif isinstance(event, OutputSoFar):
            # Output the vendor has generated (its thinking too) though the client
            # may have read little of it: what an estimate never goes below.
            self.output_floor = max(self.output_floor, event.output_tokens)
        elif isinstance(event, Usage):
            self.usage = event
        elif isinstance(event, InputUsage):
            self.input_usage = event
        elif isinstance(event, Finish):
            self.finish_reason = event.reason

    def _text(self, text: str) -> None:
        """A delta of text output (the answer's, or streamed reasoning)."""
        if self.first_token_at is None:
            self.first_token_at = datetime.now(UTC)
        self.deltas += 1
        # `delta_measure`, its memory read inline: this runs for every delta.
        tokens, size, count = MEASURED.get(text) or delta_measure(text)
        if self.delta_is_token:
            self.batched += tokens - 1
        else:
            self.text_bytes += size
            self.text_pieces += count

    def _keep_text(self, text: str) -> None:
        """`text` into the transcript, as much as its room takes."""
        if self.pieces_room <= 0:
            self.text_room = 0
            return
        self.pieces_room -= 1
        self.parts.append(text if len(text) <= self.text_room else text[: self.text_room])
        self.text_room -= len(text)

    def _keep_call(self, delta: ToolCallDelta) -> None:
        """A tool call fragment into the transcript; past the room, no call is kept
        (a call cut short is no call: `fit_transcript` would drop them all too)."""
        if self.calls_room < 0:
            return
        self.calls_room -= len(delta.arguments) + len(delta.id or "") + len(delta.name or "")
        self.pieces_room -= 1
        if self.calls_room < 0 or self.pieces_room < 0:
            self.calls_room = -1
            self.calls = ToolCalls()
            return
        self.calls.add(delta)

    def _keep_signature(
        self, call_id: str | None, name: str | None, arguments: str, signature: str
    ) -> None:
        """A call's thought signature, kept server-side at the stream's end (Gemini
        sends each call whole, signature included, in one fragment)."""
        if call_id and name and len(self.signatures) < MAX_PER_ANSWER and keepable(signature):
            self.signatures.append(SignedCall(call_id, name, arguments, signature))

    def _batch(self, text: str) -> None:
        """Text from a backend whose deltas batch tokens: measured for the bound."""
        _, size, count = delta_measure(text)
        self.text_bytes += size
        self.text_pieces += count

    def record_text(
        self,
        text: str,
        usage: Usage | None,
        finish_reason: str,
        tool_calls: tuple[ToolCall, ...] = (),
    ) -> None:
        """A whole non-streamed answer."""
        self.delta_is_token = False  # one "delta" here is the whole answer
        parts = (text, *(piece for c in tool_calls for piece in (c.name, c.arguments)))
        if usage is None:
            # The bound is billed only without the vendor's usage: an answer of up to
            # 8 MiB that carries it is not run through `pieces` for nothing.
            for part in parts:
                self._batch(part)
        if any(parts):
            self.first_token_at = datetime.now(UTC)
            self.deltas = 1
            if self.keep_transcript and text:
                self._keep_text(text)
        if self.keep_transcript:
            for index, call in enumerate(tool_calls):
                self._keep_call(ToolCallDelta(index, call.id, call.name, call.arguments))
        for call in tool_calls:
            if call.signature:
                self._keep_signature(call.id, call.name, call.arguments, call.signature)
        self.usage = usage
        self.finish_reason = finish_reason

    def record_unread(self, raw: bytes, most: int) -> None:
        """Bytes of a whole answer that failed (`completion.bill_unread`): the output
        they can hold, by the text bound over every byte, at most `most`."""
        self.first_token_at = datetime.now(UTC)
        self.deltas = max(self.deltas, 1)
        # The bound is never below the byte rate: past `most` by that alone, the
        # pieces of up to 8 MiB (60 ms of the event loop) need no counting.
        tokens = most if byte_tokens(len(raw)) >= most else min(text_tokens((raw,)), most)
        self.output_floor = max(self.output_floor, tokens)

    def tool_calls(self) -> list[ToolCall]:
        return self.calls.complete()

    @property
    def content(self) -> str | None:
        return self.parts.text() if self.keep_transcript else None

    def billing(self) -> Billing:
        if self.usage is not None:
            usage = self.usage
            return Billing(
                usage.input_tokens,
                usage.output_tokens,
                "upstream",
                usage.cached_input_tokens,
                usage.cache_write_tokens,
                usage.reasoning_tokens,
            )
        known = self.input_usage
        if known is not None:
            # The vendor's own input count, its cache parts at their rates: what it
            # bills for this input, whether or not its final usage comes.
            return Billing(
                known.input_tokens,
                self.relayed_tokens,
                "estimated",
                known.cached_input_tokens,
                known.cache_write_tokens,
            )
        return Billing(self.input_estimate, self.relayed_tokens, "estimated")

    @property
    def relayed_tokens(self) -> int:
        if self.delta_is_token:
            return max(self.deltas + self.batched, self.output_floor)
        return max(self.deltas, text_bound(self.text_bytes, self.text_pieces), self.output_floor)
