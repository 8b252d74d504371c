"""Secrets at start (DESIGN §11): placeholder and weak webhook secrets are refused with
a line naming the variable, and the sealed `upr` claim uses the encryption key ring,
rotatable like it. Pure: no servers."""

from __future__ import annotations

import base64
import io
import secrets
import subprocess
from pathlib import Path
from typing import Any

import pytest
from cryptography.fernet import Fernet

from control_plane.settings import ControlPlaneSettings
from shared.route_claim import (
    UpstreamRoute,
    route_ciphers,
    route_ciphers_from_keys,
    seal,
    unseal,
)
from shared.settings import ConfigError
from stream_edge.settings import EdgeSettings
from tests.conftest import new_webhook_secret

ROOT = Path(__file__).resolve().parent.parent


def example_value(path: Path, name: str) -> str:
    """`name`'s value in an example env file or manifest (`NAME=value` / `NAME: value`)."""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        for sep in ("=", ": "):
            if stripped.startswith(name + sep):
                return stripped[len(name) + len(sep) :].strip()
    raise AssertionError(f"{name} not in {path}")


def whsec(raw: bytes) -> str:
    return "whsec_" + base64.b64encode(raw).decode()


WEAK_SECRETS = {
    "env-example": example_value(ROOT / ".env.example", "LLMGW_WEBHOOK_SECRET"),
    "k8s-example": example_value(ROOT / "deploy/k8s/secret.example.yaml", "LLMGW_WEBHOOK_SECRET"),
    "whsec_AAAA": "whsec_AAAA",
    "all-A-33-bytes": "whsec_" + "QUFB" * 11,
    "same-byte-32": whsec(b"w" * 32),
    "pattern-32": whsec(b"abcd" * 8),
    "16-random-bytes": whsec(secrets.token_bytes(16)),
    "not-base64": "whsec_!!!!",
}


@pytest.mark.parametrize("value", WEAK_SECRETS.values(), ids=WEAK_SECRETS.keys())
def test_placeholder_and_weak_webhook_secrets_are_refused(value: str) -> None:
    for service in (ControlPlaneSettings, EdgeSettings):  # both read it
        with pytest.raises(ConfigError, match="LLMGW_WEBHOOK_SECRET") as caught:
            service.from_env({"LLMGW_WEBHOOK_SECRET": value})
        assert "generate one with" in str(caught.value) and "\n" not in str(caught.value)
        # A weak one among several (a rotation) is refused too.
        with pytest.raises(ConfigError, match="LLMGW_WEBHOOK_SECRET"):
            service.from_env({"LLMGW_WEBHOOK_SECRET": f"{new_webhook_secret()},{value}"})


def test_weak_placeholder_or_shared_admin_tokens_are_refused() -> None:
    """Review 4: only the length (16) was checked, so `changeme-changeme`, the k8s
    example's placeholder or a secret the internet-facing edge holds made a platform
    admin."""
    webhook, service, backend = new_webhook_secret(), new_webhook_secret(), new_webhook_secret()
    jwt_secret, ring = secrets.token_urlsafe(32), Fernet.generate_key().decode()
    env = {
        "LLMGW_WEBHOOK_SECRET": webhook,
        "LLMGW_EDGE_SERVICE_SECRET": service,
        "LLMGW_BACKEND_WEBHOOK_SECRETS": f"mock={backend}",
        "LLMGW_AUTH_JWT_SECRET": jwt_secret,
        "LLMGW_AUTH_JWT_AUDIENCE": "aud",
        "LLMGW_AUTH_JWT_ISSUER": "iss",
        "LLMGW_ENCRYPTION_KEY": ring,
    }
    weak = {
        "k8s-example": example_value(ROOT / "deploy/k8s/secret.example.yaml", "LLMGW_ADMIN_TOKEN"),
        "changeme": "changeme-changeme",
        "placeholder-inside": "REPLACE_ME-" + secrets.token_urlsafe(32),
        "placeholder-spelled-otherwise": secrets.token_urlsafe(24) + "Change-Me",
        "31-characters": secrets.token_urlsafe(32)[:31],
        "pattern": "ab12" * 10,
        "typed": "passwordpasswordpasswordpassword",
        "the-webhook-secret": webhook,
        "the-webhook-secrets-key": webhook.removeprefix("whsec_"),
        "the-edge-service-secret": service,
        "a-backend-secret": backend,
        "the-external-jwt-secret": jwt_secret,
        "the-encryption-key": ring,
    }
    for name, token in weak.items():
        with pytest.raises(ConfigError, match="LLMGW_ADMIN_TOKEN") as refused:
            ControlPlaneSettings.from_env({**env, "LLMGW_ADMIN_TOKEN": token})
        message = str(refused.value)
        assert "generate one with" in message and "\n" not in message, name
        assert token not in message, name  # the refusal never prints the secret
    # What we tell operators to use starts: gen-env.sh's output, a urlsafe or hex token.
    printed = subprocess.run(
        ["bash", str(ROOT / "deploy/gen-env.sh")], capture_output=True, text=True, check=True
    ).stdout
    generated = dict(line.split("=", 1) for line in printed.splitlines() if "=" in line)
    assert ControlPlaneSettings.from_env(generated).admin_token is not None
    for token in (secrets.token_urlsafe(32), secrets.token_hex(32)):
        settings = ControlPlaneSettings.from_env({**env, "LLMGW_ADMIN_TOKEN": token})
        assert settings.admin_token is not None and settings.admin_token.reveal() == token
    assert ControlPlaneSettings.from_env({**env, "LLMGW_ADMIN_TOKEN": ""}).admin_token is None


