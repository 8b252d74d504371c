"""Gemini's thought signatures, kept server-side and sent back (docs/tool-calls.md).

Gemini 3 signs the first `functionCall` part of each step with an opaque
`thoughtSignature` (base64, up to kilobytes) and wants it back on that part when the
conversation continues: without it the model loses the reasoning behind the call. A
call reaches the client in OpenAI's shape, which has no room for it (and an id is at
most `tool_shapes.MAX_ID_CHARS`), so the edge keeps each signature in the store under
the call id it gave the client, and puts it back on the call when a later request's
history holds that call.

Isolation: a key is named by the grant's company (never by anything the client sends)
and a digest of the call id, so a client's id, whatever its characters, names only a
key inside its own company's namespace; another company's call id finds nothing. A
kept signature is also bound to its call (a digest of the function's name and
arguments): a history whose call was edited, or another call reusing the id, gets
no signature (the stand-in, as before) rather than one made for a different call.

Best effort: a signature is an optimisation of the model's context, never a reason
to fail or hold up a stream. Saving happens at the stream's end, before its usage
report is stored (so before a session's next turn can start); a store that fails or
is slow loses the signatures, and the request is sent with Google's stand-in.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from shared.hash_tags import company_tag
from shared.store import KeyValueStore
from stream_edge.upstream.base import arguments_object

log = logging.getLogger("llmgw.edge.signatures")

KEY_PREFIX = "gsig:"
TTL_SECONDS = 24 * 3600.0
# A signature past this is not kept (the store is not a blob store; Google's are a few KiB).
MAX_SIGNATURE_CHARS = 64 * 1024
# Signatures kept of one answer: Gemini signs the first call of a step, one an answer.
MAX_PER_ANSWER = 16
# The history's most recent calls looked up: one MGET, bounded whatever the history.
MAX_LOOKUPS = 256
# How long the edge waits for the store, reading or writing: past it, no signatures.
STORE_BUDGET_SECONDS = 1.0
_DIGEST_CHARS = 64


@dataclass(frozen=True, slots=True)
class SignedCall:
    """A call an answer made, with the signature Gemini gave it."""

    id: str
    name: str
    arguments: str  # the JSON text the client got
    signature: str


def keepable(signature: str) -> bool:
    """Whether a vendor's signature may be kept: bounded, printable ASCII (base64)."""
    return (
        0 < len(signature) <= MAX_SIGNATURE_CHARS
        and signature.isascii()
        and (signature.isprintable())
    )


def signature_key(company_id: str, call_id: str) -> str:
    """The store key of one call's signature: the company's namespace (its hash tag,
    `shared.hash_tags`) and a digest of the id, so no id escapes it."""
    digest = hashlib.sha256(call_id.encode("utf-8", "surrogatepass")).hexdigest()
    return f"{KEY_PREFIX}{company_tag(company_id)}:{digest}"


def call_digest(name: str, arguments: str) -> str:
    """What binds a signature to its call: the name and the arguments as the object
    Gemini gets back (`arguments_object`), keys sorted, so the client's re-spacing of
    the JSON text does not matter."""
    try:
        args = orjson.dumps(arguments_object(arguments), option=orjson.OPT_SORT_KEYS)
    except orjson.JSONEncodeError:  # nested past orjson's writer: cannot be bound
        return ""
    return hashlib.sha256(name.encode("utf-8", "surrogatepass") + b"\0" + args).hexdigest()


def encode(call: SignedCall) -> bytes | None:
    digest = call_digest(call.name, call.arguments)
    return (digest + call.signature).encode("ascii") if digest else None


def decode(raw: bytes | None, name: str, arguments: str) -> str | None:
    """The signature kept in `raw`, when it was kept for this very call."""
    if raw is None or len(raw) > _DIGEST_CHARS + MAX_SIGNATURE_CHARS:
        return None
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        return None
    digest, signature = text[:_DIGEST_CHARS], text[_DIGEST_CHARS:]
    if not keepable(signature) or digest != call_digest(name, arguments):
        return None
    return signature


def history_calls(messages: Sequence[Mapping[str, Any]]) -> list[tuple[str, str, str]]:
    """The (id, name, arguments) of the assistant calls in `messages`, the most recent
    `MAX_LOOKUPS` (ids as the request validated them, `tool_shapes.check_tool_calls`)."""
    calls: list[tuple[str, str, str]] = []
    for message in messages:
        if message.get("role") != "assistant":
            continue
        for call in message.get("tool_calls") or ():
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict) and isinstance(call.get("id"), str):
                name, arguments = function.get("name"), function.get("arguments")
                if isinstance(name, str) and isinstance(arguments, str):
                    calls.append((call["id"], name, arguments))
    return calls[-MAX_LOOKUPS:]


async def load(
    store: KeyValueStore, company_id: str, calls: Sequence[tuple[str, str, str]]
) -> dict[str, str]:
    """The kept signatures of `calls` (id → signature), in one round trip; none when
    the store fails or is slow."""
    if not calls:
        return {}
    try:
        async with asyncio.timeout(STORE_BUDGET_SECONDS):
            found = await store.get_many([signature_key(company_id, c[0]) for c in calls])
    except Exception as exc:  # the store down or slow: the stand-in, as before
        log.warning("could not read thought signatures (%s)", type(exc).__name__)
        return {}
    out: dict[str, str] = {}
    for (call_id, name, arguments), raw in zip(calls, found, strict=False):
        signature = decode(raw, name, arguments)
        if signature is not None:
            out[call_id] = signature
    return out


async def save(store: KeyValueStore, company_id: str, calls: Iterable[SignedCall]) -> None:
    """Keep the signatures of an answer's calls for `TTL_SECONDS`; a store that fails
    loses them (logged), nothing else."""
    writes = []
    for call in calls:
        value = encode(call) if call.id and keepable(call.signature) else None
        if value is not None:
            writes.append(store.set(signature_key(company_id, call.id), value, TTL_SECONDS))
    if not writes:
        return
    try:
        async with asyncio.timeout(STORE_BUDGET_SECONDS):
            results = await asyncio.gather(*writes, return_exceptions=True)
    except TimeoutError:
        log.warning("the store did not keep thought signatures in %g s", STORE_BUDGET_SECONDS)
        return
    for result in results:
        if isinstance(result, Exception):
            log.warning("could not keep a thought signature (%s)", type(result).__name__)
