"""The control plane's settings: `ControlPlaneSettings.from_env` validates, at its
start, the variables it reads and only those (the common ones in `shared.settings`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from shared.settings import (
    EDGE_SECRET_CLASH,
    CommonSettings,
    ConfigError,
    Secret,
    common_of,
    env_base_url,
    env_flag,
    env_float,
    env_int,
    env_url,
    read_common,
    refuse_placeholder_password,
)
from shared.webhooks import check_random, is_placeholder, parse_backend_secrets

DEFAULT_DATABASE_URL = "sqlite:///var/llm-gateway.db"
# The admin token is any opaque bearer string, not a whsec key, so it is judged as
# text: 32 characters at least, 10 of them distinct (`secrets.token_urlsafe(32)` has
# ~31 of 43; `changeme` repeated has 7; 32 random hex digits fail 1 time in 10,000).
MIN_ADMIN_TOKEN_CHARS = 32
MIN_ADMIN_TOKEN_DISTINCT = 10
ADMIN_TOKEN_HINT = 'generate one with: python -c "import secrets; print(secrets.token_urlsafe(32))"'

# How long a request waits for the database (a thread, a connection, its
# statements) before 503 `database_unavailable`: init and settlement take
# milliseconds, a console aggregate has its own longer bound (`heavy_reads`).
DB_TIMEOUT_SECONDS = 10.0
# The company-wide pending-init cap defaults to this many users' worth of the per-user
# cap (2,000 with its default of 20): an operator or a harness that raised the per-user
# cap for many unstarted inits is not refused by a company cap it never set.
COMPANY_PENDING_USERS = 100
MAX_PENDING_PER_COMPANY = 10_000_000


def _wrapped(value: str) -> bool:
    """Whitespace around `value`, a control character in it, or matching quotes around
    it. Inner spaces pass: an existing app's HS256 key may be a passphrase."""
    quoted = len(value) > 1 and value[0] == value[-1] and value[0] in "\"'"
    return quoted or value != value.strip() or any(not c.isprintable() for c in value)


def _strong_secret(
    name: str, value: str, others: Mapping[str, set[str]], hint: str, *, as_bytes: bool
) -> str:
    """`value` of the secret variable `name`, refused (one line naming it, never
    printing it) when it is a placeholder, short, patterned, or the value of another
    secret (`others`: each variable's values; a whsec secret's key without its
    prefix is the same secret). `as_bytes`: judged as a key's bytes, else as text."""
    if _wrapped(value):
        # A secret file's newline, a .env line's quotes: the admin token could never
        # be sent (or matched no bearer sent), an HS256 key verified no token.
        raise ConfigError(
            f"{name} has whitespace, a newline or quotes around it (a secret file's "
            "trailing newline, a .env line's quotes); set the bare value"
        )
    if is_placeholder(value):
        raise ConfigError(f"{name} is the placeholder from the examples; {hint}")
    try:
        check_random(
            value.encode("utf-8") if as_bytes else value,
            minimum=MIN_ADMIN_TOKEN_CHARS,
            distinct=MIN_ADMIN_TOKEN_DISTINCT,
            # RFC 7518 §3.2: an HS256 key must have at least 256 bits.
            unit="bytes (HS256)" if as_bytes else "characters",
            hint=hint,
        )
    except ValueError as exc:
        raise ConfigError(f"{name} {exc}") from None
    for other, values in others.items():
        if value in values or f"whsec_{value}" in values:
            raise ConfigError(f"{name} must differ from {other}; {hint}")
    return value


def _admin_token(env: Mapping[str, str], others: Mapping[str, set[str]]) -> str | None:
    """LLMGW_ADMIN_TOKEN (unset: no platform admin by token), refused when weak or
    shared (`_strong_secret`): the edge, which faces the internet, holds the webhook
    and edge service secrets, and a backend holds its own; none of them may be the
    admin."""
    token = env.get("LLMGW_ADMIN_TOKEN") or None
    if token is None:
        return None
    return _strong_secret("LLMGW_ADMIN_TOKEN", token, others, ADMIN_TOKEN_HINT, as_bytes=False)


AUTH_JWT_SECRET_HINT = (
    "use the existing app's own random HS256 key (at least 32 bytes), or its JWKS "
    "(LLMGW_AUTH_JWKS_URL)"
)


def _auth_jwt_secret(env: Mapping[str, str], others: Mapping[str, set[str]]) -> str | None:
    """LLMGW_AUTH_JWT_SECRET (unset: no HS256 sign-in), refused when weak or shared
    (`_strong_secret`): whoever holds it signs in as an owner of any external
    company, so it gets the admin token's checks."""
    secret = env.get("LLMGW_AUTH_JWT_SECRET") or None
    if secret is None:
        return None
    return _strong_secret(
        "LLMGW_AUTH_JWT_SECRET", secret, others, AUTH_JWT_SECRET_HINT, as_bytes=True
    )


