"""Usage webhooks: the event body and Standard Webhooks signing.

Spec: https://www.standardwebhooks.com/ — headers ``webhook-id``,
``webhook-timestamp``, ``webhook-signature`` (``v1,<base64 HMAC-SHA256 of
"{id}.{timestamp}.{body}">``). Signing and verification use the `standardwebhooks`
library; this module only builds the payload and normalises its errors.
"""

from __future__ import annotations

import base64
import hmac
import re
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

import orjson
from standardwebhooks import Webhook, WebhookVerificationError

STATUSES = ("completed", "cancelled", "failed", "revoked")
# The largest usage webhook body the control plane reads (413 past it, which the
# edge's outbox takes as permanent); the edge trims a report's transcript to fit.
MAX_USAGE_BODY_BYTES = 1024 * 1024
USAGE_SOURCES = ("upstream", "estimated")
# The largest token count a usage webhook may carry (422 past it): far above any
# context, so the edge clamps a backend's wilder counts to it rather than lose the
# report (the charge is capped at the hold anyway).
MAX_TOKENS_REPORTED = 10**9
# How the input and output split (DESIGN §11 "Prices"): parts of `input_tokens` read
# from and written to the vendor's cache, and the part of `output_tokens` spent
# reasoning; 0 when unknown.
USAGE_DETAILS = ("cached_input_tokens", "cache_write_tokens", "reasoning_tokens")


class BadSignature(Exception):
    """The webhook's signature or timestamp does not verify."""


# Standard Webhooks' window around the receiver's clock (the library's, fixed).
TOLERANCE_SECONDS = 5 * 60


class StaleTimestamp(BadSignature):
    """A configured secret did sign the webhook, but it is dated more than
    `TOLERANCE_SECONDS` off this process's clock: the sender's clock disagrees with
    ours (or it is a replay, which the receiver refuses all the same). `server_time`
    is our clock, told to whoever holds the secret so it can date its retry by it."""

    def __init__(self, server_time: int) -> None:
        super().__init__("the webhook timestamp is outside the tolerance window")
        self.server_time = server_time


def generate_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def secret_bytes(secret: str) -> bytes:
    """The raw key of a `whsec_…` secret (to derive other keys from it)."""
    body = secret.removeprefix("whsec_")
    return base64.b64decode(body + "=" * (-len(body) % 4))


# Standard Webhooks keys are 24 to 64 random bytes; fewer is guessable offline from one
# signed event. https://github.com/standard-webhooks/standard-webhooks/blob/main/spec/standard-webhooks.md
MIN_SECRET_BYTES = 24
# 24 random bytes almost never repeat more than a few values; a key with fewer
# distinct bytes than this was typed or patterned (whsec_AAAA…), not generated.
MIN_DISTINCT_BYTES = 16
# The placeholders our own examples ship (.env.example, deploy/k8s/secret.example.yaml):
# a deployment that copied one verbatim shares its secret with everyone who read them.
PLACEHOLDER_SECRETS = frozenset({"whsec_CHANGE_ME", "whsec_REPLACE_ME", "whsec_…", "whsec_..."})
GENERATE_HINT = (
    'generate one with: python -c "import base64,secrets;'
    "print('whsec_'+base64.b64encode(secrets.token_bytes(32)).decode())\""
)


def is_placeholder(secret: str) -> bool:
    """Whether `secret` is, or embeds, a placeholder of our examples, however it is
    cased or punctuated (``CHANGE_ME``, ``changeme-changeme``, ``REPLACE_ME…``)."""
    letters = "".join(c for c in secret.upper() if c.isalpha())
    return secret in PLACEHOLDER_SECRETS or "CHANGEME" in letters or "REPLACEME" in letters


def check_random(value: str | bytes, *, minimum: int, distinct: int, unit: str, hint: str) -> None:
    """Raise ValueError unless `value` is long enough and not an obvious pattern (a
    generated value almost never repeats few symbols; a typed one does)."""
    if len(value) < minimum:
        raise ValueError(f"must carry at least {minimum} random {unit}, got {len(value)}; {hint}")
    if len(set(value)) < distinct:
        raise ValueError(f"is not random (too few distinct {unit}); {hint}")


def validate_secret(secret: str) -> None:
    """Raise ValueError unless `secret` is a strong Standard Webhooks secret: not one
    of our placeholders, at least 24 bytes, and not an obviously patterned key."""
    if is_placeholder(secret):
        raise ValueError(f"is the placeholder from the examples; {GENERATE_HINT}")
    try:
        Webhook(secret)
        raw = secret_bytes(secret)
    except Exception as exc:  # the library raises several unrelated types
        raise ValueError(
            f"must be a Standard Webhooks secret like whsec_<base64>; {GENERATE_HINT}"
        ) from exc
    check_random(
        raw, minimum=MIN_SECRET_BYTES, distinct=MIN_DISTINCT_BYTES, unit="bytes", hint=GENERATE_HINT
    )


