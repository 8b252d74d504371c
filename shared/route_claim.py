"""A company's own upstream route, carried inside the stream token, readable only by
the edge.

When a company brings its own provider key or model, the edge must use them without
asking the control plane on every stream. The control plane puts them in the token's
`upr` claim, encrypted (Fernet: AES-128-CBC + HMAC-SHA256) with a key derived by HKDF
from the Standard Webhooks secret that both services already share. The client can
carry the token but cannot read or alter the route; the edge never needs the
database or the control plane's `LLMGW_ENCRYPTION_KEY`.
"""

from __future__ import annotations

import base64
from dataclasses import asdict, dataclass

import orjson
from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from shared.input_size import IMAGE_TOKENS
from shared.webhooks import secret_bytes

CLAIM = "upr"


@dataclass(frozen=True, slots=True)
class UpstreamRoute:
    provider: str
    api_type: str
    base_url: str
    upstream_model: str
    api_key: str | None = None
    # What the company's model accepts and what an image costs in the estimate, so
    # the edge checks a request's parts as init did (`shared.input_size`).
    features: tuple[str, ...] = ("streaming",)
    image_input_tokens: int = IMAGE_TOKENS


def route_cipher(webhook_secret: str) -> Fernet:
    key = HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None, info=b"llm-gateway upstream route"
    ).derive(secret_bytes(webhook_secret))
    return Fernet(base64.urlsafe_b64encode(key))


def route_ciphers(webhook_secrets: list[str]) -> MultiFernet:
    """For reading: any of the secrets (newest first) during a webhook-secret rotation."""
    return MultiFernet([route_cipher(secret) for secret in webhook_secrets])


def seal(route: UpstreamRoute, cipher: Fernet) -> str:
    return cipher.encrypt(orjson.dumps(asdict(route))).decode()


def unseal(sealed: str, cipher: Fernet | MultiFernet) -> UpstreamRoute:
    """Raise ValueError when the claim was not sealed by our control plane."""
    try:
        doc = orjson.loads(cipher.decrypt(sealed.encode()))
        doc["features"] = tuple(doc.get("features") or ("streaming",))
        return UpstreamRoute(**doc)
    except (InvalidToken, orjson.JSONDecodeError, TypeError, AttributeError) as exc:
        raise ValueError("the upstream route claim is not valid") from exc
