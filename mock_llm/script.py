"""What the mock answers and how fast: pure functions, no I/O.

An answer is a list of token strings derived from a hash of the last user message,
so the same prompt always yields the same text and a shorter answer (``max_tokens``)
is a prefix of the longer one. Timing and failures come from the model's defaults,
overridden per request by a directive inside any message::

    [[mock tokens=N first_ms=N delay_ms=N fail=STATUS retry_after=S fail_times=N drop_after=N
            error_after=N usage=0|1 tool_calls=N cached=N cache_write=N reasoning=N tpm=N
            signatures=0|1 reasoning_apart=0|1]]

(every key optional; several directives merge, later ones win), and then by the
``X-Mock-Tokens``, ``X-Mock-First-Token-Ms`` and ``X-Mock-Token-Delay-Ms`` headers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import random
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from mock_llm.errors import MockAPIError
from mock_llm.tools import MAX_CALLS, PlannedCall, ToolSpec, plan_calls


@dataclass(frozen=True, slots=True)
class Message:
    """One chat message, its content already flattened to text."""

    role: str
    text: str


@dataclass(frozen=True, slots=True)
class MockBehaviour:
    """How one answer is produced: its length, its pacing and how it fails."""

    tokens: int
    first_token_delay_s: float = 0.0
    token_delay_s: float = 0.0
    # Answer this HTTP status with an OpenAI-shaped error instead of a completion.
    fail_status: int | None = None
    # Cut the connection after this many content tokens: no finish, no usage, no [DONE].
    drop_after: int | None = None
    # Send the vendor's own mid-stream error event after this many tokens, then end.
    error_after: int | None = None
    # When to come back (seconds) with a ``fail`` status: OpenAI and Anthropic say it
    # in ``Retry-After``, Google in its body's ``RetryInfo`` (`MockAPIError`).
    retry_after_s: int | None = None
    # Fail only the first N requests with this prompt, then answer (None: always fail).
    fail_times: int | None = None
    # False: the backend reports no token usage at all (the gateway must count).
    report_usage: bool = True
    # Answer with this many calls to the request's tools (`mock_llm.tools`), unless
    # the last message is a tool result.
    tool_calls: int = 0
    # Usage details, each in its vendor's words: prompt tokens read from / written to
    # a cache, and hidden reasoning tokens spent beside the answer. Reported as
    # scripted, even when larger than the prompt (a hostile backend).
    cached_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    # The organization's tokens per minute: a request asking more on its own (prompt
    # plus max_tokens) is refused with the vendor's 429 (`mock_llm.rate_limits`).
    tpm_limit: int | None = None
    # Gemini only: refuse (400, as Gemini 3) a history whose first function call of a
    # step lacks the `thoughtSignature` the mock gave it (`tools.mock_signature`);
    # Google's stand-in does not count here, so a test sees the real one came back.
    require_signatures: bool = False
    # OpenAI's wire format only: report the reasoning beside `completion_tokens`
    # rather than inside it, `total_tokens` counting both, as xAI's Grok and
    # Gemini's OpenAI-compatible endpoint do (the vendor bills both).
    reasoning_apart: bool = False


MODEL_DEFAULTS: dict[str, MockBehaviour] = {
    "mock-fast": MockBehaviour(tokens=64),
    # Roughly a hosted chat model: a noticeable first-token wait, then ~30 tokens/s.
    "mock-chat": MockBehaviour(tokens=120, first_token_delay_s=0.3, token_delay_s=1 / 30),
}


@dataclass(frozen=True, slots=True)
class Overrides:
    """Per-request changes to a model's behaviour; ``None`` keeps the default."""

    tokens: int | None = None
    first_token_delay_s: float | None = None
    token_delay_s: float | None = None
    fail_status: int | None = None
    drop_after: int | None = None
    error_after: int | None = None
    retry_after_s: int | None = None
    fail_times: int | None = None
    report_usage: bool | None = None
    tool_calls: int | None = None
    cached_tokens: int | None = None
    cache_write_tokens: int | None = None
    reasoning_tokens: int | None = None
    tpm_limit: int | None = None
    require_signatures: bool | None = None
    reasoning_apart: bool | None = None

    def merged(self, later: Overrides) -> Overrides:
        changes = {
            f.name: getattr(later, f.name)
            for f in dataclasses.fields(later)
            if getattr(later, f.name) is not None
        }
        return dataclasses.replace(self, **changes)

    def apply(self, behaviour: MockBehaviour) -> MockBehaviour:
        changes = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if getattr(self, f.name) is not None
        }
        return dataclasses.replace(behaviour, **changes)