@dataclass(frozen=True, kw_only=True)
class ControlPlaneSettings(CommonSettings):
    database_url: str
    # LLMGW_DATABASE_PGBOUNCER: the database is reached through PgBouncer in
    # transaction mode, so no server-side prepared statements (control_plane/db.py).
    database_pgbouncer: bool
    # LLMGW_DATABASE_TIMEOUT_SECONDS: how long a request waits for the database
    # before 503 database_unavailable (control_plane/db_threads.py).
    database_timeout_seconds: float = DB_TIMEOUT_SECONDS
    edge_public_url: str  # stream URLs point there
    admin_token: Secret | None
    token_ttl_seconds: int
    auto_migrate: bool
    sweep_interval_seconds: float
    serve_demo: bool = False
    serve_console: bool = True  # the console at /console (DESIGN §11)
    # Backends posting their own usage webhooks: provider → its secrets, newest
    # first; each settles only reservations routed to its provider.
    backend_webhook_secrets: Mapping[str, tuple[Secret, ...]] = field(default_factory=dict)
    init_rate_per_user: int = 120  # per minute, DESIGN §9
    init_rate_per_company: int = 1200
    # Tokens per minute at init (DESIGN §11): the hold's token estimate counted at
    # init, corrected to actual usage at settlement; 0 = off (the default).
    tpm_per_user: int = 0
    tpm_per_company: int = 0
    # Companies' own webhooks (budget.threshold) may go to private, loopback or
    # link-local addresses only when this is on (off: no SSRF inward).
    company_webhooks_allow_private: bool = False
    # Admin writes (each an audit row) per minute of one company, its owners' together
    # (admin_writes); the platform admin is not counted.
    admin_write_rate_per_company: int = 600
    login_failures_per_15min: int = 10  # per email and per client address, DESIGN §11
    # Sign-ins of one account per minute (login_limits).
    login_rate_per_account: int = 300
    # Abuse limits (issue 12.6): unused stream grants per user and per company (an
    # owner creates members at will: the company's bound keeps one tenant from filling
    # the shared store with stashed requests), what one chat session may hold, and
    # the size of one init's stashed request.
    max_pending_inits_per_user: int = 20
    max_pending_inits_per_company: int = 2000
    max_session_messages: int = 1000
    max_session_bytes: int = 1024 * 1024
    max_request_bytes: int = 2 * 1024 * 1024
    # Trusting an existing app's user JWTs: HS256 with a shared secret and/or
    # RS256/ES256/EdDSA with keys from a JWKS URL; audience and issuer required.
    auth_jwt_secret: Secret | None = None
    auth_jwks_url: str | None = None
    auth_jwt_audience: str | None = None
    auth_jwt_issuer: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str], *, dev: bool = False) -> ControlPlaneSettings:
        common = read_common(env, dev=dev)
        try:
            backend_secrets = parse_backend_secrets(env.get("LLMGW_BACKEND_WEBHOOK_SECRETS", ""))
        except ValueError as exc:
            raise ConfigError(f"LLMGW_BACKEND_WEBHOOK_SECRETS {exc}") from None
        backend_all = {s for group in backend_secrets.values() for s in group}
        if backend_all & {s.reveal() for s in common.webhook_secrets}:
            # The platform secret settles anything; a backend must not hold it.
            raise ConfigError("LLMGW_BACKEND_WEBHOOK_SECRETS must differ from LLMGW_WEBHOOK_SECRET")
        if backend_all & {s.reveal() for s in common.edge_service_secrets}:
            raise ConfigError(EDGE_SECRET_CLASH)
        database_url = env.get("LLMGW_DATABASE_URL") or DEFAULT_DATABASE_URL
        if not database_url.startswith(("sqlite", "postgresql")):
            raise ConfigError("LLMGW_DATABASE_URL must be a sqlite:// or postgresql:// URL")
        refuse_placeholder_password("LLMGW_DATABASE_URL", database_url)
        other_secrets = {
            "LLMGW_WEBHOOK_SECRET": {s.reveal() for s in common.webhook_secrets},
            "LLMGW_EDGE_SERVICE_SECRET": {s.reveal() for s in common.edge_service_secrets},
            "LLMGW_BACKEND_WEBHOOK_SECRETS": backend_all,
            "LLMGW_ENCRYPTION_KEY": {k.reveal() for k in common.encryption_keys},
        }
        auth_jwt_secret = _auth_jwt_secret(env, other_secrets)
        admin_token = _admin_token(
            env,
            {
                **other_secrets,
                "LLMGW_AUTH_JWT_SECRET": {auth_jwt_secret} if auth_jwt_secret else set(),
            },
        )
        auth_jwks_url = (
            env_url(env, "LLMGW_AUTH_JWKS_URL", "") if env.get("LLMGW_AUTH_JWKS_URL") else None
        )
        audience = env.get("LLMGW_AUTH_JWT_AUDIENCE") or None
        issuer = env.get("LLMGW_AUTH_JWT_ISSUER") or None
        if auth_jwt_secret is not None or auth_jwks_url is not None:
            # Without both, a token the same provider minted for another service (or
            # another provider sharing the key) would sign users in here.
            for name, value in (
                ("LLMGW_AUTH_JWT_AUDIENCE", audience),
                ("LLMGW_AUTH_JWT_ISSUER", issuer),
            ):
                if value is None:
                    raise ConfigError(
                        f"{name} is required when LLMGW_AUTH_JWT_SECRET or "
                        "LLMGW_AUTH_JWKS_URL is set"
                    )
        pending_per_user = env_int(env, "LLMGW_MAX_PENDING_INITS_PER_USER", 20, 1, 1_000_000)
        return cls(
            **common_of(common),
            database_url=database_url,
            database_pgbouncer=env_flag(env, "LLMGW_DATABASE_PGBOUNCER", False),
            database_timeout_seconds=env_float(
                env, "LLMGW_DATABASE_TIMEOUT_SECONDS", DB_TIMEOUT_SECONDS, 0.1, 3600
            ),
            edge_public_url=env_base_url(env, "LLMGW_EDGE_PUBLIC_URL", "http://127.0.0.1:8001"),
            admin_token=Secret(admin_token) if admin_token else None,
            token_ttl_seconds=env_int(env, "LLMGW_TOKEN_TTL_SECONDS", 120, 1, 300),
            auto_migrate=env_flag(env, "LLMGW_AUTO_MIGRATE", dev),
            sweep_interval_seconds=env_float(env, "LLMGW_SWEEP_INTERVAL_SECONDS", 5.0, 0.1, 3600),
            serve_demo=env_flag(env, "LLMGW_SERVE_DEMO", dev),
            serve_console=env_flag(env, "LLMGW_SERVE_CONSOLE", True),
            backend_webhook_secrets={
                provider: tuple(Secret(s) for s in group)
                for provider, group in backend_secrets.items()
            },
            init_rate_per_user=env_int(env, "LLMGW_INIT_RATE_PER_USER", 120, 1, 1_000_000),
            init_rate_per_company=env_int(env, "LLMGW_INIT_RATE_PER_COMPANY", 1200, 1, 10_000_000),
            tpm_per_user=env_int(env, "LLMGW_TPM_PER_USER", 0, 0, 10**12),
            tpm_per_company=env_int(env, "LLMGW_TPM_PER_COMPANY", 0, 0, 10**12),
            company_webhooks_allow_private=env_flag(
                env, "LLMGW_COMPANY_WEBHOOKS_ALLOW_PRIVATE", False
            ),
            admin_write_rate_per_company=env_int(
                env, "LLMGW_ADMIN_WRITE_RATE_PER_COMPANY", 600, 1, 1_000_000
            ),
            login_failures_per_15min=env_int(
                env, "LLMGW_LOGIN_FAILURES_PER_15MIN", 10, 1, 1_000_000
            ),
            login_rate_per_account=env_int(env, "LLMGW_LOGIN_RATE_PER_ACCOUNT", 300, 1, 1_000_000),
            max_pending_inits_per_user=pending_per_user,
            max_pending_inits_per_company=env_int(
                env,
                "LLMGW_MAX_PENDING_INITS_PER_COMPANY",
                min(COMPANY_PENDING_USERS * pending_per_user, MAX_PENDING_PER_COMPANY),
                1,
                MAX_PENDING_PER_COMPANY,
            ),
            max_session_messages=env_int(env, "LLMGW_MAX_SESSION_MESSAGES", 1000, 2, 1_000_000),
            max_session_bytes=env_int(env, "LLMGW_MAX_SESSION_BYTES", 1024 * 1024, 1024, 2**40),
            max_request_bytes=env_int(env, "LLMGW_MAX_REQUEST_BYTES", 2 * 1024 * 1024, 1024, 2**31),
            auth_jwt_secret=Secret(auth_jwt_secret) if auth_jwt_secret else None,
            auth_jwks_url=auth_jwks_url,
            auth_jwt_audience=audience,
            auth_jwt_issuer=issuer,
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
