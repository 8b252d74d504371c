"""A careless or confused operator (threat model, attacker 5): settings each service
accepted at start that later lost money, refused everyone, or failed at runtime.
Each is now refused at start with one line naming the variable and the fix, or
warned about where refusing would break a legitimate setup. Mostly pure (settings,
the catalog); `migrate` runs for real on a SQLite file."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import pathlib
import secrets
import uuid

import httpx
import orjson
import pytest
from cryptography.fernet import Fernet

from control_plane.migrate import head, migrated_line
from control_plane.settings import ControlPlaneSettings
from llm_gateway import apidoc, cli, outbox_cli
from llm_gateway.setting_names import warn_misconfiguration
from shared.catalog import CatalogError, parse_catalog
from shared.settings import ConfigError
from shared.store_factory import open_store
from stream_edge.app import create_app as edge_app
from stream_edge.settings import EdgeSettings
from tests.conftest import REDIS_URL, new_webhook_secret


def _env(**extra: str) -> dict[str, str]:
    return {"LLMGW_WEBHOOK_SECRET": new_webhook_secret(), **extra}


@pytest.mark.parametrize(
    "value",
    [
        "sk-live-abc123\n",  # a Kubernetes secret made from a file `echo` wrote
        "sk-live-abc123 ",  # a trailing space on a .env line
        '"sk-live-abc123"',  # a .env line's quotes, kept by `docker run --env-file`
        "'sk-live-abc123'",
        "sk-live abc123",  # two values pasted on one line
    ],
)
def test_a_platform_key_with_whitespace_or_quotes_is_refused_at_start(value: str) -> None:
    # Before: accepted; every stream on the provider then failed, the whitespace as an
    # illegal header value (httpx LocalProtocolError), the quotes as the vendor's 401.
    with pytest.raises(ConfigError, match="OPENAI_API_KEY") as refused:
        EdgeSettings.from_env(_env(OPENAI_API_KEY=value))
    message = str(refused.value)
    assert "\n" not in message and "abc123" not in message  # never the key itself
    assert "bare key" in message


def test_a_bare_platform_key_is_still_taken() -> None:
    settings = EdgeSettings.from_env(_env(OPENAI_API_KEY="sk-live-abc123"))
    assert [k.reveal() for k in settings.provider_key_pools["openai"]] == ["sk-live-abc123"]


def _catalog_doc(**model: object) -> dict[str, object]:
    spec = {
        "provider": "p",
        "context_length": 1000,
        "max_output_tokens": 100,
        "price": {"input_per_mtok": "1", "output_per_mtok": "2"},
        **model,
    }
    return {
        "default_model": "m",
        "providers": {"p": {"api_type": "openai_chat", "base_url": "http://vendor/v1"}},
        "models": {"m": spec},
    }


@pytest.mark.parametrize("value", [None, "", " ", " gpt-4o", "gpt-4o\n", 4, ["gpt-4o"]])
def test_a_models_file_whose_upstream_model_is_empty_or_not_a_name_is_refused(
    value: object,
) -> None:
    # Before: `upstream_model:` left empty in YAML became the model "None" (str(None)),
    # "" and " gpt-4o" went to the vendor as they were: every stream of the model a
    # vendor's 404, `4` the model "4"; the catalog loaded and the services started.
    with pytest.raises(CatalogError, match=r"models\.m\.upstream_model"):
        parse_catalog(_catalog_doc(upstream_model=value))


def test_an_absent_upstream_model_is_still_the_models_id() -> None:
    assert parse_catalog(_catalog_doc()).models["m"].upstream_model == "m"
    named = parse_catalog(_catalog_doc(upstream_model="org/gpt-4o:free"))
    assert named.models["m"].upstream_model == "org/gpt-4o:free"


def test_a_misspelled_setting_is_named_at_start_with_the_one_meant(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Before: `LLMGW_MAX_STREAMS_PER_USR=5` (and the same typo of any limit or
    # timeout) was ignored without a word; the edge ran with 20 streams per user.
    env = _env(LLMGW_MAX_STREAMS_PER_USR="5", LLMGW_TOKEN_TTL="30", LLMGW_SOMETHING_ELSE="x")
    settings = EdgeSettings.from_env(env)
    assert settings.max_streams_per_user == 20  # the typo still changes nothing
    with caplog.at_level(logging.WARNING, logger="llmgw.settings"):
        lines = warn_misconfiguration(env, settings.catalog)
    assert lines == [
        "LLMGW_MAX_STREAMS_PER_USR is set but no llm-gateway process reads it: it is "
        "ignored; did you mean LLMGW_MAX_STREAMS_PER_USER?",
        "LLMGW_SOMETHING_ELSE is set but no llm-gateway process reads it: it is ignored; "
        "remove it or fix its name",
        "LLMGW_TOKEN_TTL is set but no llm-gateway process reads it: it is ignored; "
        "did you mean LLMGW_TOKEN_TTL_SECONDS?",
    ]
    assert [r.getMessage() for r in caplog.records] == lines


def test_every_documented_setting_and_catalog_key_variable_starts_without_a_warning() -> None:
    # Any documented variable, for either service, in the one environment compose
    # shares; and a catalog may name its key variables `LLMGW_…` too.
    documented = {name: "x" for name, _, _, _ in apidoc.settings_documented()}
    assert len(documented) > 50
    catalog = parse_catalog(_catalog_doc())
    pooled = dataclasses.replace(catalog.providers["p"], api_key_envs=("LLMGW_OPENAI_KEY_2",))
    catalog = dataclasses.replace(catalog, providers={"p": pooled})
    env = {**documented, "LLMGW_OPENAI_KEY_2": "k", "LLMGW_TEST_PG_DSN": "x", "PATH": "/bin"}
    assert warn_misconfiguration(env, catalog) == []


DUPLICATE_PRICE = """\
default_model: m
providers:
  p: {api_type: openai_chat, base_url: "http://vendor/v1"}
