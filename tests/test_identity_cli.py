"""`llm-gateway admin …` as a subprocess against a real control plane."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.test_control_plane import ADMIN_TOKEN, CP, data_of, error_of, start_cp


@pytest.fixture
def cp(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[CP]:
    with start_cp(request, tmp_path, "sqlite") as handle:
        yield handle


def admin(cp: CP, *args: str, stdin: str = "", env: dict[str, str] | None = None) -> Any:
    result = subprocess.run(
        [sys.executable, "-m", "llm_gateway.cli", "admin", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        env={
            **os.environ,
            "LLMGW_ADMIN_TOKEN": ADMIN_TOKEN,
            "LLMGW_CONTROL_PLANE_URL": cp.url,
            **(env or {}),
        },
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout) if result.stdout.strip() != "ok" else "ok"


def test_cli_provider_keys_adjustments_revocations_and_rotation(cp: CP) -> None:
    company = admin(cp, "create-company", "cli-co", "--credits", "5")
    user = admin(cp, "create-user", company["id"], "cli@example.com", "--role", "owner")
    key = admin(cp, "create-api-key", user["id"])
    client = cp.client(key["key"])

    secret = "sk-cli-provider-key-123"
    shown = admin(
        cp, "set-provider", company["id"], "openai", "--api-key-stdin", stdin=secret + "\n"
    )
    assert shown["has_key"] is True and secret not in json.dumps(shown)
    shown = admin(
        cp,
        "set-provider",
        company["id"],
        "openai",
        "--api-key-env",
        "MY_KEY",
        "--default-model",
        "gpt-4o-mini",
        env={"MY_KEY": "sk-from-env"},
    )
    assert shown["default_model"] == "gpt-4o-mini"
    assert admin(cp, "list-providers", company["id"])["items"][0]["provider"] == "openai"

    entry = admin(cp, "adjust", company["id"], "-1.5", "--reason", "refund reversal")
    assert entry["kind"] == "adjustment" and entry["amount"] == "-1.500000"
    assert data_of(client.get("/v1/me"))["credits"]["balance"] == "3.500000"

    listed = admin(cp, "list-api-keys", "--user-id", user["id"])["items"]
    assert [k["prefix"] for k in listed] == [key["prefix"]] and "key" not in listed[0]

    record = admin(cp, "revoke", "--user-id", user["id"], "--reason", "test")
    assert record["kind"] == "user"
    error_of(client.get("/v1/me"), 403, "revoked")
    assert admin(cp, "list-revocations")["items"][0]["id"] == record["id"]
    assert admin(cp, "unrevoke", record["id"]) == "ok"
    data_of(client.get("/v1/me"))

    first = admin(cp, "rotate-signing-key")
    assert first["kid"] and first["retired"] == []
    second = admin(cp, "rotate-signing-key", "--retire-others")
    assert first["kid"] in second["retired"]
    rotated = admin(cp, "rotate-encryption-key")
    assert rotated["provider_keys"] == 1 and rotated["failed"] == []


def test_cli_refuses_without_a_key_source(cp: CP) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "llm_gateway.cli",
            "admin",
            "set-provider",
            "c",
            "openai",
            "--api-key-env",
            "UNSET_VARIABLE_X",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "LLMGW_ADMIN_TOKEN": ADMIN_TOKEN, "LLMGW_CONTROL_PLANE_URL": cp.url},
    )
    assert result.returncode == 2 and "UNSET_VARIABLE_X is not set" in result.stderr
