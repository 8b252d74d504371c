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
from dataclasses import dataclass

import orjson
from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from shared.input_size import IMAGE_TOKENS

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
    # The model's context: a request carrying a file must hold all of it
    # (`input_size.carries_files`). 0 in routes sealed before it: no file is sent.
    context_length: int = 0
    # The company's whole key pool (issue 16.1), `api_key` first; empty in routes
    # sealed before pools, which carry `api_key` alone.
    api_keys: tuple[str, ...] = ()

    def keys(self) -> tuple[str, ...]:
        return self.api_keys or ((self.api_key,) if self.api_key else ())


PURPOSE = b"llm-gateway upstream route v2"


def route_key(encryption_key: str) -> str:
    """The `upr` sub-key (a Fernet key) of one Fernet key of the ring: HKDF-SHA256, no
    salt, info PURPOSE (RFC 5869). `deploy/gen-env.sh` computes the same in stdlib
    Python, so an edge can be given only these (LLMGW_ROUTE_KEY), not the ring."""
    Fernet(encryption_key)  # ValueError unless it is a Fernet key
    raw = base64.urlsafe_b64decode(encryption_key.encode("ascii"))
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=PURPOSE).derive(raw)
    return base64.urlsafe_b64encode(key).decode("ascii")


def route_ciphers(encryption_keys: Sequence[str]) -> MultiFernet:
    """The ring's sub-keys, newest first: seals with the newest, opens with any."""
    return route_ciphers_from_keys([route_key(key) for key in encryption_keys])


def route_ciphers_from_keys(route_keys: Sequence[str]) -> MultiFernet:
    """Already derived sub-keys (LLMGW_ROUTE_KEY), newest first."""
    if not route_keys:
        raise ValueError("no key for the upstream route claim")
    return MultiFernet([Fernet(key) for key in route_keys])


def _plain(route: UpstreamRoute) -> bytes:
    # orjson writes a dataclass's fields in order, the bytes of
    # `orjson.dumps(asdict(route))` without its deep copy of the key pool: measured
    # 1-3 µs a route against 22-37 µs, twice a route on each init (its size, its seal).
    return orjson.dumps(route)


def seal(route: UpstreamRoute, cipher: Fernet | MultiFernet) -> str:
    return cipher.encrypt(_plain(route)).decode()


# What the sealed routes of one stream token (the model's and each fallback's) may
# take in all, so that the token stays under `shared.tokens.STREAM_TOKEN_MAX_BYTES`
# with its other claims (model ids, ids, limits: under 4 KiB of JSON).
SEALED_ROUTES_MAX_BYTES = 31 * 1024


def sealed_length(route: UpstreamRoute) -> int:
    """`len(seal(route, ...))` without the key: a Fernet token is 57 bytes (version,
    time, IV, HMAC) around the plaintext padded to a whole 16-byte block, in padded
    url-safe base64."""
    plain = len(_plain(route))
    raw = 57 + 16 * (plain // 16 + 1)
    return 4 * -(-raw // 3)


def unseal(sealed: str, cipher: Fernet | MultiFernet) -> UpstreamRoute:
    """Raise ValueError when the claim was not sealed by our control plane."""
    try:
        doc = orjson.loads(cipher.decrypt(sealed.encode()))
        doc["features"] = tuple(doc.get("features") or ("streaming",))
        doc["api_keys"] = tuple(doc.get("api_keys") or ())
        return UpstreamRoute(**doc)
    except (InvalidToken, orjson.JSONDecodeError, TypeError, AttributeError) as exc:
        raise ValueError("the upstream route claim is not valid") from exc
