"""Settings read once from the environment, typed and validated (DESIGN §4).

`Settings.from_env` raises `ConfigError` naming the variable; the CLI prints that
one line and exits. Secrets are wrapped in `Secret` so they never show in a repr.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlparse

from cryptography.fernet import Fernet

from shared.catalog import Catalog, CatalogError, load_catalog
from shared.route_claim import route_key
from shared.tokens import LEEWAY_SECONDS
from shared.webhooks import parse_backend_secrets, validate_secret

DEFAULT_DATABASE_URL = "sqlite:///var/llm-gateway.db"
# What a hold's grace must leave, after the longest stream ends, for its usage
# webhook to arrive (the outbox's first retries) before the sweeper steps in.
REPORT_MARGIN_SECONDS = 60


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


def _int(env: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
    if not low <= value <= high:
        raise ConfigError(f"{name} must be between {low} and {high}, got {value}")
    return value


def _float(env: Mapping[str, str], name: str, default: float, low: float, high: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None
    if not low <= value <= high:
        raise ConfigError(f"{name} must be between {low} and {high}, got {value}")
    return value


def _url(env: Mapping[str, str], name: str, default: str) -> str:
    value = env.get(name) or default
    parsed = urlparse(value)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ConfigError(f"{name} must be an http(s) URL, got {value!r}")
    return value.rstrip("/")


def _flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be 1/0, true/false, yes/no or on/off, got {raw!r}")


@dataclass(frozen=True)
class Settings:
    database_url: str
    # LLMGW_DATABASE_PGBOUNCER: the database is reached through PgBouncer in
    # transaction mode, so no server-side prepared statements (control_plane/db.py).
    database_pgbouncer: bool
    redis_url: str | None
    redis_prefix: str
    control_plane_url: str
    edge_public_url: str
    webhook_secret: Secret  # the newest: signs
    webhook_secrets: tuple[Secret, ...]  # all accepted, newest first
    admin_token: Secret | None
    token_ttl_seconds: int
    catalog: Catalog
    cors_origins: tuple[str, ...]
    encryption_keys: tuple[Secret, ...]
    # The edge's alternative to the ring: only the derived `upr` sub-keys (route_claim).
    route_keys: tuple[Secret, ...]
    auto_migrate: bool
    store_transcripts: bool
    upstream_connect_timeout: float
    upstream_read_timeout: float
    hold_grace_seconds: int
    sweep_interval_seconds: float
    first_token_timeout: float
    idle_timeout: float
    upstream_retries: int
    ping_interval: float
    slow_client_timeout: float
    max_streams_per_user: int
    max_streams_per_company: int
    max_stream_seconds: int
    resume_grace_seconds: float
    drain_seconds: float
    # What a client may hold before its request starts (llm_gateway/http_guard.py).
    header_timeout_seconds: float
    max_header_bytes: int
    max_connections: int
    breaker_failures: int
    breaker_reset_seconds: float
    webhook_retry_base_seconds: float
    webhook_retry_cap_seconds: float
    spool_dir: str  # edge: usage reports the store would not take wait here
    serve_demo: bool = False
    serve_console: bool = True  # the console at /console (DESIGN §11)
    dev: bool = False
    provider_keys: Mapping[str, Secret] = field(default_factory=dict)
    # Every platform key of a provider (`api_key_env`, then `api_key_envs`), in order:
    # the edge spreads streams across them (`stream_edge.key_pool`).
    provider_key_pools: Mapping[str, tuple[Secret, ...]] = field(default_factory=dict)
    service_tokens: Mapping[str, Secret] = field(default_factory=dict)
    # Backends posting their own usage webhooks (control plane): provider → its
    # secrets, newest first; each settles only reservations routed to its provider.
    backend_webhook_secrets: Mapping[str, tuple[Secret, ...]] = field(default_factory=dict)
    # Edge → control plane calls for API-key callers (both services, issue 16.5):
    # Standard Webhooks secrets, newest first (the edge signs with the first, the
    # control plane accepts any). Empty: the edge refuses `sk_…` keys.
    edge_service_secrets: tuple[Secret, ...] = ()
    init_rate_per_user: int = 120  # per minute, DESIGN §9
    init_rate_per_company: int = 1200
    # Tokens per minute at init (control plane, DESIGN §11): the hold's token estimate
    # counted at init, corrected to actual usage at settlement; 0 = off (the default).
    tpm_per_user: int = 0
    tpm_per_company: int = 0
    # Companies' own webhooks (budget.threshold) may go to private, loopback or
    # link-local addresses only when this is on (control plane; off: no SSRF inward).
    company_webhooks_allow_private: bool = False
    login_failures_per_15min: int = 10  # per email and per client address, DESIGN §11
    # Abuse limits (issue 12.6): unused stream grants per user, what one chat session
    # may hold, and the size of one init's stashed request.
    max_pending_inits_per_user: int = 20
    max_session_messages: int = 1000
    max_session_bytes: int = 1024 * 1024
    max_request_bytes: int = 2 * 1024 * 1024
    # Edge: connections open at once to one backend origin (busy or idle); a stream
    # finding them all busy waits up to the connect timeout. The default matches
    # LLMGW_MAX_CONNECTIONS, so a full edge is never held back by it.
    edge_max_connections_per_origin: int = 1000
    # Trusting an existing app's user JWTs (control plane): HS256 with a shared secret
    # and/or RS256/ES256/EdDSA with keys from a JWKS URL; audience and issuer required.
    auth_jwt_secret: Secret | None = None
    auth_jwks_url: str | None = None
    auth_jwt_audience: str | None = None
    auth_jwt_issuer: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str], *, dev: bool = False) -> Settings:
        # Several comma-separated secrets, newest first, allow a rotation without
        # downtime: the edge signs with the first, the control plane accepts any.
        webhook_secrets = [
            s.strip() for s in env.get("LLMGW_WEBHOOK_SECRET", "").split(",") if s.strip()
        ]
        if not webhook_secrets:
            raise ConfigError("LLMGW_WEBHOOK_SECRET is required (a Standard Webhooks whsec_… key)")
        for secret in webhook_secrets:
            try:
                validate_secret(secret)
            except ValueError as exc:
                raise ConfigError(f"LLMGW_WEBHOOK_SECRET {exc}") from None
        try:
            backend_secrets = parse_backend_secrets(env.get("LLMGW_BACKEND_WEBHOOK_SECRETS", ""))
        except ValueError as exc:
            raise ConfigError(f"LLMGW_BACKEND_WEBHOOK_SECRETS {exc}") from None
        if any(s in webhook_secrets for group in backend_secrets.values() for s in group):
            # The platform secret settles anything; a backend must not hold it.
            raise ConfigError("LLMGW_BACKEND_WEBHOOK_SECRETS must differ from LLMGW_WEBHOOK_SECRET")
        edge_secrets = _edge_service_secrets(env, webhook_secrets, backend_secrets)
        encryption_keys = tuple(
            Secret(k.strip()) for k in env.get("LLMGW_ENCRYPTION_KEY", "").split(",") if k.strip()
        )
        for key in encryption_keys:
            try:
                Fernet(key.reveal())
            except (ValueError, TypeError):
                raise ConfigError(
                    "LLMGW_ENCRYPTION_KEY must be Fernet keys (32 url-safe base64 bytes), "
                    "comma-separated, newest first"
                ) from None
        route_keys = tuple(
            Secret(k.strip()) for k in env.get("LLMGW_ROUTE_KEY", "").split(",") if k.strip()
        )
        for key in route_keys:
            try:
                Fernet(key.reveal())
            except (ValueError, TypeError):
                raise ConfigError(
                    "LLMGW_ROUTE_KEY must be Fernet keys derived from LLMGW_ENCRYPTION_KEY "
                    "(`llm-gateway admin route-key` or deploy/gen-env.sh prints them)"
                ) from None
        try:
            catalog = load_catalog(env.get("LLMGW_MODELS_FILE") or None)
        except CatalogError as exc:
            raise ConfigError(f"LLMGW_MODELS_FILE: {exc}") from None
        redis_url = env.get("LLMGW_REDIS_URL") or None
        # `redis+cluster://` / `rediss+cluster://`: a Redis Cluster (shared/store_redis.py).
        schemes = ("redis", "rediss", "unix", "redis+cluster", "rediss+cluster")
        if redis_url and urlparse(redis_url).scheme not in schemes:
            raise ConfigError(f"LLMGW_REDIS_URL must be a redis:// URL, got {redis_url!r}")
        database_url = env.get("LLMGW_DATABASE_URL") or DEFAULT_DATABASE_URL
        if not database_url.startswith(("sqlite", "postgresql")):
            raise ConfigError("LLMGW_DATABASE_URL must be a sqlite:// or postgresql:// URL")
        admin_token = env.get("LLMGW_ADMIN_TOKEN") or None
        if admin_token is not None and len(admin_token) < 16:
            raise ConfigError("LLMGW_ADMIN_TOKEN must be at least 16 characters")
        auth_jwt_secret = env.get("LLMGW_AUTH_JWT_SECRET") or None
        if auth_jwt_secret is not None and len(auth_jwt_secret.encode("utf-8")) < 32:
            # RFC 7518 §3.2: an HS256 key must have at least 256 bits.
            raise ConfigError("LLMGW_AUTH_JWT_SECRET must be at least 32 bytes (HS256)")
        auth_jwks_url = (
            _url(env, "LLMGW_AUTH_JWKS_URL", "") if env.get("LLMGW_AUTH_JWKS_URL") else None
        )
        if auth_jwt_secret is not None or auth_jwks_url is not None:
            # Without both, a token the same provider minted for another service (or
            # another provider sharing the key) would sign users in here.
            for name in ("LLMGW_AUTH_JWT_AUDIENCE", "LLMGW_AUTH_JWT_ISSUER"):
                if not env.get(name):
                    raise ConfigError(
                        f"{name} is required when LLMGW_AUTH_JWT_SECRET or "
                        "LLMGW_AUTH_JWKS_URL is set"
                    )
        settings = cls(
            init_rate_per_user=_int(env, "LLMGW_INIT_RATE_PER_USER", 120, 1, 1_000_000),
            init_rate_per_company=_int(env, "LLMGW_INIT_RATE_PER_COMPANY", 1200, 1, 10_000_000),
            tpm_per_user=_int(env, "LLMGW_TPM_PER_USER", 0, 0, 10**12),
            tpm_per_company=_int(env, "LLMGW_TPM_PER_COMPANY", 0, 0, 10**12),
            company_webhooks_allow_private=_flag(
                env, "LLMGW_COMPANY_WEBHOOKS_ALLOW_PRIVATE", False
            ),
            login_failures_per_15min=_int(env, "LLMGW_LOGIN_FAILURES_PER_15MIN", 10, 1, 1_000_000),
            max_pending_inits_per_user=_int(
                env, "LLMGW_MAX_PENDING_INITS_PER_USER", 20, 1, 1_000_000
            ),
            max_session_messages=_int(env, "LLMGW_MAX_SESSION_MESSAGES", 1000, 2, 1_000_000),
            max_session_bytes=_int(env, "LLMGW_MAX_SESSION_BYTES", 1024 * 1024, 1024, 2**40),
            max_request_bytes=_int(env, "LLMGW_MAX_REQUEST_BYTES", 2 * 1024 * 1024, 1024, 2**31),
            auth_jwt_secret=Secret(auth_jwt_secret) if auth_jwt_secret else None,
            auth_jwks_url=auth_jwks_url,
            auth_jwt_audience=env.get("LLMGW_AUTH_JWT_AUDIENCE") or None,
            auth_jwt_issuer=env.get("LLMGW_AUTH_JWT_ISSUER") or None,
            database_url=database_url,
            database_pgbouncer=_flag(env, "LLMGW_DATABASE_PGBOUNCER", False),
            redis_url=redis_url,
            redis_prefix=env.get("LLMGW_REDIS_PREFIX") or "llmgw:",
            control_plane_url=_url(env, "LLMGW_CONTROL_PLANE_URL", "http://127.0.0.1:8000"),
            edge_public_url=_url(env, "LLMGW_EDGE_PUBLIC_URL", "http://127.0.0.1:8001"),
            webhook_secret=Secret(webhook_secrets[0]),
            webhook_secrets=tuple(Secret(s) for s in webhook_secrets),
            admin_token=Secret(admin_token) if admin_token else None,
            token_ttl_seconds=_int(env, "LLMGW_TOKEN_TTL_SECONDS", 120, 1, 300),
            catalog=catalog,
            cors_origins=tuple(
                o.strip() for o in env.get("LLMGW_CORS_ORIGINS", "").split(",") if o.strip()
            ),
            encryption_keys=encryption_keys,
            route_keys=route_keys,
            auto_migrate=_flag(env, "LLMGW_AUTO_MIGRATE", dev),
            store_transcripts=_flag(env, "LLMGW_STORE_TRANSCRIPTS", True),
            upstream_connect_timeout=_float(env, "LLMGW_UPSTREAM_CONNECT_TIMEOUT", 5.0, 0.1, 60),
            upstream_read_timeout=_float(env, "LLMGW_UPSTREAM_READ_TIMEOUT", 120.0, 1, 3600),
            edge_max_connections_per_origin=_int(
                env, "LLMGW_EDGE_MAX_CONNECTIONS_PER_ORIGIN", 1000, 1, 1_000_000
            ),
            hold_grace_seconds=_int(env, "LLMGW_HOLD_GRACE_SECONDS", 1200, 1, 86400),
            webhook_retry_base_seconds=_float(
                env, "LLMGW_WEBHOOK_RETRY_BASE_SECONDS", 0.5, 0.01, 60
            ),
            webhook_retry_cap_seconds=_float(
                env, "LLMGW_WEBHOOK_RETRY_CAP_SECONDS", 300, 0.1, 86400
            ),
            spool_dir=env.get("LLMGW_SPOOL_DIR") or "var/spool",
            first_token_timeout=_float(env, "LLMGW_FIRST_TOKEN_TIMEOUT_SECONDS", 60, 0.1, 3600),
            idle_timeout=_float(env, "LLMGW_IDLE_TIMEOUT_SECONDS", 60, 0.1, 3600),
            upstream_retries=_int(env, "LLMGW_UPSTREAM_RETRIES", 2, 0, 10),
            ping_interval=_float(env, "LLMGW_PING_INTERVAL_SECONDS", 15, 0.05, 300),
            slow_client_timeout=_float(env, "LLMGW_SLOW_CLIENT_TIMEOUT_SECONDS", 10, 0.1, 600),
            max_streams_per_user=_int(env, "LLMGW_MAX_STREAMS_PER_USER", 20, 1, 1_000_000),
            max_streams_per_company=_int(env, "LLMGW_MAX_STREAMS_PER_COMPANY", 200, 1, 1_000_000),
            max_stream_seconds=_int(env, "LLMGW_MAX_STREAM_SECONDS", 900, 10, 86400),
            resume_grace_seconds=_float(env, "LLMGW_RESUME_GRACE_SECONDS", 10, 0, 600),
            drain_seconds=_float(env, "LLMGW_DRAIN_SECONDS", 20, 0, 3600),
            header_timeout_seconds=_float(env, "LLMGW_HEADER_TIMEOUT_SECONDS", 10, 0.1, 300),
            max_header_bytes=_int(env, "LLMGW_MAX_HEADER_BYTES", 64 * 1024, 1024, 1024 * 1024),
            max_connections=_int(env, "LLMGW_MAX_CONNECTIONS", 1000, 1, 1_000_000),
            breaker_failures=_int(env, "LLMGW_BREAKER_FAILURES", 5, 1, 1000),
            breaker_reset_seconds=_float(env, "LLMGW_BREAKER_RESET_SECONDS", 30, 0.1, 3600),
            sweep_interval_seconds=_float(env, "LLMGW_SWEEP_INTERVAL_SECONDS", 5.0, 0.1, 3600),
            serve_demo=_flag(env, "LLMGW_SERVE_DEMO", dev),
            serve_console=_flag(env, "LLMGW_SERVE_CONSOLE", True),
            dev=dev,
            provider_keys={
                name: Secret(env[var])
                for name, provider in catalog.providers.items()
                if (var := next((v for v in provider.key_envs() if env.get(v)), None))
            },
            provider_key_pools={
                name: pool
                for name, provider in catalog.providers.items()
                if (pool := tuple(Secret(env[v]) for v in provider.key_envs() if env.get(v)))
            },
            backend_webhook_secrets={
                provider: tuple(Secret(s) for s in group)
                for provider, group in backend_secrets.items()
            },
            edge_service_secrets=tuple(Secret(s) for s in edge_secrets),
            service_tokens={
                name: Secret(env[var])
                for name, provider in catalog.providers.items()
                if (var := provider.service_token_env) and env.get(var)
            },
        )
        _check_hold_outlives_streams(settings)
        return settings

    def route_cipher_keys(self) -> list[str]:
        """The `upr` sub-keys, newest first: LLMGW_ROUTE_KEY as given, else derived from
        the ring. The edge needs one of the two; the control plane seals with the ring."""
        derived = [route_key(k.reveal()) for k in self.encryption_keys]
        if self.route_keys:
            given = [k.reveal() for k in self.route_keys]
            if derived and derived != given:
                # Both set and different: companies' own routes would fail to open.
                raise ConfigError(
                    "LLMGW_ROUTE_KEY does not match LLMGW_ENCRYPTION_KEY: set one of them, "
                    "or `llm-gateway admin route-key` for the ring"
                )
            return given
        if derived:
            return derived
        raise ConfigError(
            "LLMGW_ROUTE_KEY (or LLMGW_ENCRYPTION_KEY) is required: the edge opens the "
            "sealed upr claim with it; `llm-gateway admin route-key` prints it"
        )

    def require_encryption_key(self) -> tuple[Secret, ...]:
        """The control plane cannot start without a key outside `dev` (DESIGN §9)."""
        if not self.encryption_keys:
            raise ConfigError(
                "LLMGW_ENCRYPTION_KEY is required (a Fernet key) outside dev; generate one with: "
                'python -c "from cryptography.fernet import Fernet;'
                'print(Fernet.generate_key().decode())"'
            )
        return self.encryption_keys


def _edge_service_secrets(
    env: Mapping[str, str], webhook_secrets: list[str], backend_secrets: Mapping[str, list[str]]
) -> list[str]:
    """LLMGW_EDGE_SERVICE_SECRET: as strong as the webhook secret, and its own: a
    secret that also signs usage webhooks (or a backend's) would let whoever holds
    that one start streams for any API key's hash."""
    secrets_ = [s.strip() for s in env.get("LLMGW_EDGE_SERVICE_SECRET", "").split(",") if s.strip()]
    for secret in secrets_:
        try:
            validate_secret(secret)
        except ValueError as exc:
            raise ConfigError(f"LLMGW_EDGE_SERVICE_SECRET {exc}") from None
    others = {*webhook_secrets, *(s for group in backend_secrets.values() for s in group)}
    if others & set(secrets_):
        raise ConfigError(
            "LLMGW_EDGE_SERVICE_SECRET must differ from LLMGW_WEBHOOK_SECRET and "
            "LLMGW_BACKEND_WEBHOOK_SECRETS"
        )
    return secrets_


def _check_hold_outlives_streams(settings: Settings) -> None:
    """A hold's deadline is the token's expiry + LLMGW_HOLD_GRACE_SECONDS (issue 11.4).
    A stream may start at expiry (plus the verifier's leeway), run
    LLMGW_MAX_STREAM_SECONDS, then keep its resume grace; its report needs a moment
    more. A shorter grace lets the sweeper settle a live stream as ``failed`` and
    turns its real report into a duplicate, so such settings never start."""
    needed = (
        LEEWAY_SECONDS
        + settings.max_stream_seconds
        + math.ceil(settings.resume_grace_seconds)
        + REPORT_MARGIN_SECONDS
    )
    if settings.hold_grace_seconds < needed:
        raise ConfigError(
            f"LLMGW_HOLD_GRACE_SECONDS must be at least {needed} (LLMGW_MAX_STREAM_SECONDS "
            f"+ LLMGW_RESUME_GRACE_SECONDS + {LEEWAY_SECONDS + REPORT_MARGIN_SECONDS}) so a "
            f"hold outlives its longest stream, got {settings.hold_grace_seconds}"
        )
