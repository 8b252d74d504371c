"""Usage webhooks: the event body and Standard Webhooks signing.

Spec: https://www.standardwebhooks.com/ — headers ``webhook-id``,
``webhook-timestamp``, ``webhook-signature`` (``v1,<base64 HMAC-SHA256 of
"{id}.{timestamp}.{body}">``). Signing and verification use the `standardwebhooks`
library; this module only builds the payload and normalises its errors.
"""

from __future__ import annotations

import base64
import secrets
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from typing import Any

import orjson
from standardwebhooks import Webhook, WebhookVerificationError

STATUSES = ("completed", "cancelled", "failed", "revoked")
USAGE_SOURCES = ("upstream", "estimated")


class BadSignature(Exception):
    """The webhook's signature or timestamp does not verify."""


def generate_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def secret_bytes(secret: str) -> bytes:
    """The raw key of a `whsec_…` secret (to derive other keys from it)."""
    body = secret.removeprefix("whsec_")
    return base64.b64decode(body + "=" * (-len(body) % 4))


def validate_secret(secret: str) -> None:
    """Raise ValueError unless `secret` is a usable Standard Webhooks secret."""
    try:
        Webhook(secret)
    except Exception as exc:  # the library raises several unrelated types
        raise ValueError("must be a Standard Webhooks secret like whsec_<base64>") from exc


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

    @property
    def webhook_id(self) -> str:
        # Stable per stream so the receiver recognises retries.
        return f"usage_{self.jti}"

    def body(self, now: datetime | None = None) -> bytes:
        # Shallow on purpose: every field is a plain value, and `asdict`'s deep copy
        # was a measurable share of the edge's CPU per stream.
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        if data["content"] is None:
            del data["content"]
        if data["tool_calls"] is None:
            del data["tool_calls"]
        return orjson.dumps(
            {
                "type": f"stream.{self.status}",
                "timestamp": iso_utc(now or datetime.now(UTC)),
                "data": data,
            }
        )


def sign(secret: str, webhook_id: str, body: bytes, now: datetime | None = None) -> dict[str, str]:
    moment = now or datetime.now(UTC)
    signature = Webhook(secret).sign(webhook_id, moment, body.decode())
    return {
        "webhook-id": webhook_id,
        "webhook-timestamp": str(int(moment.timestamp())),
        "webhook-signature": signature,
        "content-type": "application/json",
    }


def verify(secrets_: list[str], body: bytes, headers: dict[str, str]) -> None:
    """Raise BadSignature unless one of `secrets_` signed `body` within the 5-minute window.

    The body is parsed by the caller: a correctly signed but malformed body is a
    different error (422) from a forged one (401)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadSignature("body is not UTF-8") from exc
    for secret in secrets_:
        try:
            Webhook(secret).verify(text, headers, json_parse=False)
            return
        except WebhookVerificationError:
            continue
        except (ValueError, TypeError) as exc:  # malformed signature header, bad base64
            raise BadSignature("malformed signature headers") from exc
    raise BadSignature("no matching signature")
