"""The edge's settings: `EdgeSettings.from_env` validates, at its start, the
variables it reads and only those (the common ones in `shared.settings`); the
database, the admin token and the control plane's limits are not among them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from shared.route_claim import route_key
from shared.settings import (
    CommonSettings,
    ConfigError,
    Secret,
    common_of,
    env_base_url,
    env_float,
    env_int,
    fernet_keys,
    read_common,
)
from shared.store_redis import ReplicaAcks, cluster_url
from stream_edge.origin_share import DEFAULT_PERCENT


def _bare_key(env: Mapping[str, str], name: str) -> Secret:
    """A backend key variable the catalog names (`api_key_env`, `api_key_envs`,
    `service_token_env`), refused when it carries whitespace, a control character or
    surrounding quotes: a secret file's newline made every stream's header illegal
    (httpx refuses it), a .env line's quotes reached the vendor as the key (401), so
    the edge started and then failed every stream of the provider. One line naming the
    variable, never the value."""
    value = env[name]
    quoted = len(value) > 1 and value[0] == value[-1] and value[0] in "\"'"
    if quoted or any(c.isspace() or not c.isprintable() for c in value):
        raise ConfigError(
            f"{name} has whitespace, a newline or quotes in it (a .env line's quotes, a "
            "secret file's trailing newline); set the bare key"
        )
    return Secret(value)


def _key_pool(env: Mapping[str, str], names: tuple[str, ...]) -> tuple[Secret, ...]:
    """A provider's platform keys, in the catalog's order, each once: two variables
    holding one key made a pool of two, so each 429 or 401 of that key cost a second
    vendor call on it, and a lone key lost its short Retry-After wait."""
    pool: dict[Secret, str] = {}
    for name in names:
        if not env.get(name):
            continue
        key = _bare_key(env, name)
        if key in pool:
            raise ConfigError(
                f"{name} holds the same key as {pool[key]}: give each variable of a "
                "provider's pool its own key, or drop one from api_key_envs"
            )
        pool[key] = name
    return tuple(pool)


@dataclass(frozen=True, kw_only=True)
class EdgeSettings(CommonSettings):
    control_plane_url: str  # its JWKS, usage webhooks and key callers' calls
    # The alternative to the ring: only the derived `upr` sub-keys (route_claim).
    route_keys: tuple[Secret, ...]
    upstream_connect_timeout: float
    upstream_read_timeout: float
    # Connections open at once to one backend origin (busy or idle); a stream finding
    # them all busy waits up to the connect timeout. The default matches
    # LLMGW_MAX_CONNECTIONS, so a full edge is never held back by it.
    max_connections_per_origin: int
    # The most of those one company's streams hold at once (`stream_edge.origin_share`).
    company_origin_share_percent: int
    first_token_timeout: float
    idle_timeout: float
    upstream_retries: int
    ping_interval: float
    slow_client_timeout: float
    max_streams_per_user: int
    max_streams_per_company: int
    breaker_failures: int
    breaker_reset_seconds: float
    webhook_retry_base_seconds: float
    webhook_retry_cap_seconds: float
    webhook_linger_seconds: float  # a report waits this long to be posted with others
    spool_dir: str  # usage reports the store would not take wait here
    # Every platform key of a provider (`api_key_env`, then `api_key_envs`), in order:
    # streams spread across them (`stream_edge.key_pool`).
    provider_key_pools: Mapping[str, tuple[Secret, ...]] = field(default_factory=dict)
    service_tokens: Mapping[str, Secret] = field(default_factory=dict)
    # A stream starts once this many Redis replicas have its admission (0: once the
    # primary has it); see docs/operations.md, "Redis failover and single use".
    redis_min_replica_acks: int = 0
    redis_replica_ack_timeout: float = 0.5

    @classmethod
    def from_env(cls, env: Mapping[str, str], *, dev: bool = False) -> EdgeSettings:
        common = read_common(env, dev=dev)
        route_keys = fernet_keys(
            env,
            "LLMGW_ROUTE_KEY",
            "Fernet keys derived from LLMGW_ENCRYPTION_KEY "
            "(`llm-gateway admin route-key` or deploy/gen-env.sh prints them)",
        )
        providers = common.catalog.providers
        min_replica_acks = env_int(env, "LLMGW_REDIS_MIN_REPLICA_ACKS", 0, 0, 100)
        if min_replica_acks and common.redis_url is None:
            raise ConfigError(
                "LLMGW_REDIS_MIN_REPLICA_ACKS needs LLMGW_REDIS_URL: the in-memory store "
                "has no replicas"
            )
        if min_replica_acks and cluster_url(common.redis_url or "") is not None:
            raise ConfigError(
                "LLMGW_REDIS_MIN_REPLICA_ACKS is for a single Redis with replicas, not a "
                "Redis Cluster (redis+cluster://)"
            )
        return cls(
            **common_of(common),
            control_plane_url=env_base_url(env, "LLMGW_CONTROL_PLANE_URL", "http://127.0.0.1:8000"),
            route_keys=route_keys,
            upstream_connect_timeout=env_float(env, "LLMGW_UPSTREAM_CONNECT_TIMEOUT", 5.0, 0.1, 60),
            upstream_read_timeout=env_float(env, "LLMGW_UPSTREAM_READ_TIMEOUT", 120.0, 1, 3600),
            # By default as many as the edge takes streams (LLMGW_MAX_CONNECTIONS): each
            # stream holds one backend connection, so a lower cap would quietly become
            # the edge's stream limit for that backend.
            max_connections_per_origin=env_int(
                env,
                "LLMGW_EDGE_MAX_CONNECTIONS_PER_ORIGIN",
                common.max_connections,
                1,
                1_000_000,
            ),
            company_origin_share_percent=env_int(
                env, "LLMGW_EDGE_COMPANY_ORIGIN_SHARE_PERCENT", DEFAULT_PERCENT, 1, 100
            ),
            first_token_timeout=env_float(env, "LLMGW_FIRST_TOKEN_TIMEOUT_SECONDS", 60, 0.1, 3600),
            idle_timeout=env_float(env, "LLMGW_IDLE_TIMEOUT_SECONDS", 60, 0.1, 3600),
            upstream_retries=env_int(env, "LLMGW_UPSTREAM_RETRIES", 2, 0, 10),
            ping_interval=env_float(env, "LLMGW_PING_INTERVAL_SECONDS", 15, 0.05, 300),
            slow_client_timeout=env_float(env, "LLMGW_SLOW_CLIENT_TIMEOUT_SECONDS", 10, 0.1, 600),
            max_streams_per_user=env_int(env, "LLMGW_MAX_STREAMS_PER_USER", 20, 1, 1_000_000),
            max_streams_per_company=env_int(
                env, "LLMGW_MAX_STREAMS_PER_COMPANY", 200, 1, 1_000_000
            ),
            breaker_failures=env_int(env, "LLMGW_BREAKER_FAILURES", 5, 1, 1000),
            breaker_reset_seconds=env_float(env, "LLMGW_BREAKER_RESET_SECONDS", 30, 0.1, 3600),
            webhook_retry_base_seconds=env_float(
                env, "LLMGW_WEBHOOK_RETRY_BASE_SECONDS", 0.5, 0.01, 60
            ),
            webhook_retry_cap_seconds=env_float(
                env, "LLMGW_WEBHOOK_RETRY_CAP_SECONDS", 300, 0.1, 86400
            ),
            webhook_linger_seconds=env_float(env, "LLMGW_WEBHOOK_LINGER_SECONDS", 0.05, 0, 5),
            spool_dir=env.get("LLMGW_SPOOL_DIR") or "var/spool",
            provider_key_pools={
                name: pool
                for name, provider in providers.items()
                if (pool := _key_pool(env, provider.key_envs()))
            },
            service_tokens={
                name: _bare_key(env, var)
                for name, provider in providers.items()
                if (var := provider.service_token_env) and env.get(var)
            },
            redis_min_replica_acks=min_replica_acks,
            redis_replica_ack_timeout=env_float(
                env, "LLMGW_REDIS_REPLICA_ACK_TIMEOUT_SECONDS", 0.5, 0.001, 10
            ),
        )

    def replica_acks(self) -> ReplicaAcks | None:
        """What the edge's store waits for after each admission; None: nothing."""
        if not self.redis_min_replica_acks:
            return None
        return ReplicaAcks(self.redis_min_replica_acks, self.redis_replica_ack_timeout)

    def route_cipher_keys(self) -> list[str]:
        """The `upr` sub-keys, newest first: LLMGW_ROUTE_KEY as given, else derived from
        the ring (the control plane seals with the ring)."""
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
