"""One settings object per service (issue 13.6): each validates at start the
variables it reads and only those; what both read is refused by both. Pure."""

from __future__ import annotations

import pytest
from cryptography.fernet import Fernet

from control_plane.settings import ControlPlaneSettings
from llm_gateway.dev import settings_from_env, with_mock_at
from shared.settings import ConfigError
from stream_edge.settings import EdgeSettings
from tests.conftest import new_webhook_secret

CONTROL_PLANE_ONLY = {
    "LLMGW_DATABASE_URL": "mysql://db",
    "LLMGW_ADMIN_TOKEN": "short",
    "LLMGW_TOKEN_TTL_SECONDS": "9999",
    "LLMGW_AUTH_JWT_SECRET": "short",
    "LLMGW_BACKEND_WEBHOOK_SECRETS": "mock",
    "LLMGW_INIT_RATE_PER_USER": "0",
    "LLMGW_SWEEP_INTERVAL_SECONDS": "never",
}
EDGE_ONLY = {
    "LLMGW_CONTROL_PLANE_URL": "ftp://cp",
    "LLMGW_ROUTE_KEY": "not-a-key",
    "LLMGW_UPSTREAM_RETRIES": "99",
    "LLMGW_PING_INTERVAL_SECONDS": "0",
    "LLMGW_SLOW_CLIENT_TIMEOUT_SECONDS": "-1",
    "LLMGW_BREAKER_FAILURES": "many",
    "LLMGW_REDIS_MIN_REPLICA_ACKS": "-1",
    "LLMGW_REDIS_REPLICA_ACK_TIMEOUT_SECONDS": "0",
}
BOTH = {
    "LLMGW_REDIS_URL": "memcached://h",
    "LLMGW_ENCRYPTION_KEY": "not-a-key",
    "LLMGW_EDGE_SERVICE_SECRET": "whsec_CHANGE_ME",
    "LLMGW_MAX_STREAM_SECONDS": "3600",  # longer than the default hold grace allows
    "LLMGW_MAX_CONNECTIONS": "0",
    "LLMGW_MODELS_FILE": "/nonexistent/models.yaml",
}


def _env(**extra: str) -> dict[str, str]:
    return {"LLMGW_WEBHOOK_SECRET": new_webhook_secret(), **extra}


@pytest.mark.parametrize(("name", "value"), CONTROL_PLANE_ONLY.items())
def test_the_edge_never_reads_the_control_planes_variables(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name) as refused:
        ControlPlaneSettings.from_env(_env(**{name: value}))
    assert "\n" not in str(refused.value)
    assert EdgeSettings.from_env(_env(**{name: value})).max_streams_per_user == 20


@pytest.mark.parametrize(("name", "value"), EDGE_ONLY.items())
def test_the_control_plane_never_reads_the_edges_variables(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name):
        EdgeSettings.from_env(_env(**{name: value}))
    assert ControlPlaneSettings.from_env(_env(**{name: value})).token_ttl_seconds == 120


@pytest.mark.parametrize(("name", "value"), BOTH.items())
def test_both_refuse_what_both_read(name: str, value: str) -> None:
    for service in (ControlPlaneSettings, EdgeSettings):
        with pytest.raises(ConfigError, match=name) as refused:
            service.from_env(_env(**{name: value}))
        assert "\n" not in str(refused.value)


def test_the_hold_grace_check_spans_both_services_knobs() -> None:
    # The edge's longest stream and resume grace against the control plane's hold:
    # each service reads all three, so neither starts with a hold shorter than a stream.
    fits = _env(LLMGW_MAX_STREAM_SECONDS="3600", LLMGW_HOLD_GRACE_SECONDS="3675")
    short = _env(LLMGW_MAX_STREAM_SECONDS="3600", LLMGW_HOLD_GRACE_SECONDS="3674")
    for service in (ControlPlaneSettings, EdgeSettings):
        assert service.from_env(fits).hold_grace_seconds == 3675
        with pytest.raises(ConfigError, match="LLMGW_HOLD_GRACE_SECONDS must be at least 3675"):
            service.from_env(short)


def test_one_environment_builds_both_for_one_process() -> None:
    env = _env(
        LLMGW_ENCRYPTION_KEY=Fernet.generate_key().decode(),
        LLMGW_EDGE_SERVICE_SECRET=new_webhook_secret(),
        LLMGW_DRAIN_SECONDS="7",
    )
    cp, edge = settings_from_env(env, dev=True, mock_url="http://127.0.0.1:9/v1")
    assert cp.auto_migrate and cp.serve_demo and cp.dev and edge.dev  # dev's defaults
    assert (cp.webhook_secret, cp.encryption_keys, cp.drain_seconds) == (
        edge.webhook_secret,
        edge.encryption_keys,
        edge.drain_seconds,
    )
    assert cp.edge_service_secrets == edge.edge_service_secrets != ()
    assert (
        cp.catalog
        == edge.catalog
        == with_mock_at(EdgeSettings.from_env(env).catalog, "http://127.0.0.1:9/v1")
    )
    assert cp.catalog.providers["mock"].base_url == "http://127.0.0.1:9/v1"
    assert edge.route_cipher_keys()  # derived from the ring both read
