"""How much input a chat request sends upstream, sized before it is sent (pure).

The hold must cover the input (DESIGN §9 "Money"; §11 "Content parts"), so the
control plane at init and the edge at ``/v1/chat/completions`` both measure a request
once (`measure_input`, equal to `estimate_input_tokens` + `params_tokens`) and price
that measure for each model of its fallback chain (`InputSize.at`) at the rates of its route
(`input_rates`: its catalog counts and its provider's wire format): deterministic
(the same body always gives the same count) and never below what a vendor bills.

The formula, in tokens:

- **text** (a message's role and its text, or its ``text`` parts), per message:
  `shared.text_tokens`, the larger of one token per 3 UTF-8 bytes and one per piece
  a tokenizer cannot merge across plus one per 24 bytes, plus 4 per message for the
  framing. Real tokenizers average about 4 bytes a token on English text, where the
  first term rules; text like ``"1,2,3,…"`` costs a token per byte, and the second
  does. An assistant's ``tool_calls`` and a tool result's ``tool_call_id`` count as
  their compact JSON; each call once more as the tool an Anthropic route declares
  for a turn that offers none after such a history (its name, an open schema, with
  ``tool_choice`` none), and, on that route, Anthropic's tool-use prompt once
  more (below): such a turn is billed for them.
- **everything else that goes upstream beside the messages** (``tools``,
  ``tool_choice``, ``response_format``, ``stop``, ``user``, …): the same text count
  of its compact JSON. A tool schema is text the vendor tokenizes too. On an
  Anthropic route, 350 more whenever tools are sent: Anthropic's own tool-use system
  prompt (up to 346 with ``tool_choice`` auto or any).
- **an image** (``image_url`` part): a fixed count per image, whatever its size:
  the model's ``image_input_tokens`` (catalog field; default 1445, OpenAI's
  high-detail formula ``85 + 170 * tiles`` at its largest shape, 2048x768 px = 8
  tiles of 512 px; a model that bills images dearer, like gpt-4o-mini at
  ``2833 + 5667 * 8 = 48169``, sets its own). On an Anthropic route at least 1600
  (1.15 megapixels / 750, its largest image before it scales one down). A URL
  fetched by the vendor is never tokenized as text, so its bytes do not count.
- **a file** (``file`` part, inline ``file_data``, a PDF): one token per byte of
  its base64 data plus one image, plus a token per byte of its ``filename``. That
  fits the request into the context; the hold takes more: vendors bill a PDF per
  page (each page's text plus an image of it), and a file of a few hundred bytes
  can hold thousands of empty pages (a compressed object stream, untyped page
  objects; no cheap scan bounds them all). No vendor bills more input than the
  model's context leaves after the output budget, so a request that carries a file
  is held at that (`carries_files`): init holds it, and the edge sends a file only
  under a token that holds it. A ``file_id`` refers to bytes we never see, so it
  cannot be priced and is refused.
- **audio** (``input_audio`` part): one token per 3 bytes of its base64 data (far
  above any vendor's audio rate, about 10 tokens per second of speech).

Each part is forwarded rebuilt from the keys counted here (`clean_parts`): ``text``;
``image_url: {url, detail?}`` with ``detail`` one of auto/low/high; ``input_audio:
{data, format}``; ``file: {file_data, filename?}`` with a ``filename`` of at most
255 characters; anything else in a part is dropped, never sent uncounted.

Parts other than text need the model to list a feature (`PART_FEATURES`); the
callers refuse a request whose model lacks one (400 ``unsupported_content``). Their
bytes are checked as a vendor will take them (`shared.media`): an image is an
``https:`` URL or a ``data:`` URL of PNG/JPEG/GIF/WebP, a file a PDF (data URL or
bare base64), audio ``wav``/``mp3``, all data canonical base64.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from shared import media
from shared.text_tokens import byte_tokens, text_tokens

TOKENS_PER_MESSAGE = 4
IMAGE_TOKENS = 1445
# Anthropic (https://docs.anthropic.com/en/docs/build-with-claude/vision): an image
# up to 1.15 megapixels costs up to 1,600 tokens (pixels / 750); and with tools it
# adds its own tool-use system prompt, up to about 350 tokens
# (https://docs.anthropic.com/en/docs/agents-and-tools/tool-use/overview#pricing).
ANTHROPIC_IMAGE_TOKENS = 1600
ANTHROPIC_TOOL_PROMPT_TOKENS = 350
# The schema a tool declared without one gets (Anthropic requires one).
OPEN_SCHEMA: dict[str, Any] = {"type": "object", "properties": {}}
# The `tool_choice` such a declaration goes with: the model answers in text.
TOOL_CHOICE_NONE = orjson.dumps({"type": "none"})
IMAGE_DETAILS = frozenset({"auto", "low", "high"})
MAX_FILENAME_CHARS = 255
# Deeper JSON is refused (400 `json_too_deep`) before anything is written: no real
# tool schema nests this far, and orjson cannot re-encode past 254 levels.
MAX_JSON_DEPTH = 64
# A body with more `[` and `{` than this (inside strings too) is refused (400
# `json_too_complex`) before it is parsed: each array or object becomes a Python
# object that the parse builds and the depth walk visits, so 1 MiB of `[],[],…`
# (350,000 of them) cost over a second of the event loop. A long conversation with
# content parts and 128 tool schemas has a few thousand; at the cap, parsing and
# walking them costs about 10 ms, what a 1 MiB list of numbers costs anyway.
MAX_JSON_CONTAINERS = 50_000

# Which model feature each non-text content part needs (DESIGN §11).
PART_FEATURES = {"image_url": "vision", "input_audio": "audio", "file": "files"}
_PLACEHOLDERS = {"image_url": "[image]", "input_audio": "[audio]", "file": "[file]"}


@dataclass(frozen=True, slots=True)
class InputRates:
    """What the estimate charges for what text cannot measure, per route: an image,
    the vendor's own prompt when tools are sent (`input_rates`)."""

    image_tokens: int = IMAGE_TOKENS
    tool_prompt_tokens: int = 0


