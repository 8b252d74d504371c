"""What both services read from the environment, and the helpers each reads with.

Each service has its own settings object, validated at its start, naming only the
variables that service reads (`control_plane.settings.ControlPlaneSettings`,
`stream_edge.settings.EdgeSettings`); both extend `CommonSettings`, the variables
both read. `from_env` raises `ConfigError` naming the variable; the CLI prints that
one line and exits. Secrets are wrapped in `Secret` so they never show in a repr.

Plain frozen dataclasses rather than pydantic-settings: most variables need a
one-line error naming them, a range, comma-separated secret lists, a catalog file,
or key variables named by that catalog, so validators and an error translation
layer would replace these parsers rather than remove them, and the edge would pay
pydantic's import (it imports no pydantic today) at every start.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlparse

from cryptography.fernet import Fernet

from shared.catalog import Catalog, CatalogError, load_catalog
from shared.tokens import LEEWAY_SECONDS, STREAM_TOKEN_MAX_BYTES
from shared.webhooks import is_placeholder, validate_secret

# What a hold's grace must leave, after the longest stream ends, for its usage
# webhook to arrive (the outbox's first retries) before the sweeper steps in.
REPORT_MARGIN_SECONDS = 60


# The least LLMGW_MAX_HEADER_BYTES: the largest stream token the control plane mints
# (in the query of `GET /v1/stream`, or `Authorization: Bearer`) and what a browser
# sends beside it (a Referer of up to 4 KiB, client hints, cookies). Below it, every
# stream of a company whose key pool rides in its tokens was refused 431.
MIN_HEADER_BYTES = STREAM_TOKEN_MAX_BYTES + 16 * 1024


class ConfigError(ValueError):
    """Invalid configuration: the message is one line naming the variable."""


class Secret:
    """A string that does not print itself."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


N = TypeVar("N", int, float)


def _env_number(
    env: Mapping[str, str], name: str, default: N, low: N, high: N, kind: type[N], what: str
) -> N:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise ConfigError(f"{name} must be {what}, got {raw!r}") from None
    if not low <= value <= high:
        raise ConfigError(f"{name} must be between {low} and {high}, got {value}")
    return value


