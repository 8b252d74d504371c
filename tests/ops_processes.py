"""The gateway as an operator runs it, for the operations tests: each service a real
`llm-gateway` process (optionally with several workers) on PostgreSQL + Redis, its
log in a file, plus helpers to read SSE streams and Prometheus text.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.conftest import REDIS_URL
from tests.harness import free_port
from tests.stack import Client, base_env, wait_healthy

CLI = [sys.executable, "-m", "llm_gateway.cli"]
ROOT = Path(__file__).resolve().parent.parent
SERVICES = (("mock", "mock-llm"), ("cp", "control-plane"), ("edge", "stream-edge"))


def require_tool(name: str) -> str:
    """The path of a system tool `make install-system` provides (promtool, nginx);
    skips without it locally, fails under CI, where a missing tool is a broken machine."""
    path = shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.access(p, os.X_OK)), None
    )
    if path is None:
        message = f"{name} is missing: run `make install-system`"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


class ProcessStack:
    """mock-llm, control plane and edge as separate processes (`workers` each for the
    two services); `logs()` returns what each wrote to stdout/stderr."""

    def __init__(
        self,
        tmp_path: Path,
        database_url: str,
        redis_prefix: str,
        *,
        workers: int = 1,
        **env_overrides: str,
    ) -> None:
        self.tmp_path = tmp_path
        self.workers = workers
        self.ports = {name: free_port() for name, _ in SERVICES}
        self.urls = {name: f"http://127.0.0.1:{port}" for name, port in self.ports.items()}
        models = tmp_path / "models.yaml"
        packaged = (ROOT / "shared" / "models.yaml").read_text()
        models.write_text(packaged.replace("http://127.0.0.1:8002/v1", f"{self.urls['mock']}/v1"))
        self.env = {
            **os.environ,
            **base_env(database_url, REDIS_URL, redis_prefix),
            "LLMGW_CONTROL_PLANE_URL": self.urls["cp"],
            "LLMGW_EDGE_PUBLIC_URL": self.urls["edge"],
            "LLMGW_MODELS_FILE": str(models),
            "LLMGW_LOG_LEVEL": "INFO",
            **env_overrides,
        }
        self.env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.client = Client(
            self.urls["cp"], self.urls["edge"], self.urls["mock"], self.env["LLMGW_WEBHOOK_SECRET"]
        )

    def log_path(self, name: str) -> Path:
        return self.tmp_path / f"{name}.log"

    def _spawn(self, name: str) -> None:
        command = dict(SERVICES)[name]
        args = [*CLI, command, "--port", str(self.ports[name])]
        if name != "mock" and self.workers > 1:
            args += ["--workers", str(self.workers)]
        with self.log_path(name).open("ab") as log:
            self.procs[name] = subprocess.Popen(
                args,
                env=self.env,
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def __enter__(self) -> ProcessStack:
        try:
            for name, _ in SERVICES:
                self._spawn(name)
            for name, _ in SERVICES:
                self._wait_healthy(name)
        except BaseException:
            self.stop()
            raise
        return self

    def kill(self, name: str) -> None:
        """SIGKILL `name` (its supervisor and workers: the process group), no goodbye."""
        proc = self.procs[name]
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)

    def restart(self, name: str, *, wait: bool = True) -> None:
        """Start `name` again on its port (after `kill`); `wait`: until it is healthy."""
        assert self.procs[name].poll() is not None, f"{name} is still running"
        self._spawn(name)
        if wait:
            self._wait_healthy(name)

    def _wait_healthy(self, name: str, timeout: float = 45) -> None:
        wait_healthy(self.urls[name], self.procs[name], timeout, self.log_path(name))

    def stop(self) -> None:
        """SIGTERM (the graceful path), then SIGKILL for whatever is left."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # the supervisor and its workers
                proc.wait(timeout=5)

    def __exit__(self, *exc: object) -> None:
        self.client.close()
        self.stop()

    def logs(self) -> dict[str, str]:
        return {name: self.log_path(name).read_text() for name, _ in SERVICES}


def sse_events(response: httpx.Response) -> Iterator[tuple[str, dict[str, Any], float]]:
    """(event name, JSON data, arrival time) for each event of an EventSource stream."""
    name, data = "message", ""
    for line in response.iter_lines():
        if line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data += line[5:].strip()
        elif line == "" and data:
            yield name, orjson.loads(data), time.monotonic()
            name, data = "message", ""


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})?\s+(\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Prometheus text → {(sample name, labels): value}."""
    samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        assert match, f"unparseable metrics line: {line!r}"
        name, labels, value = match.groups()
        pairs = frozenset(_LABEL.findall(labels or ""))
        samples[(name, pairs)] = float(value)
    return samples


class Scrape:
    """One scrape's samples, with lookups that sum over the labels not given."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples = parse_metrics(text)

    def value(self, name: str, **labels: str) -> float:
        wanted = set(labels.items())
        return sum(v for (n, ls), v in self.samples.items() if n == name and wanted <= ls)

    def label_values(self, name: str, label: str) -> set[str]:
        return {
            dict(ls)[label]
            for (n, ls), _ in self.samples.items()
            if n == name and label in dict(ls)
        }

    def names(self) -> set[str]:
        return {n for n, _ in self.samples}


def scrape(url: str) -> Scrape:
    response = httpx.get(f"{url}/metrics", timeout=10)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return Scrape(response.text)