def input_rates(api_type: str, image_tokens: int = IMAGE_TOKENS) -> InputRates:
    """A model's rates (its catalog counts) on its provider's wire format: Anthropic
    bills an image above the default and adds a prompt of its own with tools."""
    if api_type == "anthropic_messages":
        return InputRates(max(image_tokens, ANTHROPIC_IMAGE_TOKENS), ANTHROPIC_TOOL_PROMPT_TOKENS)
    return InputRates(image_tokens)


DEFAULT_RATES = InputRates()


class InputRejected(ValueError):
    """A request's input cannot be sent: `code` is `invalid_content` (malformed
    part), `unsupported_content` (a part we cannot send or price) or `json_too_deep`."""

    def __init__(self, code: str, where: str, message: str) -> None:
        super().__init__(f"{where}: {message}")
        self.code = code
        self.where = where
        self.problem = message


def json_too_complex(body: bytes, limit: int = MAX_JSON_CONTAINERS) -> bool:
    """Whether a raw JSON body opens more than `limit` arrays and objects: counted on
    the bytes before parsing, at C speed. Every bracket first; only past `limit`
    (a JSON document pasted into a message, a tool's output, a transcript in a usage
    webhook) again without the strings' contents, so that text full of brackets is
    never refused: exact for valid JSON, whose strings hold every backslash and every
    escaped quote. Dropping the escaped backslashes, then the escaped quotes (left to
    right, as a parser reads them), leaves only the quotes that open and close
    strings. No regex: one that skips strings goes quadratic on unclosed ones.

    The split costs a Python object a quote, so first every byte but quotes and
    brackets goes, and then every pair of adjacent quotes, at C speed: a pair flips
    in and out of a string and back, so what lies on either side keeps its side.
    Quotes are then at most one per bracket: 50,001 brackets and a megabyte of `"`
    (or of `"a",`) split into a few pieces instead of half a million (72 ms of the
    event loop, an anonymous login's body; now ~25 ms at worst, `"[` repeated: a
    piece per two bytes)."""
    if body.count(b"[") + body.count(b"{") <= limit:
        return False
    outside = b"".join(structure_marks(body).split(b'"')[::2])
    return outside.count(b"[") + outside.count(b"{") > limit


