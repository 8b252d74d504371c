"""A company's own upstream route, carried inside the stream token, readable only by
the edge.

When a company brings its own provider key or model, the edge must use them without
asking the control plane on every stream. The control plane puts them in the token's
`upr` claim, encrypted (Fernet: AES-128-CBC + HMAC-SHA256) with a sub-key derived by
HKDF from each key of the `LLMGW_ENCRYPTION_KEY` ring (DESIGN §11): its own purpose,
so the ciphertext under one key never doubles as another, and rotatable with the
ring (seal with the newest, open with any). Never from the webhook secret: that one
is shared with whoever may sign usage events, and must not also open every
company's provider key. The client carries the token but can neither read nor
alter the route; the edge needs the ring but never the database.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import orjson
from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

CLAIM = "upr"


@dataclass(frozen=True, slots=True)
class UpstreamRoute:
    provider: str
    api_type: str
    base_url: str
    upstream_model: str
    api_key: str | None = None


PURPOSE = b"llm-gateway upstream route v2"


def route_cipher(encryption_key: str) -> Fernet:
    """The `upr` sub-key of one Fernet key of the ring."""
    raw = base64.urlsafe_b64decode(encryption_key.encode("ascii"))
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=PURPOSE).derive(raw)
    return Fernet(base64.urlsafe_b64encode(key))


def route_ciphers(encryption_keys: Sequence[str]) -> MultiFernet:
    """The ring's sub-keys, newest first: seals with the newest, opens with any."""
    if not encryption_keys:
        raise ValueError("the encryption key ring is empty")
    return MultiFernet([route_cipher(key) for key in encryption_keys])


def seal(route: UpstreamRoute, cipher: Fernet | MultiFernet) -> str:
    return cipher.encrypt(orjson.dumps(asdict(route))).decode()


def unseal(sealed: str, cipher: Fernet | MultiFernet) -> UpstreamRoute:
    """Raise ValueError when the claim was not sealed by our control plane."""
    try:
        doc = orjson.loads(cipher.decrypt(sealed.encode()))
        return UpstreamRoute(**doc)
    except (InvalidToken, orjson.JSONDecodeError, TypeError) as exc:
        raise ValueError("the upstream route claim is not valid") from exc