def test_weak_placeholder_or_shared_external_jwt_secrets_are_refused() -> None:
    """Review 6: only the length (32 bytes) was checked, so `changeme…`, 40 times the
    same letter, or the webhook secret the internet-facing edge holds started: whoever
    knew it signed an HS256 token and was an owner of any external company (checked
    against a running control plane: `/v1/me` answered role `owner`)."""
    webhook, service, backend = new_webhook_secret(), new_webhook_secret(), new_webhook_secret()
    ring = Fernet.generate_key().decode()
    env = {
        "LLMGW_WEBHOOK_SECRET": webhook,
        "LLMGW_EDGE_SERVICE_SECRET": service,
        "LLMGW_BACKEND_WEBHOOK_SECRETS": f"mock={backend}",
        "LLMGW_AUTH_JWT_AUDIENCE": "aud",
        "LLMGW_AUTH_JWT_ISSUER": "iss",
        "LLMGW_ENCRYPTION_KEY": ring,
    }
    weak = {
        "changeme": "changeme-changeme-changeme-changeme",
        "placeholder-inside": "REPLACE_ME-" + secrets.token_urlsafe(32),
        "31-bytes": secrets.token_urlsafe(32)[:31],
        "pattern": "a" * 40,
        "the-webhook-secret": webhook,
        "the-webhook-secrets-key": webhook.removeprefix("whsec_"),
        "the-edge-service-secret": service,
        "a-backend-secret": backend,
        "the-encryption-key": ring,
    }
    for name, secret in weak.items():
        with pytest.raises(ConfigError, match="LLMGW_AUTH_JWT_SECRET") as refused:
            ControlPlaneSettings.from_env({**env, "LLMGW_AUTH_JWT_SECRET": secret})
        message = str(refused.value)
        assert "\n" not in message and secret not in message, name
    for secret in (secrets.token_urlsafe(32), secrets.token_hex(32)):
        settings = ControlPlaneSettings.from_env({**env, "LLMGW_AUTH_JWT_SECRET": secret})
        assert settings.auth_jwt_secret is not None and settings.auth_jwt_secret.reveal() == secret


def test_generated_secrets_are_accepted() -> None:
    for raw in (secrets.token_bytes(24), secrets.token_bytes(32), secrets.token_bytes(64)):
        settings = EdgeSettings.from_env({"LLMGW_WEBHOOK_SECRET": whsec(raw)})
        assert settings.webhook_secret.reveal() == whsec(raw)


def test_dev_generates_strong_secrets(tmp_path: Path) -> None:
    from llm_gateway.dev import dev_secrets

    env = dev_secrets(tmp_path / "secrets.json")
    settings = ControlPlaneSettings.from_env(env, dev=True)
    assert len(settings.encryption_keys) == 1


ROUTE = UpstreamRoute("acme", "openai_chat", "https://api.example/v1", "m", "sk-company-key")


def test_the_route_claim_rotates_with_the_encryption_key_ring() -> None:
    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    sealed_old = seal(ROUTE, route_ciphers([old]))
    # During a rotation (new first) the edge opens routes sealed under either key...
    ring = route_ciphers([new, old])
    assert unseal(sealed_old, ring) == ROUTE
    sealed_new = seal(ROUTE, ring)
    # ...and seals with the newest: once the old key is dropped, new tokens still open.
    assert unseal(sealed_new, route_ciphers([new])) == ROUTE
    with pytest.raises(ValueError, match="not valid"):
        unseal(sealed_new, route_ciphers([old]))


