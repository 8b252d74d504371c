"""The three services as separate `llm-gateway` processes on PostgreSQL + Redis.

This is how operators run it: each command is started from the CLI exactly as
documented, and a stream goes through the official `openai` client end to end.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REDIS_URL
from tests.harness import free_port
from tests.stack import Client, base_env, micro, wait_healthy

CLI = [sys.executable, "-m", "llm_gateway.cli"]
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def processes(pg_database_url: str, redis_prefix: str, tmp_path: Path) -> Iterator[Client]:
    ports = {name: free_port() for name in ("mock", "cp", "edge")}
    urls = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
    models = tmp_path / "models.yaml"
    packaged = (ROOT / "shared" / "models.yaml").read_text()
    models.write_text(packaged.replace("http://127.0.0.1:8002/v1", f"{urls['mock']}/v1"))
    env = {
        **os.environ,
        **base_env(pg_database_url, REDIS_URL, redis_prefix),
        "LLMGW_AUTO_MIGRATE": "0",
        "LLMGW_CONTROL_PLANE_URL": urls["cp"],
        "LLMGW_EDGE_PUBLIC_URL": urls["edge"],
        "LLMGW_MODELS_FILE": str(models),
        "LLMGW_LOG_LEVEL": "WARNING",
    }
    migrate = subprocess.run([*CLI, "migrate"], env=env, cwd=ROOT, capture_output=True, timeout=60)
    assert migrate.returncode == 0, migrate.stderr.decode()
    procs = {}
    try:
        for name, command in (
            ("mock", "mock-llm"),
            ("cp", "control-plane"),
            ("edge", "stream-edge"),
        ):
            procs[name] = subprocess.Popen(
                [*CLI, command, "--port", str(ports[name])], env=env, cwd=ROOT
            )
        for name, proc in procs.items():
            wait_healthy(urls[name], proc)
        client = Client(urls["cp"], urls["edge"], urls["mock"], env["LLMGW_WEBHOOK_SECRET"])
        yield client
        client.close()
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()


def test_separate_processes_stream_and_settle(processes: Client) -> None:
    c = processes
    token = c.new_user(c.new_company("3"))
    before = c.credits(token)
    messages = [{"role": "user", "content": "Across processes [[mock tokens=25]]"}]
    grant = c.init_ok(token, {"model": "mock-fast", "messages": messages})
    client = c.openai(grant["stream_token"])
    stream = client.chat.completions.create(
        model="mock-fast",
        messages=messages,  # type: ignore[arg-type]
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == 25
    record = c.wait_usage(token, grant["reservation_id"])
    expected = math.ceil(usage.prompt_tokens * 1 + usage.completion_tokens * 2)
    after = c.credits(token)
    assert record["status"] == "completed"
    assert micro(before["balance"]) - micro(after["balance"]) == expected
    assert micro(after["held"]) == 0