def iso_utc(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class UsageEvent:
    """What the edge reports when a stream ends (DESIGN §7)."""

    jti: str
    reservation_id: str
    company_id: str
    user_id: str
    session_id: str
    request_id: str
    model: str
    provider: str
    status: str
    finish_reason: str | None
    input_tokens: int
    output_tokens: int
    usage_source: str
    started_at: str
    first_token_at: str | None
    ended_at: str
    content: str | None = None
    # The assistant's tool calls in OpenAI's shape, when transcripts are on (DESIGN §11).
    tool_calls: list[dict[str, Any]] | None = None
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    # The model first chosen, when a fallback of its chain served (`model` names the
    # one that did; DESIGN §11).
    fallback_from: str | None = None

    @property
    def webhook_id(self) -> str:
        return usage_webhook_id(self.jti)

    def body(self, now: datetime | None = None) -> bytes:
        # Shallow on purpose: every field is a plain value, and `asdict`'s deep copy
        # was a measurable share of the edge's CPU per stream.
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        if data["content"] is None:
            del data["content"]
        if data["tool_calls"] is None:
            del data["tool_calls"]
        if data["fallback_from"] is None:
            del data["fallback_from"]
        return orjson.dumps(
            {
                "type": f"stream.{self.status}",
                "timestamp": iso_utc(now or datetime.now(UTC)),
                "data": data,
            }
        )


def usage_webhook_id(jti: str) -> str:
    """A stream's usage report's id: stable per stream, so the receiver recognises
    retries, and the outbox's key, so the sweeper sees a report waiting there."""
    return f"usage_{jti}"


@lru_cache(maxsize=64)
def _webhook(secret: str) -> Webhook:
    """One signer per secret: building it decodes the key, and every usage report,
    edge call and webhook check would otherwise do that again. The secrets are the
    process's own configuration, a handful at most."""
    return Webhook(secret)


def sign(secret: str, webhook_id: str, body: bytes, now: datetime | None = None) -> dict[str, str]:
    moment = now or datetime.now(UTC)
    signature = _webhook(secret).sign(webhook_id, moment, body.decode())
    return {
        "webhook-id": webhook_id,
        "webhook-timestamp": str(int(moment.timestamp())),
        "webhook-signature": signature,
        "content-type": "application/json",
    }


PROVIDER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")


def parse_backend_secrets(raw: str) -> dict[str, list[str]]:
    """`provider=whsec_…[,provider=whsec_…]` (DESIGN §11) → provider → its secrets in the
    order given (newest first: a provider listed twice is mid-rotation). ValueError
    names the problem; each secret must pass `validate_secret`."""
    by_provider: dict[str, list[str]] = {}
    owner: dict[str, str] = {}
    for item in (part.strip() for part in raw.split(",")):
        if not item:
            continue
        provider, sep, secret = (s.strip() for s in item.partition("="))
        if not sep or not PROVIDER_NAME.fullmatch(provider):
            raise ValueError("must be provider=whsec_… pairs, comma-separated")
        try:
            validate_secret(secret)
        except ValueError as exc:
            raise ValueError(f"({provider}) {exc}") from None
        if owner.setdefault(secret, provider) != provider:
            raise ValueError(f"gives one secret to both {owner[secret]} and {provider}")
        by_provider.setdefault(provider, []).append(secret)
    return by_provider


def verify_signer(
    platform: list[str], backends: Mapping[str, list[str]], body: bytes, headers: dict[str, str]
) -> str | None:
    """Who signed: None for the platform's secret (the edge: settles any reservation),
    else the backend provider whose secret did (settles only reservations routed to
    that provider, DESIGN §11). Raises BadSignature when no configured secret did."""
    text = _text(body)
    for signer, secrets_ in ((None, platform), *backends.items()):
        if any(_signed_by(secret, text, headers) for secret in secrets_):
            return signer
    # Refused: only now (never on the hot path) is it worth asking whether the
    # signature was good and only its date was off.
    all_secrets = [*platform, *(s for group in backends.values() for s in group)]
    out_of_window = _out_of_window(headers)
    if out_of_window is not None and any(
        _signed_at(secret, text, headers, out_of_window) for secret in all_secrets
    ):
        raise StaleTimestamp(int(time.time()))
    raise BadSignature("no matching signature")


def verify(secrets_: list[str], body: bytes, headers: dict[str, str]) -> None:
    """Raise BadSignature unless one of `secrets_` signed `body` within the 5-minute window.

    The body is parsed by the caller: a correctly signed but malformed body is a
    different error (422) from a forged one (401)."""
    verify_signer(secrets_, {}, body, headers)


def _text(body: bytes) -> str:
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadSignature("body is not UTF-8") from exc


def _out_of_window(headers: dict[str, str]) -> datetime | None:
    """The webhook's date when it is outside the window of our clock; None when it is
    within (so the signature itself was wrong), missing or unreadable."""
    lowered = {k.lower(): v for k, v in headers.items()}
    try:
        stamp = float(lowered.get("webhook-timestamp", ""))
        moment = datetime.fromtimestamp(stamp, UTC)
    except (ValueError, OverflowError, OSError):
        return None
    return moment if abs(stamp - time.time()) > TOLERANCE_SECONDS else None


def _signed_at(secret: str, text: str, headers: dict[str, str], moment: datetime) -> bool:
    """Whether `secret` signed the webhook dated `moment`, whatever our clock says:
    the library's own HMAC and comparison, without its window."""
    lowered = {k.lower(): v for k, v in headers.items()}
    expected = _webhook(secret).sign(lowered.get("webhook-id", ""), moment, text)
    return any(
        hmac.compare_digest(expected.encode(), given.encode())
        for given in lowered.get("webhook-signature", "").split(" ")
    )


def _signed_by(secret: str, text: str, headers: dict[str, str]) -> bool:
    # The library accepts any of several space-separated signatures (Standard Webhooks
    # §"Signature scheme"), so a sender mid-rotation may sign with old and new.
    try:
        _webhook(secret).verify(text, headers, json_parse=False)
        return True
    except WebhookVerificationError:
        return False
    except (ValueError, TypeError) as exc:  # malformed signature header, bad base64
        raise BadSignature("malformed signature headers") from exc