# ``mock`` must be followed by whitespace or the closing brackets: ``[[mockery]]`` is text.
# A directive holds no bracket and is short (every key at once is ~250 characters): a
# body running to the next `]` however far made a prompt of "[[mock " with none
# quadratic (32 KB: 2.2 s of the mock's event loop), scanned from every "[[mock".
MAX_DIRECTIVE_CHARS = 512
_DIRECTIVE = re.compile(rf"\[\[mock(?=[\s\]])([^\[\]]{{0,{MAX_DIRECTIVE_CHARS}}})\]\]")
_DIGITS = re.compile(r"[0-9]{1,9}")
_MAX_TOKENS = 100_000
_MAX_DELAY_MS = 600_000


def _int_value(name: str, raw: str, low: int, high: int) -> int:
    # Only ASCII digits: ``str.isdigit`` would also accept "²" and friends.
    if not _DIGITS.fullmatch(raw.strip()) or not low <= int(raw) <= high:
        raise MockAPIError(
            400,
            f"mock: {name} must be an integer from {low} to {high}, got {raw!r}",
            code="invalid_mock_directive",
        )
    return int(raw)


def _override(key: str, raw: str, source: str) -> Overrides:
    name = f"{source} {key}"
    if key == "tokens":
        return Overrides(tokens=_int_value(name, raw, 0, _MAX_TOKENS))
    if key == "first_ms":
        return Overrides(first_token_delay_s=_int_value(name, raw, 0, _MAX_DELAY_MS) / 1000)
    if key == "delay_ms":
        return Overrides(token_delay_s=_int_value(name, raw, 0, _MAX_DELAY_MS) / 1000)
    if key == "fail":
        return Overrides(fail_status=_int_value(name, raw, 400, 599))
    if key == "drop_after":
        return Overrides(drop_after=_int_value(name, raw, 0, _MAX_TOKENS))
    if key == "error_after":
        return Overrides(error_after=_int_value(name, raw, 0, _MAX_TOKENS))
    if key == "retry_after":
        return Overrides(retry_after_s=_int_value(name, raw, 0, 86_400))
    if key == "fail_times":
        return Overrides(fail_times=_int_value(name, raw, 0, 1000))
    if key == "usage":
        return Overrides(report_usage=bool(_int_value(name, raw, 0, 1)))
    if key == "tool_calls":
        return Overrides(tool_calls=_int_value(name, raw, 0, MAX_CALLS))
    if key == "cached":
        return Overrides(cached_tokens=_int_value(name, raw, 0, _MAX_TOKENS))
    if key == "cache_write":
        return Overrides(cache_write_tokens=_int_value(name, raw, 0, _MAX_TOKENS))
    if key == "reasoning":
        return Overrides(reasoning_tokens=_int_value(name, raw, 0, _MAX_TOKENS))
    if key == "tpm":
        return Overrides(tpm_limit=_int_value(name, raw, 1, 100_000_000))
    if key == "signatures":
        return Overrides(require_signatures=bool(_int_value(name, raw, 0, 1)))
    if key == "reasoning_apart":
        return Overrides(reasoning_apart=bool(_int_value(name, raw, 0, 1)))
    raise MockAPIError(
        400,
        f"mock: unknown directive key {key!r} (known: tokens, first_ms, delay_ms, fail, "
        "retry_after, fail_times, drop_after, error_after, usage, tool_calls, cached, "
        "cache_write, reasoning, tpm, signatures, reasoning_apart)",
        code="invalid_mock_directive",
    )


def parse_directives(text: str) -> Overrides:
    """Every ``[[mock ...]]`` directive in ``text``, merged in order (later keys win)."""
    result = Overrides()
    for match in _DIRECTIVE.finditer(text):
        for item in match.group(1).split():
            key, sep, raw = item.partition("=")
            if not sep:
                raise MockAPIError(
                    400,
                    f"mock: directive items are key=value, got {item!r}",
                    code="invalid_mock_directive",
                )
            result = result.merged(_override(key, raw, "directive"))
    return result


_HEADERS = {
    "x-mock-tokens": "tokens",
    "x-mock-first-token-ms": "first_ms",
    "x-mock-token-delay-ms": "delay_ms",
}


def parse_headers(headers: Mapping[str, str]) -> Overrides:
    """The ``X-Mock-*`` request headers (names matched case-insensitively)."""
    result = Overrides()
    for name, value in headers.items():
        key = _HEADERS.get(name.lower())
        if key is not None:
            result = result.merged(_override(key, value, f"header {name}"))
    return result