def test_the_route_key_is_a_sub_key_not_the_ring_key_itself() -> None:
    """Its own purpose: a route token is not a ciphertext under the DB-secret key."""
    key = Fernet.generate_key().decode()
    sealed = seal(ROUTE, route_ciphers([key]))
    with pytest.raises(ValueError):
        unseal(sealed, Fernet(key))


# --- the admin CLI keeps secrets off the command line (12.9) -------------------------


def admin_args(*args: str) -> Any:
    from llm_gateway.cli import build_parser

    return build_parser().parse_args(["admin", *args])


def test_create_user_refuses_a_password_in_the_process_list(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        admin_args("create-user", "c1", "a@example.com", "--password", "hunter2-visible")
    assert "--password-env VAR or --password-stdin" in capsys.readouterr().err


def test_create_user_reads_the_password_from_a_variable_or_stdin(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from llm_gateway.admin import UsageError, _request

    monkeypatch.setenv("NEW_USER_PW", "from-the-env\n")
    _, path, body, _ = _request(
        admin_args("create-user", "c1", "a@x.io", "--password-env", "NEW_USER_PW")
    )
    assert path == "/v1/admin/users" and body is not None and body["password"] == "from-the-env"
    monkeypatch.setattr("sys.stdin", io.StringIO("from-stdin\nignored\n"))
    _, _, body, _ = _request(admin_args("create-user", "c1", "a@x.io", "--password-stdin"))
    assert body is not None and body["password"] == "from-stdin"
    _, _, body, _ = _request(admin_args("create-user", "c1", "a@x.io"))
    assert body is not None and "password" not in body  # API keys only
    monkeypatch.delenv("NEW_USER_PW")
    with pytest.raises(UsageError, match="NEW_USER_PW"):
        _request(admin_args("create-user", "c1", "a@x.io", "--password-env", "NEW_USER_PW"))
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    with pytest.raises(UsageError, match="no password on stdin"):
        _request(admin_args("create-user", "c1", "a@x.io", "--password-stdin"))


def test_route_key_prints_the_edges_key_for_the_ring(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from llm_gateway.admin import run_admin
    from shared.route_claim import route_key

    new, old = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    monkeypatch.setenv("LLMGW_ENCRYPTION_KEY", f"{new},{old}")
    monkeypatch.delenv("LLMGW_ADMIN_TOKEN", raising=False)  # offline: no token needed
    assert run_admin(admin_args("route-key")) == 0
    printed = capsys.readouterr().out.strip()
    assert printed == f"{route_key(new)},{route_key(old)}"
    # An edge with only these opens what the control plane seals with the ring.
    edge = EdgeSettings.from_env(
        {"LLMGW_WEBHOOK_SECRET": new_webhook_secret(), "LLMGW_ROUTE_KEY": printed}
    )
    assert edge.encryption_keys == ()
    sealed = seal(ROUTE, route_ciphers([new, old]))
    assert unseal(sealed, route_ciphers_from_keys(edge.route_cipher_keys())) == ROUTE
    monkeypatch.setenv("LLMGW_ENCRYPTION_KEY", "not-a-key")
    assert run_admin(admin_args("route-key")) == 2


def test_an_edge_without_any_route_key_refuses_to_start() -> None:
    settings = EdgeSettings.from_env({"LLMGW_WEBHOOK_SECRET": new_webhook_secret()})
    with pytest.raises(ConfigError, match="LLMGW_ROUTE_KEY"):
        settings.route_cipher_keys()
    with pytest.raises(ConfigError, match="LLMGW_ROUTE_KEY"):
        EdgeSettings.from_env(
            {"LLMGW_WEBHOOK_SECRET": new_webhook_secret(), "LLMGW_ROUTE_KEY": "x"}
        )
    both = EdgeSettings.from_env(
        {
            "LLMGW_WEBHOOK_SECRET": new_webhook_secret(),
            "LLMGW_ENCRYPTION_KEY": Fernet.generate_key().decode(),
            "LLMGW_ROUTE_KEY": Fernet.generate_key().decode(),  # not the ring's
        }
    )
    with pytest.raises(ConfigError, match="does not match LLMGW_ENCRYPTION_KEY"):
        both.route_cipher_keys()


# --- backends' own webhook secrets (12.10) -----------------------------------------


def test_backend_webhook_secrets_parse_per_provider_newest_first() -> None:
    a1, a2, b = new_webhook_secret(), new_webhook_secret(), new_webhook_secret()
    settings = ControlPlaneSettings.from_env(
        {
            "LLMGW_WEBHOOK_SECRET": new_webhook_secret(),
            "LLMGW_BACKEND_WEBHOOK_SECRETS": f" mock={a1}, mock={a2},openai={b} ",
        }
    )
    reveal = {p: [s.reveal() for s in g] for p, g in settings.backend_webhook_secrets.items()}
    assert reveal == {"mock": [a1, a2], "openai": [b]}
    assert a1 not in repr(settings)
    assert ControlPlaneSettings.from_env({"LLMGW_WEBHOOK_SECRET": b}).backend_webhook_secrets == {}


def test_bad_backend_webhook_secrets_are_refused() -> None:
    platform, strong = new_webhook_secret(), new_webhook_secret()
    for value in (
        "mock",  # no secret
        f"={strong}",  # no provider
        "mock=whsec_CHANGE_ME",
        "mock=whsec_AAAA",
        f"mock={strong},openai={strong}",  # one secret, two scopes
        f"mock={platform}",  # the platform secret settles anything
    ):
        with pytest.raises(ConfigError, match="LLMGW_BACKEND_WEBHOOK_SECRETS"):
            ControlPlaneSettings.from_env(
                {"LLMGW_WEBHOOK_SECRET": platform, "LLMGW_BACKEND_WEBHOOK_SECRETS": value}
            )


def test_verify_signer_names_who_signed() -> None:
    from datetime import UTC, datetime

    from shared.webhooks import BadSignature, sign, verify_signer

    platform, mock_new, mock_old = (new_webhook_secret() for _ in range(3))
    backends = {"mock": [mock_new, mock_old]}
    body = b'{"type": "stream.completed"}'
    for secret, signer in ((platform, None), (mock_new, "mock"), (mock_old, "mock")):
        assert verify_signer([platform], backends, body, sign(secret, "w1", body)) == signer
    # A sender mid-rotation sends both signatures, space-separated (Standard Webhooks).
    now = datetime.now(UTC)
    both = sign(mock_old, "w1", body, now)
    both["webhook-signature"] += " " + sign(mock_new, "w1", body, now)["webhook-signature"]
    assert verify_signer([platform], {"mock": [mock_new]}, body, both) == "mock"
    with pytest.raises(BadSignature):
        verify_signer([platform], backends, body, sign(new_webhook_secret(), "w1", body))


# --- passwords inside URLs ------------------------------------------------------------


def test_the_examples_placeholder_passwords_in_urls_are_refused() -> None:
    """deploy/k8s/secret.example.yaml sets the database and Redis URLs with the password
    REPLACE_ME: applied as it is, with the stores set to the password the URLs name
    (so that the services connect), both services started (measured) on a password
    anyone who reads this repository knows. Each is refused as the whsec placeholders
    are, one line naming the variable and never the URL."""
    strong = {
        "LLMGW_WEBHOOK_SECRET": new_webhook_secret(),
        "LLMGW_ENCRYPTION_KEY": Fernet.generate_key().decode(),
    }
    manifest = ROOT / "deploy/k8s/secret.example.yaml"
    urls = {
        name: example_value(manifest, name) for name in ("LLMGW_DATABASE_URL", "LLMGW_REDIS_URL")
    }
    cases = [
        (ControlPlaneSettings, "LLMGW_DATABASE_URL", urls["LLMGW_DATABASE_URL"]),
        (ControlPlaneSettings, "LLMGW_REDIS_URL", urls["LLMGW_REDIS_URL"]),
        (EdgeSettings, "LLMGW_REDIS_URL", urls["LLMGW_REDIS_URL"]),
        # However it is spelt, and as a libpq query parameter too.
        (ControlPlaneSettings, "LLMGW_DATABASE_URL", "postgresql://u:change-me@db/llmgw"),
        (ControlPlaneSettings, "LLMGW_DATABASE_URL", "postgresql://db/llmgw?password=CHANGE_ME"),
        (EdgeSettings, "LLMGW_REDIS_URL", "rediss://default:Replace-Me@redis:6380/0"),
    ]
    for service, name, url in cases:
        with pytest.raises(ConfigError, match=name) as refused:
            service.from_env({**strong, name: url})
        message = str(refused.value)
        assert "placeholder" in message and "\n" not in message, (name, url)
        assert url not in message and "://" not in message, message
    # A real password, or none (a local store on trust auth), starts as before.
    password = secrets.token_urlsafe(24)
    for service, name, url in (
        (ControlPlaneSettings, "LLMGW_DATABASE_URL", f"postgresql+psycopg://llmgw:{password}@db/x"),
        (ControlPlaneSettings, "LLMGW_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1/x"),
        (EdgeSettings, "LLMGW_REDIS_URL", f"redis://:{password}@redis:6379/0"),
        (EdgeSettings, "LLMGW_REDIS_URL", "redis://127.0.0.1:6379/0"),
    ):
        service.from_env({**strong, name: url})