def env_int(env: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    return _env_number(env, name, default, low, high, int, "an integer")


def env_float(env: Mapping[str, str], name: str, default: float, low: float, high: float) -> float:
    return _env_number(env, name, default, low, high, float, "a number")


def env_url(env: Mapping[str, str], name: str, default: str) -> str:
    value = env.get(name) or default
    parsed = urlparse(value)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        # Never the value: a URL may carry a password, and this line goes to the logs.
        raise ConfigError(f"{name} must be an http(s) URL, got scheme {parsed.scheme!r}")
    return value.rstrip("/")


def env_base_url(env: Mapping[str, str], name: str, default: str) -> str:
    """A service's base URL (LLMGW_CONTROL_PLANE_URL, LLMGW_EDGE_PUBLIC_URL): the
    services add `/v1/…` themselves, so one given in the vendors' style (`…/v1`) made
    every stream URL `/v1/v1/stream` and every JWKS fetch and usage webhook a 404; a
    query or fragment broke them the same way. A path prefix (a proxy's) is fine."""
    value = env_url(env, name, default)
    parsed = urlparse(value)
    if parsed.query or parsed.fragment or parsed.path.lower().endswith("/v1"):
        raise ConfigError(
            f"{name} must be the service's base URL without /v1, a query or a fragment "
            "(the services add /v1/... themselves), e.g. https://stream.example.com"
        )
    return value


def refuse_placeholder_password(name: str, url: str) -> None:
    """Stop the start when the store URL in `name` carries one of the examples'
    placeholder passwords (`deploy/k8s/secret.example.yaml` writes `REPLACE_ME`): a
    store given that password so the services connect is open to anyone who read the
    examples. The password may sit in the URL's user part or, for libpq, in a
    `password=` parameter. One line naming the variable, never the URL."""
    parsed = urlparse(url)
    passwords = [parsed.password or "", *parse_qs(parsed.query).get("password", [])]
    if any(is_placeholder(password) for password in passwords if password):
        raise ConfigError(
            f"{name} carries the placeholder password from the examples; give the store "
            "a random password and put that in the URL"
        )


def env_flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be 1/0, true/false, yes/no or on/off, got {raw!r}")


def env_list(env: Mapping[str, str], name: str) -> list[str]:
    """A comma-separated variable; several secrets (newest first) allow a rotation
    without downtime: the signer uses the first, the verifier accepts any."""
    return [item.strip() for item in env.get(name, "").split(",") if item.strip()]


def cors_origins(env: Mapping[str, str]) -> tuple[str, ...]:
    """LLMGW_CORS_ORIGINS: `*` or origins exactly as a browser sends them
    (`scheme://host[:port]`). CORS compares whole strings, so an entry with a path, a
    trailing slash, quotes or no scheme matched no browser: every preflight of the
    operator's app was refused while the services started without a word."""
    origins = tuple(env_list(env, "LLMGW_CORS_ORIGINS"))
    for origin in origins:
        if origin == "*":
            continue
        parsed = urlparse(origin)
        if (
            parsed.scheme not in ("http", "https")
            or not parsed.hostname
            or f"{parsed.scheme}://{parsed.netloc}" != origin
            or "@" in parsed.netloc
            or origin != origin.lower()  # a browser sends its host in lower case
        ):
            raise ConfigError(
                f"LLMGW_CORS_ORIGINS entry {origin!r} is not an origin a browser sends: write "
                "scheme://host[:port] (no path, no trailing slash, no quotes), "
                "e.g. https://app.example.com"
            )
    return origins


def fernet_keys(env: Mapping[str, str], name: str, refusal: str) -> tuple[Secret, ...]:
    keys = tuple(Secret(k) for k in env_list(env, name))
    for key in keys:
        try:
            Fernet(key.reveal())
        except (ValueError, TypeError):
            raise ConfigError(f"{name} must be {refusal}") from None
    return keys


EDGE_SECRET_CLASH = (
    "LLMGW_EDGE_SERVICE_SECRET must differ from LLMGW_WEBHOOK_SECRET and "
    "LLMGW_BACKEND_WEBHOOK_SECRETS"
)


@dataclass(frozen=True, kw_only=True)
class CommonSettings:
    """The variables both services read; each service's settings extend it."""

    redis_url: str | None
    redis_prefix: str
    webhook_secret: Secret  # the newest: the edge signs with it
    webhook_secrets: tuple[Secret, ...]  # all accepted (control plane), newest first
    catalog: Catalog
    cors_origins: tuple[str, ...]
    # The control plane encrypts stored secrets with the ring; the edge derives the
    # `upr` claim's sub-keys from it (or reads LLMGW_ROUTE_KEY instead).
    encryption_keys: tuple[Secret, ...]
    store_transcripts: bool
    # The hold's grace (control plane: its deadline; edge: its checkpoints' TTL), the
    # longest stream (edge: its cap; control plane: a revocation's lifetime) and the
    # resume grace (edge: replay; control plane: the sweeper's silence limit) are
    # read by both, so both check at start that a hold outlives its longest stream.
    hold_grace_seconds: int
    # Whole seconds from the environment (10 at least); a float so that a caller
    # building settings itself (a test) may give a stream a shorter life.
    max_stream_seconds: float
    resume_grace_seconds: float
    # Each service's server waits this + 10 s on SIGTERM; the edge's streams get
    # this long to finish before they end with `shutting_down`.
    drain_seconds: float
    # What a client may hold before its request starts (llm_gateway/http_guard.py).
    header_timeout_seconds: float
    max_header_bytes: int
    max_connections: int
    # Edge → control plane calls for API-key callers (issue 16.5): Standard Webhooks
    # secrets, newest first (the edge signs with the first, the control plane
    # accepts any). Empty: the edge refuses `sk_…` keys.
    edge_service_secrets: tuple[Secret, ...] = ()
    dev: bool = False


def read_common(env: Mapping[str, str], *, dev: bool = False) -> CommonSettings:
    """The common variables, validated; a service's `from_env` extends them."""
    webhook_secrets = env_list(env, "LLMGW_WEBHOOK_SECRET")
    if not webhook_secrets:
        raise ConfigError("LLMGW_WEBHOOK_SECRET is required (a Standard Webhooks whsec_… key)")
    for secret in webhook_secrets:
        try:
            validate_secret(secret)
        except ValueError as exc:
            raise ConfigError(f"LLMGW_WEBHOOK_SECRET {exc}") from None
    edge_secrets = _edge_service_secrets(env)
    if set(webhook_secrets) & set(edge_secrets):
        # Whoever holds the usage webhook secret could start streams for any API key.
        raise ConfigError(EDGE_SECRET_CLASH)
    encryption_keys = fernet_keys(
        env,
        "LLMGW_ENCRYPTION_KEY",
        "Fernet keys (32 url-safe base64 bytes), comma-separated, newest first",
    )
    try:
        catalog = load_catalog(env.get("LLMGW_MODELS_FILE") or None)
    except CatalogError as exc:
        raise ConfigError(f"LLMGW_MODELS_FILE: {exc}") from None
    redis_url = env.get("LLMGW_REDIS_URL") or None
    # `redis+cluster://` / `rediss+cluster://`: a Redis Cluster (shared/store_redis.py).
    schemes = ("redis", "rediss", "unix", "redis+cluster", "rediss+cluster")
    if redis_url and urlparse(redis_url).scheme not in schemes:
        scheme = urlparse(redis_url).scheme
        raise ConfigError(f"LLMGW_REDIS_URL must be a redis:// URL, got scheme {scheme!r}")
    if redis_url:
        refuse_placeholder_password("LLMGW_REDIS_URL", redis_url)
    common = CommonSettings(
        redis_url=redis_url,
        redis_prefix=env.get("LLMGW_REDIS_PREFIX") or "llmgw:",
        webhook_secret=Secret(webhook_secrets[0]),
        webhook_secrets=tuple(Secret(s) for s in webhook_secrets),
        catalog=catalog,
        cors_origins=cors_origins(env),
        encryption_keys=encryption_keys,
        store_transcripts=env_flag(env, "LLMGW_STORE_TRANSCRIPTS", True),
        hold_grace_seconds=env_int(env, "LLMGW_HOLD_GRACE_SECONDS", 1200, 1, 86400),
        max_stream_seconds=env_int(env, "LLMGW_MAX_STREAM_SECONDS", 900, 10, 86400),
        resume_grace_seconds=env_float(env, "LLMGW_RESUME_GRACE_SECONDS", 10, 0, 600),
        drain_seconds=env_float(env, "LLMGW_DRAIN_SECONDS", 20, 0, 3600),
        header_timeout_seconds=env_float(env, "LLMGW_HEADER_TIMEOUT_SECONDS", 10, 0.1, 300),
        max_header_bytes=_max_header_bytes(env),
        max_connections=env_int(env, "LLMGW_MAX_CONNECTIONS", 1000, 1, 1_000_000),
        edge_service_secrets=tuple(Secret(s) for s in edge_secrets),
        dev=dev,
    )
    _check_hold_outlives_streams(common)
    return common


def common_of(settings: CommonSettings) -> dict[str, Any]:
    """`settings`' common fields as keyword arguments for a service's class."""
    return {f.name: getattr(settings, f.name) for f in fields(CommonSettings)}


def _max_header_bytes(env: Mapping[str, str]) -> int:
    """LLMGW_MAX_HEADER_BYTES, at least `MIN_HEADER_BYTES`: a smaller cap refused
    (431) the streams whose token carries a company's key pool and fallbacks."""
    try:
        return env_int(env, "LLMGW_MAX_HEADER_BYTES", 64 * 1024, MIN_HEADER_BYTES, 1024 * 1024)
    except ConfigError as exc:
        raise ConfigError(
            f"{exc} (a stream token may take {STREAM_TOKEN_MAX_BYTES} bytes with a "
            "company's key pool and fallbacks, and a browser sends more headers beside it)"
        ) from None


def _edge_service_secrets(env: Mapping[str, str]) -> list[str]:
    """LLMGW_EDGE_SERVICE_SECRET: as strong as the webhook secret, and its own: a
    secret that also signs usage webhooks (or a backend's) would let whoever holds
    that one start streams for any API key's hash."""
    secrets_ = env_list(env, "LLMGW_EDGE_SERVICE_SECRET")
    for secret in secrets_:
        try:
            validate_secret(secret)
        except ValueError as exc:
            raise ConfigError(f"LLMGW_EDGE_SERVICE_SECRET {exc}") from None
    return secrets_


def _check_hold_outlives_streams(settings: CommonSettings) -> None:
    """A hold's deadline is the token's expiry + LLMGW_HOLD_GRACE_SECONDS (issue 11.4).
    A stream may start at expiry (plus the verifier's leeway), run
    LLMGW_MAX_STREAM_SECONDS, then keep its resume grace; its report needs a moment
    more. A shorter grace lets the sweeper settle a live stream as ``failed`` and
    turns its real report into a duplicate, so such settings never start."""
    needed = (
        LEEWAY_SECONDS
        + math.ceil(settings.max_stream_seconds)
        + math.ceil(settings.resume_grace_seconds)
        + REPORT_MARGIN_SECONDS
    )
    if settings.hold_grace_seconds < needed:
        raise ConfigError(
            f"LLMGW_HOLD_GRACE_SECONDS must be at least {needed} (LLMGW_MAX_STREAM_SECONDS "
            f"+ LLMGW_RESUME_GRACE_SECONDS + {LEEWAY_SECONDS + REPORT_MARGIN_SECONDS}) so a "
            f"hold outlives its longest stream, got {settings.hold_grace_seconds}"
        )