def resolve_behaviour(
    default: MockBehaviour, messages: Iterable[Message], headers: Mapping[str, str]
) -> MockBehaviour:
    """Model default, then directives in message order, then headers."""
    overrides = Overrides()
    for message in messages:
        overrides = overrides.merged(parse_directives(message.text))
    return overrides.merged(parse_headers(headers)).apply(default)


def count_prompt_tokens(messages: Iterable[Message]) -> int:
    """Roughly 4 bytes a token plus 3 per message of framing, like OpenAI's tokenizers.

    It must never exceed the gateway's conservative estimate (ceil(bytes/3) + 4 per
    message), or a hold sized from that estimate could be smaller than the charge.
    """
    return sum(math.ceil(len(m.text.encode("utf-8")) / 4) + 3 for m in messages)


_WORDS = (
    "the quick brown fox jumps over a lazy dog while gateway streams tokens to every "
    "patient client and credits settle exactly once after each reply so budgets hold "
    "under load as edges relay words from models that think in small pieces of text "
    "with latency measured in milliseconds not minutes because users watch answers "
    "appear one token at a time across the network"
).split()


def answer_tokens(prompt: str, count: int) -> list[str]:
    """``count`` tokens of deterministic sentences seeded by ``prompt``.

    Each token is one word (the first without a leading space, like real models);
    the sequence does not depend on ``count``, so shorter answers are prefixes.
    """
    seed = int.from_bytes(hashlib.sha256(prompt.encode("utf-8")).digest()[:8], "big")
    rng = random.Random(seed)
    tokens: list[str] = []
    sentence_left = 0
    for index in range(count):
        word = rng.choice(_WORDS)
        if sentence_left == 0:
            word = word.capitalize()
            sentence_left = rng.randint(5, 12)
        sentence_left -= 1
        if sentence_left == 0:
            word += "."
        tokens.append(word if index == 0 else " " + word)
    return tokens


@dataclass(frozen=True, slots=True)
class Completion:
    tokens: list[str]
    finish_reason: str
    prompt_tokens: int
    # When set, the answer is these calls and `tokens` are their argument fragments.
    calls: tuple[PlannedCall, ...] = ()
    cached_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    reasoning_apart: bool = False  # see `MockBehaviour.reasoning_apart`

    @property
    def output_tokens(self) -> int:
        """The answer's tokens plus the hidden reasoning (every vendor bills both)."""
        return len(self.tokens) + self.reasoning_tokens

    @property
    def text(self) -> str:
        return "" if self.calls else "".join(self.tokens)

    def owner(self, index: int) -> tuple[int, bool]:
        """Which call token `index` belongs to, and whether it is the call's first."""
        for number, call in enumerate(self.calls):
            size = max(1, len(call.fragments))
            if index < size:
                return number, index == 0
            index -= size
        raise IndexError(index)


def plan_completion(
    messages: Iterable[Message],
    behaviour: MockBehaviour,
    max_tokens: int | None,
    tools: tuple[ToolSpec, ...] = (),
) -> Completion:
    """The answer to ``messages``: ``behaviour.tokens`` long, cut to ``max_tokens``;
    or ``behaviour.tool_calls`` calls when the user spoke last (not a tool result)."""
    messages = list(messages)
    users = [m for m in messages if m.role == "user"]
    prompt = (users or messages)[-1].text if messages else ""
    if behaviour.tool_calls and messages and messages[-1].role != "tool":
        if not tools:
            raise MockAPIError(
                400, "mock: tool_calls needs tools in the request", code="invalid_mock_directive"
            )
        calls = plan_calls(prompt, tools, behaviour.tool_calls)
        # A call with no arguments still takes one (empty) token, so it is sent.
        fragments = [piece for call in calls for piece in (call.fragments or [""])]
        return _with_details(
            Completion(fragments, "tool_calls", count_prompt_tokens(messages), calls), behaviour
        )
    count = behaviour.tokens
    finish_reason = "stop"
    if max_tokens is not None and max_tokens < count:
        count, finish_reason = max_tokens, "length"
    return _with_details(
        Completion(answer_tokens(prompt, count), finish_reason, count_prompt_tokens(messages)),
        behaviour,
    )


def _with_details(completion: Completion, behaviour: MockBehaviour) -> Completion:
    return dataclasses.replace(
        completion,
        cached_tokens=behaviour.cached_tokens,
        cache_write_tokens=behaviour.cache_write_tokens,
        reasoning_tokens=behaviour.reasoning_tokens,
        reasoning_apart=behaviour.reasoning_apart,
    )
