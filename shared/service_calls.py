"""Edge → control plane calls on behalf of an API-key caller (issue 16.5), pure.

The edge never forwards the caller's ``sk_…`` key. It posts the key's SHA-256 (what
the control plane stores and looks keys up by) inside a JSON body signed per
Standard Webhooks (https://www.standardwebhooks.com/) with
``LLMGW_EDGE_SERVICE_SECRET``: ``webhook-id`` a fresh nonce per call,
``webhook-timestamp``, ``webhook-signature``. The control plane accepts a call only
when one of its configured secrets signed it within the spec's 5-minute window and
its id was never seen before (`NONCE_TTL_SECONDS` covers the window both ways), so
a recorded call cannot be replayed to take a second hold.

What travels: the hash (useless against the public API, which wants the key
itself), the translated init body, and the signature. What never travels: the key.
"""

from __future__ import annotations

import hashlib
import uuid
from datetime import datetime

from shared.webhooks import BadSignature, sign, verify

# The paths of the internal endpoints (not in /openapi.json: only edges call them).
INIT_PATH = "/v1/internal/chat/init"
MODELS_PATH = "/v1/internal/models"
# Standard Webhooks accepts timestamps up to 5 minutes off either way.
NONCE_TTL_SECONDS = 600
CALL_ID_PREFIX = "edgecall_"
API_KEY_PREFIX = "sk_"
# The key's hash again, outside the signed body: the control plane looks the key up
# by it before it parses the body (an unknown key costs one indexed read, no parse).
# Not signed, so the body's `key_hash` must equal it.
KEY_HASH_HEADER = "x-llmgw-key-hash"


def is_api_key(token: str | None) -> bool:
    """A gateway API key rather than a stream token (a JWT never starts with `sk_`)."""
    return token is not None and token.startswith(API_KEY_PREFIX)


def key_digest(key: str) -> str:
    """SHA-256 of the key, hex: exactly what `control_plane.credentials.hash_api_key`
    stores, so the control plane finds the key by its unique index."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def signed_headers(secret: str, body: bytes, now: datetime | None = None) -> dict[str, str]:
    """The Standard Webhooks headers for one call, under a fresh id (the nonce)."""
    return sign(secret, f"{CALL_ID_PREFIX}{uuid.uuid4().hex}", body, now)


def verify_call(secrets: list[str], body: bytes, headers: dict[str, str]) -> str:
    """The call's id when one of `secrets` signed `body` in time; BadSignature else
    (no secrets configured: nothing verifies)."""
    if not secrets:
        raise BadSignature("no edge service secret is configured")
    verify(secrets, body, headers)
    call_id = headers.get("webhook-id", "")
    if not call_id.startswith(CALL_ID_PREFIX) or len(call_id) > 100:
        raise BadSignature("not an edge call id")
    return call_id


def nonce_key(call_id: str) -> str:
    return f"edgecall:{call_id}"