models:
  m:
    provider: p
    context_length: 1000
    max_output_tokens: 100
    price: {input_per_mtok: "2.5", output_per_mtok: "10"}
  m:
    provider: p
    context_length: 1000
    max_output_tokens: 100
    price: {input_per_mtok: "0.01", output_per_mtok: "0.01"}
"""


@pytest.mark.parametrize(
    "text",
    [
        DUPLICATE_PRICE,
        DUPLICATE_PRICE.split("  m:\n")[0]
        + "  m:\n    provider: p\n    context_length: 1000\n    max_output_tokens: 100\n"
        + '    price: {input_per_mtok: "2.5", output_per_mtok: "10", output_per_mtok: "0.01"}\n',
    ],
)
def test_a_models_file_that_names_a_key_twice_is_refused(tmp_path: pathlib.Path, text: str) -> None:
    # Before: YAML kept the last of two entries with one name, without a word: a model
    # block pasted below its original (or a price's second `output_per_mtok`) set the
    # price in force, here 0.01 for 10 credits per million output tokens (1,000x less).
    path = tmp_path / "models.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match=r"LLMGW_MODELS_FILE.*twice") as refused:
        EdgeSettings.from_env(_env(LLMGW_MODELS_FILE=str(path)))
    assert "line" in str(refused.value)


@pytest.mark.parametrize(
    "value",
    [
        "https://app.example.com/",  # copied from the address bar
        '"https://app.example.com"',  # a .env line's quotes
        "app.example.com",  # no scheme
        "https://app.example.com/console",
        "https://App.example.com",
        "https://app.example.com,https://admin.example.com/",
    ],
)
def test_a_cors_origin_no_browser_sends_is_refused_at_start(value: str) -> None:
    # Before: accepted; a browser sends `Origin: https://app.example.com` (no path, no
    # slash) and CORS compares whole strings, so every preflight from the operator's
    # app was a 400 and its calls blocked (measured below with the exact origin).
    for service in (ControlPlaneSettings, EdgeSettings):
        with pytest.raises(ConfigError, match="LLMGW_CORS_ORIGINS") as refused:
            service.from_env(_env(LLMGW_CORS_ORIGINS=value))
        assert "scheme://host[:port]" in str(refused.value)


async def test_an_exact_origin_still_passes_a_browsers_preflight() -> None:
    env = _env(
        LLMGW_CORS_ORIGINS=" https://app.example.com , http://localhost:3000,*",
        LLMGW_ENCRYPTION_KEY=Fernet.generate_key().decode(),
    )
    settings = EdgeSettings.from_env(env)
    assert settings.cors_origins == ("https://app.example.com", "http://localhost:3000", "*")
    settings = dataclasses.replace(settings, cors_origins=("https://app.example.com",))
    transport = httpx.ASGITransport(app=edge_app(settings))
    async with httpx.AsyncClient(transport=transport, base_url="http://edge") as client:
        preflight = await client.options(
            "/v1/chat/stream",
            headers={
                "Origin": "https://app.example.com",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization",
            },
        )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "https://app.example.com"


@pytest.mark.parametrize("field", ["api_key_env", "service_token_env"])
@pytest.mark.parametrize("value", [7, "", "OPENAI_API_KEY ", "$OPENAI_API_KEY", ["OPENAI_API_KEY"]])
def test_a_provider_whose_key_variable_is_not_a_variable_name_is_refused(
    field: str, value: object
) -> None:
    # Before: the catalog took any value; the edge looked the key up under it
    # (`env.get(7)`, `"OPENAI_API_KEY "`), found nothing, and sent every stream of the
    # provider without the platform's key: the vendor's 401 for each, after a clean start.
    doc = _catalog_doc()
    doc["providers"] = {
        "p": {"api_type": "openai_chat", "base_url": "http://vendor/v1", field: value}
    }
    with pytest.raises(CatalogError, match=rf"providers\.p\.{field}"):
        parse_catalog(doc)


def test_a_provider_key_variable_name_is_still_taken() -> None:
    doc = _catalog_doc()
    doc["providers"] = {
        "p": {"api_type": "openai_chat", "base_url": "http://v/v1", "api_key_env": "OPENAI_API_KEY"}
    }
    assert parse_catalog(doc).providers["p"].api_key_env == "OPENAI_API_KEY"


def test_a_free_model_on_a_paid_platform_key_is_warned_about_at_start(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Before: a model priced 0 on a provider the platform pays (its `api_key_env`; a
    # price left at 0 while a block was drafted) started without a word, and every
    # tenant streamed it free on the platform's account (0 credits per token).
    doc = _catalog_doc(price={"input_per_mtok": 0, "output_per_mtok": "0.0"})
    doc["providers"] = {
        "p": {"api_type": "openai_chat", "base_url": "http://v/v1", "api_key_env": "OPENAI_API_KEY"}
    }
    with caplog.at_level(logging.WARNING, logger="llmgw.settings"):
        lines = warn_misconfiguration({}, parse_catalog(doc))
    assert lines == [
        "models.m costs 0 credits on provider p, which the platform's key "
        "(OPENAI_API_KEY) pays for: every tenant streams it free; give it a price in "
        "LLMGW_MODELS_FILE if that is not meant"
    ]
    assert [r.getMessage() for r in caplog.records] == lines


def test_a_free_model_nobody_pays_for_starts_without_a_warning() -> None:
    # The in-house backend (a service token, no vendor key) or the keyless mock may be
    # free by design; a model with any price is not free.
    for provider in (
        {"api_type": "openai_chat", "base_url": "http://v/v1", "service_token_env": "TOKEN"},
        {"api_type": "openai_chat", "base_url": "http://v/v1"},
    ):
        doc = _catalog_doc(price={"input_per_mtok": 0, "output_per_mtok": 0})
        doc["providers"] = {"p": provider}
        assert warn_misconfiguration({}, parse_catalog(doc)) == []
    doc = _catalog_doc(price={"input_per_mtok": 0, "output_per_mtok": "0.000001"})
    doc["providers"] = {
        "p": {"api_type": "openai_chat", "base_url": "http://v/v1", "api_key_env": "K"}
    }
    assert warn_misconfiguration({}, parse_catalog(doc)) == []


def _pooled_catalog_file(tmp_path: pathlib.Path) -> str:
    path = tmp_path / "models.yaml"
    path.write_text(
        "default_model: m\n"
        "providers:\n"
        "  p: {api_type: openai_chat, base_url: 'http://vendor/v1', api_key_env: KEY_A,\n"
        "      api_key_envs: [KEY_B, KEY_C]}\n"
        "models:\n"
        "  m: {provider: p, context_length: 1000, max_output_tokens: 100,\n"
        "      price: {input_per_mtok: 1, output_per_mtok: 2}}\n",
        encoding="utf-8",
    )
    return str(path)


def test_a_key_pool_holding_one_key_twice_is_refused_at_start(tmp_path: pathlib.Path) -> None:
    # Before: two variables of a pool holding one key made a pool of two: each 429 or
    # 401 of that key cost a second vendor call on the same key (measured: 2 calls
    # where one), and a lone key lost its short Retry-After wait (a 429 to the caller).
    models = _pooled_catalog_file(tmp_path)
    env = _env(LLMGW_MODELS_FILE=models, KEY_A="sk-one", KEY_B="sk-two", KEY_C="sk-one")
    with pytest.raises(ConfigError, match="KEY_C holds the same key as KEY_A") as refused:
        EdgeSettings.from_env(env)
    assert "sk-one" not in str(refused.value)
    distinct = _env(LLMGW_MODELS_FILE=models, KEY_A="sk-one", KEY_B="sk-two")
    pool = EdgeSettings.from_env(distinct).provider_key_pools["p"]
    assert [k.reveal() for k in pool] == ["sk-one", "sk-two"]


def test_migrate_names_the_database_it_migrated_and_a_misspelled_url(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Before: a migrate job whose secret spelled the variable `LLMGW_DATABSE_URL`
    # migrated a SQLite file inside its own container, printed nothing and exited 0;
    # the release's control planes then refused to start on the real, outdated schema.
    monkeypatch.chdir(tmp_path)
    for name in [n for n in os.environ if n.startswith("LLMGW_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("LLMGW_DATABSE_URL", "postgresql+psycopg://gw:s3cret@db.internal/llmgw")
    assert cli.main(["migrate"]) == 0
    err = capsys.readouterr().err
    assert "LLMGW_DATABSE_URL is set but no llm-gateway process reads it" in err
    assert "did you mean LLMGW_DATABASE_URL?" in err
    assert f"migrated sqlite:///var/llm-gateway.db to {head()}" in err
    assert "s3cret" not in err


def test_migrate_never_prints_the_databases_password(tmp_path: pathlib.Path) -> None:
    url = f"sqlite:///{tmp_path}/gw.db"
    assert migrated_line(url, "abc") == f"migrated {url} to abc"
    hidden = migrated_line("postgresql+psycopg://gw:s3cret@db.internal:5432/llmgw", "abc")
    assert hidden == "migrated postgresql+psycopg://gw:***@db.internal:5432/llmgw to abc"


async def test_the_outbox_command_on_another_prefix_says_where_the_reports_are(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Before: run from a shell without the services' LLMGW_REDIS_PREFIX, `outbox status`
    # printed {"pending": 0, "dead_letters": 0} and exited 0 while the edges' dead
    # letters sat under their prefix: the operator, told nothing was dead, replayed
    # nothing, and those reports' holds went to the sweeper instead.
    services = f"optest-{uuid.uuid4().hex[:8]}:"
    store = open_store(REDIS_URL, prefix=services)
    body = orjson.dumps({"type": "stream.completed", "data": {}}).decode()
    letter = orjson.dumps({"id": "usage_1", "body": body, "attempt": 4})
    try:
        await store.dead_letter_put("usage_1", letter)
        monkeypatch.setenv("LLMGW_REDIS_URL", REDIS_URL)
        monkeypatch.setenv("LLMGW_REDIS_PREFIX", f"optest-{uuid.uuid4().hex[:8]}:")
        parser = argparse.ArgumentParser()
        outbox_cli.add_outbox_parser(parser.add_subparsers(dest="command"))
        code = await asyncio.to_thread(
            outbox_cli.run_outbox, parser.parse_args(["outbox", "status"])
        )
        out, err = capsys.readouterr()
        assert code == 0 and json.loads(out) == {"pending": 0, "dead_letters": 0}
        assert f"an outbox under {services!r}" in err and "LLMGW_REDIS_PREFIX" in err
        # Under the services' own prefix: the count, and no warning.
        monkeypatch.setenv("LLMGW_REDIS_PREFIX", services)
        code = await asyncio.to_thread(
            outbox_cli.run_outbox, parser.parse_args(["outbox", "status"])
        )
        out, err = capsys.readouterr()
        assert json.loads(out) == {"pending": 0, "dead_letters": 1} and err == ""
    finally:
        await store.dead_letter_take("usage_1")
        await store.close()


@pytest.mark.parametrize("name", ["LLMGW_ADMIN_TOKEN", "LLMGW_AUTH_JWT_SECRET"])
@pytest.mark.parametrize("wrap", ["{}\n", " {}", '"{}"', "'{}'", "{}\r"])
def test_a_control_plane_secret_with_a_newline_or_quotes_around_it_is_refused(
    name: str, wrap: str
) -> None:
    # Before: accepted as given. The admin token a Kubernetes secret file left a newline
    # on can never be sent in a header (httpx refuses it) and one kept with its .env
    # quotes matches no bearer the operator sends: the platform admin locked out. An
    # external app's HS256 key with them verified none of that app's tokens: every
    # external user refused sign-in.
    value = secrets.token_urlsafe(40)
    env = _env(
        **{name: wrap.format(value)},
        LLMGW_AUTH_JWT_AUDIENCE="gateway",
        LLMGW_AUTH_JWT_ISSUER="https://app.example.com",
    )
    with pytest.raises(ConfigError, match=name) as refused:
        ControlPlaneSettings.from_env(env)
    assert value not in str(refused.value) and "bare value" in str(refused.value)
    env[name] = value  # the bare value starts
    settings = ControlPlaneSettings.from_env(env)
    taken = settings.admin_token if name == "LLMGW_ADMIN_TOKEN" else settings.auth_jwt_secret
    assert taken is not None and taken.reveal() == value


async def test_an_edge_waiting_for_more_replicas_than_its_redis_has_says_so_at_start(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Before: `LLMGW_REDIS_MIN_REPLICA_ACKS=1` against a Redis with no replica (a copied
    # setting, a replica not yet set up) started without a word; every admission then
    # waited for an acknowledgement that never came and every stream was refused 503.
    env = _env(
        LLMGW_REDIS_URL=REDIS_URL,
        LLMGW_REDIS_PREFIX=f"optest-{uuid.uuid4().hex[:8]}:",
        LLMGW_REDIS_MIN_REPLICA_ACKS="1",
        LLMGW_REDIS_REPLICA_ACK_TIMEOUT_SECONDS="0.05",
        LLMGW_ENCRYPTION_KEY=Fernet.generate_key().decode(),
    )
    settings = EdgeSettings.from_env(env)
    store = open_store(REDIS_URL, prefix=settings.redis_prefix)
    try:
        replicas = await store.connected_replicas()  # type: ignore[attr-defined]
    finally:
        await store.close()
    if replicas:
        pytest.skip("this test's Redis has replicas")
    with caplog.at_level(logging.WARNING, logger="llmgw.edge"):
        app = edge_app(settings)
        async with app.router.lifespan_context(app):
            pass
    warned = [
        r.getMessage() for r in caplog.records if "LLMGW_REDIS_MIN_REPLICA_ACKS" in r.getMessage()
    ]
    assert warned == [
        "LLMGW_REDIS_MIN_REPLICA_ACKS is 1 but the Redis has 0 replicas connected: every "
        "stream is refused 503 until that many replicas follow it; lower the setting or "
        "add replicas"
    ]


@pytest.mark.parametrize(
    ("service", "name"),
    [(ControlPlaneSettings, "LLMGW_EDGE_PUBLIC_URL"), (EdgeSettings, "LLMGW_CONTROL_PLANE_URL")],
)
@pytest.mark.parametrize("tail", ["/v1", "/v1/", "/V1", "/api/v1", "?x=1", "#top"])
def test_a_base_url_given_with_the_api_path_is_refused(
    service: type[ControlPlaneSettings] | type[EdgeSettings], name: str, tail: str
) -> None:
    # Before: a base URL copied in the vendors' style (`https://stream.example.com/v1`)
    # was accepted; the services add `/v1/...` themselves, so every init answered a
    # `stream_url` of `/v1/v1/stream` (404 for every client), and an edge fetched its
    # JWKS at `/v1/.well-known/jwks.json` (every token refused) and posted its usage
    # webhooks to `/v1/v1/webhooks/usage`, a 404 the outbox takes as permanent: every
    # report a dead letter. A query or fragment broke the URLs the same way.
    with pytest.raises(ConfigError, match=name) as refused:
        service.from_env(_env(**{name: f"https://gw.example.com{tail}"}))
    assert "without /v1" in str(refused.value)


def test_a_base_url_behind_a_path_prefix_is_still_taken() -> None:
    # A proxy routing a path to the service is a legitimate base (`…/edge`).
    cp = ControlPlaneSettings.from_env(_env(LLMGW_EDGE_PUBLIC_URL="https://gw.example.com/edge/"))
    assert cp.edge_public_url == "https://gw.example.com/edge"
    edge = EdgeSettings.from_env(_env(LLMGW_CONTROL_PLANE_URL="http://cp:8000"))
    assert edge.control_plane_url == "http://cp:8000"
