"""Property-based API fuzzing with schemathesis against a real control plane: every
operation of ``/openapi.json``, with generated valid and invalid inputs, as the
platform admin and as a company owner. The only check: never a 5xx."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.test_control_plane import ADMIN_TOKEN, CP, start_cp

SCHEMATHESIS = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
pytestmark = pytest.mark.skipif(SCHEMATHESIS is None, reason="schemathesis is not installed")

# Per operation and phase; the operation count grows with the API, and the whole suite
# has a 10-minute budget.
MAX_EXAMPLES = "10"


@pytest.fixture
def cp(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[CP]:
    with start_cp(request, tmp_path, "sqlite") as handle:
        yield handle


def _run(
    cp: CP, token: str, tmp_path: Path, parameters: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    """Path parameters are pinned to real rows so the runs reach the handlers' logic
    instead of stopping at 404."""
    assert SCHEMATHESIS is not None
    config = tmp_path / "schemathesis.toml"
    lines = ["[parameters]", *(f'"path.{k}" = "{v}"' for k, v in parameters.items())]
    config.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return subprocess.run(
        [
            SCHEMATHESIS,
            "--config-file",
            str(config),
            "run",
            f"{cp.url}/openapi.json",
            "--checks",
            "not_a_server_error",
            "--header",
            f"Authorization: Bearer {token}",
            "--max-examples",
            MAX_EXAMPLES,
            "--seed",
            "20261123",
            "--phases",
            "examples,coverage,fuzzing",
            "--request-timeout",
            "10",
            "--exclude-path",
            "/metrics",
            "--report-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,  # its caches stay out of the repository
    )


def test_no_input_gets_a_server_error(cp: CP, tmp_path: Path) -> None:
    company_id = cp.company("100")
    owner = cp.user(company_id, role="owner", password=None)
    owner_key = cp.api_key(owner["id"])
    spare = cp.admin.post("/v1/admin/api-keys", json={"user_id": owner["id"]}).json()["data"]
    init = cp.client(owner_key).post("/v1/chat/init", json={"query": "hello"}).json()["data"]
    agent = {"name": "fuzz", "system_prompt": "Be brief."}
    cp.client(owner_key).post(f"/v1/admin/companies/{company_id}/agents", json=agent)
    base = f"/v1/admin/companies/{company_id}"
    team = cp.admin.post(f"{base}/teams", json={"name": "t", "user_ids": [owner["id"]]})
    budget = cp.admin.post(
        f"{base}/budgets",
        json={"scope": "user", "target_id": owner["id"], "amount": "50", "period": "day"},
    )
    parameters = {
        "budget_id": budget.json()["data"]["id"],
        "team_id": team.json()["data"]["id"],
        "company_id": company_id,
        "provider": "openai",
        "session_id": init["session_id"],
        "key_id": spare["id"],
        "name": "fuzz",
    }
    # The owner first: the admin run may well revoke the owner's company.
    for token in (owner_key, ADMIN_TOKEN):
        result = _run(cp, token, tmp_path, parameters)
        assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