# Every byte `structure_marks` drops: all but quotes and opening brackets.
_NOT_STRUCTURE = bytes(c for c in range(256) if c not in b'"[{')


def structure_marks(body: bytes) -> bytes:
    """`body`'s opening brackets and the quotes that open and close its strings, with
    no two quotes side by side (`json_too_complex`)."""
    plain = body.replace(b"\\\\", b"").replace(b'\\"', b"")
    return plain.translate(None, _NOT_STRUCTURE).replace(b'""', b"")


def escapes_nul(body: bytes) -> bool:
    """Whether a valid JSON text has a string holding NUL, which both services refuse
    (400 `invalid_characters`, DESIGN §11), read from its bytes (no walk of the
    decoded document). Inside JSON a NUL can only be written as the escape
    `\\u0000` (raw control characters are invalid JSON); an escaped backslash then
    "u0000" is text. A backslash only ever starts or ends an escape, so dropping the
    escaped-backslash pairs, left to right as a parser reads them, leaves `\\u0000`
    exactly where a NUL is."""
    return b"\\u0000" in body and b"\\u0000" in body.replace(b"\\\\", b"")


def json_too_deep(value: Any, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether the arrays/objects of a decoded JSON value (exact dicts and lists, as
    orjson builds them) nest more than `limit` levels. Level by level, keeping only
    the containers of each: scalars are looked at once and never stacked, so the walk
    is linear, and a hostile document cannot exhaust the stack."""
    level = [value] if type(value) is dict or type(value) is list else []
    depth = 0
    while level:
        depth += 1
        if depth > limit:
            return True
        # `type(…) is` rather than isinstance: half the cost on a list of 500,000 scalars.
        level = [
            child
            for node in level
            for child in (node.values() if type(node) is dict else node)
            if type(child) is dict or type(child) is list
        ]
    return False


def _object(part: Mapping[str, Any], key: str, where: str) -> Mapping[str, Any]:
    value = part.get(key)
    if not isinstance(value, dict):
        raise InputRejected("invalid_content", f"{where}.{key}", "must be an object")
    return value


def _string(doc: Mapping[str, Any], key: str, where: str) -> str:
    value = doc.get(key)
    if not isinstance(value, str) or not value:
        raise InputRejected("invalid_content", f"{where}.{key}", "must be a non-empty string")
    return value


def check_parts(content: list[Any], where: str) -> set[str]:
    """Validate a content-part array (OpenAI's shapes); the features it needs."""
    return clean_parts(content, where)[1]


def clean_parts(content: list[Any], where: str) -> tuple[list[dict[str, Any]], set[str]]:
    """Validate a content-part array (OpenAI's shapes): each part rebuilt from the
    keys we know and count (`text`; `image_url: {url, detail?}`; `input_audio:
    {data, format}`; `file: {file_data, filename?}`), so nothing else in a part rides
    upstream uncounted; and the features the parts need."""
    if not content:
        raise InputRejected("invalid_content", where, "must not be an empty array")
    needed: set[str] = set()
    clean: list[dict[str, Any]] = []
    for i, part in enumerate(content):
        at = f"{where}[{i}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if not isinstance(part, dict) or not isinstance(kind, str):
            raise InputRejected("invalid_content", at, "must be an object with a 'type'")
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise InputRejected("invalid_content", f"{at}.text", "must be a string")
            clean.append({"type": "text", "text": part["text"]})
            continue
        if kind not in PART_FEATURES:
            raise InputRejected(
                "unsupported_content",
                f"{at}.type",
                "must be one of text, image_url, input_audio, file",
            )
        body = _object(part, kind, at)
        if kind == "file" and "file_data" not in body:
            raise InputRejected(
                "unsupported_content",
                f"{at}.file",
                "needs inline file_data (a file_id cannot be priced before it is sent)",
            )
        _check_media(kind, body, at)
        clean.append({"type": kind, kind: _known_keys(kind, body, f"{at}.{kind}")})
        needed.add(PART_FEATURES[kind])
    return clean, needed


def _known_keys(kind: str, body: Mapping[str, Any], where: str) -> dict[str, Any]:
    """A checked part's body with only the keys the estimate counts."""
    if kind == "input_audio":
        return {"data": body["data"], "format": body["format"]}
    if kind == "image_url":
        out = {"url": body["url"]}
        detail = body.get("detail")
        if detail is not None:
            if detail not in IMAGE_DETAILS:
                raise InputRejected(
                    "invalid_content", f"{where}.detail", "must be one of auto, low, high"
                )
            out["detail"] = detail
        return out
    out = {"file_data": body["file_data"]}
    filename = body.get("filename")
    if filename is not None:
        if not isinstance(filename, str) or len(filename) > MAX_FILENAME_CHARS:
            raise InputRejected(
                "invalid_content",
                f"{where}.filename",
                f"must be a string of at most {MAX_FILENAME_CHARS} characters",
            )
        out["filename"] = filename
    return out


def _check_media(kind: str, body: Mapping[str, Any], at: str) -> None:
    """The part's bytes or URL as a vendor will take them (`shared.media`): garbage is
    `invalid_content`, a media type we do not send `unsupported_content`."""
    where = f"{at}.{kind}"
    try:
        if kind == "image_url":
            url = _string(body, "url", where)
            where += ".url"
            media.image_source(url)
        elif kind == "input_audio":
            data, audio_format = _string(body, "data", where), _string(body, "format", where)
            where += ".data"
            media.audio_source(data, audio_format)
        else:
            file_data = _string(body, "file_data", where)
            where += ".file_data"
            media.file_source(file_data)
    except media.MediaError as exc:
        code = "unsupported_content" if exc.unsupported else "invalid_content"
        raise InputRejected(code, where, str(exc)) from None


def missing_features(needed: Iterable[str], features: Iterable[str]) -> list[str]:
    have = set(features)
    return sorted(f for f in set(needed) if f not in have)


@dataclass(frozen=True, slots=True)
class InputSize:
    """A request's input estimate apart from the route's rates: what costs the same on
    every route (`tokens`), how many images it holds (a file counts as one) and
    whether tools are sent. A request is measured once (`measure_input`) and priced
    for each model of its fallback chain with `at`, in constant time: the chain's
    models differ only in their rates, and measuring it again for each of them cost
    up to six passes over a 1 MiB body before the edge even checked its token's use."""

    tokens: int = 0
    images: int = 0
    tools: bool = False
    # The history holds tool calls: a turn offering no tools declares theirs on an
    # Anthropic route (`message_size`). Apart from `tools` and counted on top of it,
    # so that the messages' estimate and the params' add up to the request's
    # measure (`measure_input`): a turn that also offers tools is held for the
    # vendor's prompt twice, a few hundred tokens held and never charged.
    history_tools: bool = False

    def at(self, rates: InputRates) -> int:
        vendor = rates.tool_prompt_tokens * (int(self.tools) + int(self.history_tools))
        return self.tokens + self.images * rates.image_tokens + vendor

    def __add__(self, other: InputSize) -> InputSize:
        return InputSize(
            self.tokens + other.tokens,
            self.images + other.images,
            self.tools or other.tools,
            self.history_tools or other.history_tools,
        )


def _part_size(part: Mapping[str, Any]) -> InputSize:
    kind = part.get("type")
    if kind == "image_url":
        return InputSize(images=1)
    if kind == "file":
        body = part["file"]
        filename = str(body.get("filename") or "").encode("utf-8")
        return InputSize(len(str(body.get("file_data", ""))) + len(filename), images=1)
    if kind == "input_audio":
        return InputSize(byte_tokens(len(str(part["input_audio"].get("data", "")))))
    # Anything unforeseen that got this far is priced as its JSON text, never as 0.
    return InputSize(text_tokens([orjson.dumps(part)]))


def message_size(message: Mapping[str, Any]) -> InputSize:
    content = message.get("content")
    texts = [str(message.get("role", "")).encode("utf-8")]
    for key in ("tool_calls", "tool_call_id"):
        if message.get(key) is not None:
            texts.append(orjson.dumps(message[key]))
    extra = InputSize()
    calls = message.get("tool_calls")
    if isinstance(calls, list) and calls:
        # A turn that offers no tools after a history of calls declares those tools
        # on an Anthropic route (its refusal of tool blocks without definitions):
        # each call's tool once more, with the vendor's tool-use prompt.
        declared = [_declared(call) for call in calls]
        extra = InputSize(text_tokens([*declared, TOOL_CHOICE_NONE]), history_tools=True)
    if isinstance(content, str):
        texts.append(content.encode("utf-8"))
    elif isinstance(content, list):
        for part in content:
            if not isinstance(part, dict):
                continue
            if part.get("type", "text") == "text" and isinstance(part.get("text", ""), str):
                texts.append(part.get("text", "").encode("utf-8"))
            else:
                extra += _part_size(part)
    return InputSize(text_tokens(texts) + TOKENS_PER_MESSAGE) + extra


def _declared(call: Any) -> bytes:
    """A history's tool declared as `anthropic_messages._history_tools` does: its
    name and an open schema."""
    function = call.get("function") if isinstance(call, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    return orjson.dumps({"name": str(name or ""), "input_schema": OPEN_SCHEMA})


def params_size(params: Mapping[str, Any]) -> InputSize:
    """Everything sent upstream beside the messages (tools, stop, response_format…)."""
    if not params:
        return InputSize()
    text = text_tokens([orjson.dumps(dict(params), option=orjson.OPT_SORT_KEYS)])
    return InputSize(text, tools=bool(params.get("tools")))


def measure_input(
    messages: Iterable[Mapping[str, Any]], params: Mapping[str, Any] | None = None
) -> InputSize:
    """The messages' and `params`' size, to price per route with `InputSize.at`:
    `measure_input(m, p).at(r) == estimate_input_tokens(m, r) + params_tokens(p, r)`."""
    total = params_size(params or {})
    for message in messages:
        total += message_size(message)
    return total


def estimate_input_tokens(
    messages: Iterable[Mapping[str, Any]], rates: InputRates = DEFAULT_RATES
) -> int:
    """Deterministic, conservative count of the messages' tokens (see the module doc)."""
    return measure_input(messages).at(rates)


def carries_files(messages: Iterable[Mapping[str, Any]]) -> bool:
    """Whether any message carries a ``file`` part: such a request is held at the
    model's whole context (see the module doc), whatever its estimate."""
    return any(
        isinstance(part, dict) and part.get("type") == "file"
        for message in messages
        if isinstance(message.get("content"), list)
        for part in message["content"]
    )


def params_tokens(params: Mapping[str, Any], rates: InputRates = DEFAULT_RATES) -> int:
    """Everything sent upstream beside the messages (tools, stop, response_format…),
    and the vendor's own tool-use prompt when tools are sent."""
    return params_size(params).at(rates)


def content_text(content: Any) -> str:
    """A message's content as text, for titles and stored history: text parts joined
    as they are, each other part as a placeholder (``[image]``)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return ""
    pieces: list[str] = []
    for part in content:
        if not isinstance(part, dict):
            continue
        kind = part.get("type", "text")
        if kind == "text":
            text = part.get("text", "")
            pieces.append(text if isinstance(text, str) else "")
        else:
            pieces.append(f" {_PLACEHOLDERS.get(str(kind), '[part]')} ")
    return "".join(pieces)
