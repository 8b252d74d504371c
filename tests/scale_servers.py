"""Private infrastructure for the scale-out tests: a 3-master Redis Cluster and a
PgBouncer in transaction mode, each started in a temp dir on free ports and stopped
afterwards (the machine's own Redis and PostgreSQL are never touched).

A missing binary skips the test locally and fails it under ``CI=true``, like the
PostgreSQL/Redis fixtures in conftest.py (``make install-system`` installs both).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from tests.conftest import _unavailable
from tests.harness import free_port


def _binary(name: str) -> str:
    found = shutil.which(name) or (
        f"/usr/sbin/{name}" if os.path.exists(f"/usr/sbin/{name}") else None
    )
    if found is None:
        _unavailable(name, FileNotFoundError(f"{name} is not installed (make install-system)"))
    assert found is not None
    return found


def _wait(check: object, what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if check():  # type: ignore[operator]
                return
        except Exception as exc:  # the server is still starting
            last = exc
        time.sleep(0.05)
    raise AssertionError(f"{what} did not come up in {timeout}s: {last}")


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def redis_cluster(tmp: Path, masters: int = 3) -> Iterator[str]:
    """Start `masters` redis-server processes in cluster mode, join them into one
    cluster (no replicas) and yield ``redis+cluster://127.0.0.1:<first port>``."""
    server = _binary("redis-server")
    cli = _binary("redis-cli")
    ports = [free_port() for _ in range(masters)]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for port in ports:
            node = tmp / f"node-{port}"
            node.mkdir()
            procs.append(
                subprocess.Popen(
                    [server, "--port", str(port), "--bind", "127.0.0.1",
                     # The bus port defaults to port + 10000, past 65535 for a high
                     # ephemeral port (the node then never starts): pick one too.
                     "--cluster-port", str(free_port()),
                     "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                     "--appendonly", "no", "--save", "", "--dir", str(node)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                )
            )  # fmt: skip
        for port in ports:
            _wait(
                lambda p=port: subprocess.run(
                    [cli, "-p", str(p), "ping"], capture_output=True, check=False
                ).stdout.strip() == b"PONG",
                f"redis-server :{port}",
            )  # fmt: skip
        subprocess.run(
            [cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports),
             "--cluster-replicas", "0", "--cluster-yes"],
            check=True, capture_output=True, timeout=30,
        )  # fmt: skip
        for port in ports:
            _wait(
                lambda p=port: (
                    b"cluster_state:ok"
                    in subprocess.run(
                        [cli, "-p", str(p), "cluster", "info"], capture_output=True, check=False
                    ).stdout
                ),
                f"cluster state on :{port}",
            )
        yield f"redis+cluster://127.0.0.1:{ports[0]}"
    finally:
        _stop(procs)


def _existing_user(name: str) -> str | None:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return None
    return name


def _version(binary: str) -> tuple[int, ...]:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=True)
    found = re.search(r"PgBouncer (\d+)\.(\d+)", out.stdout)
    return (int(found.group(1)), int(found.group(2))) if found else (0,)


@contextlib.contextmanager
def pgbouncer(upstream_port: int = 5432, pool_size: int = 4) -> Iterator[int]:
    """A PgBouncer in transaction mode in front of the machine's PostgreSQL; yields its
    port. `pool_size` server connections per database, far fewer than the clients, so
    consecutive transactions of one client land on different server connections."""
    binary = _binary("pgbouncer")
    port = free_port()
    # Its own temp dir, not pytest's: pytest's base dir is private to the test user,
    # and pgbouncer may run as another one.
    tmp = Path(tempfile.mkdtemp(prefix="llmgw-pgbouncer-"))
    ini = tmp / "pgbouncer.ini"
    ini.write_text(
        "[databases]\n"
        f"* = host=127.0.0.1 port={upstream_port}\n"
        "[pgbouncer]\n"
        f"listen_addr = 127.0.0.1\nlisten_port = {port}\n"
        f"unix_socket_dir = {tmp}\n"
        "auth_type = trust\n"
        f"auth_file = {tmp / 'users.txt'}\n"
        "pool_mode = transaction\n"
        f"default_pool_size = {pool_size}\nmin_pool_size = 0\nreserve_pool_size = 0\n"
        "max_client_conn = 500\n"
        # PgBouncer 1.21+ can track prepared statements; turn that off so the test
        # holds the app to what older PgBouncers and most managed poolers allow.
        + ("max_prepared_statements = 0\n" if _version(binary) >= (1, 21) else "")
        + "ignore_startup_parameters = extra_float_digits,options\n"
        f"logfile = {tmp / 'pgbouncer.log'}\n"
    )
    (tmp / "users.txt").write_text('"postgres" ""\n')
    command = [binary, str(ini)]
    if os.geteuid() == 0:
        # pgbouncer refuses to run as root (CI does): drop to an unprivileged user,
        # PostgreSQL's own when this machine has one.
        user = _existing_user("postgres") or "nobody"
        for path in [tmp, *tmp.iterdir()]:
            shutil.chown(path, user)
        command = ["runuser", "-u", user, "--", *command]
    with (tmp / "stderr").open("wb") as stderr:
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr)
    try:

        def ready() -> bool:
            if proc.poll() is not None:
                pytest.fail(f"pgbouncer exited: {(tmp / 'stderr').read_text()}")
            with psycopg.connect(
                f"postgresql://postgres@127.0.0.1:{port}/test", connect_timeout=2
            ) as conn:
                conn.execute("SELECT 1")
            return True

        _wait(ready, "pgbouncer")
        yield port
    finally:
        _stop([proc])
        shutil.rmtree(tmp, ignore_errors=True)
