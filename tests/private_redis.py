"""A redis-server of a test's own, to stop and start again (never the machine's
shared Redis): `PrivateRedis`, and the `private_redis` fixture that starts one."""

from __future__ import annotations

import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.conftest import _unavailable
from tests.harness import free_port
from tests.polling import wait_until


class PrivateRedis:
    """A redis-server of this test's own on a free port, to stop and start again
    (never the machine's Redis). No persistence: a restart comes back empty, the
    harshest case for what the edge kept in it."""

    def __init__(self, directory: Path, replica_of: PrivateRedis | None = None) -> None:
        self.port = free_port()
        self.directory = directory
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None
        self.replica_of = replica_of

    def start(self) -> None:
        # A replica's first sync at once (the primary's default waits 5 s for others).
        following = (
            []
            if self.replica_of is None
            else ["--replicaof", "127.0.0.1", str(self.replica_of.port)]
        )
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", str(self.directory),
             "--repl-diskless-sync-delay", "0", *following],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        client = redis.Redis.from_url(self.url, socket_connect_timeout=1)

        def answers() -> bool:
            try:
                return bool(client.ping())
            except redis.ConnectionError:
                return False

        try:
            wait_until(answers, "redis-server did not start", within=10)
        finally:
            client.close()

    def caught_up(self) -> None:
        """Wait until its primary counts it as a replica that has acknowledged
        everything the primary has written so far (a write of its own included: just
        after its first sync a replica may not be sent the command stream until its
        first ack, which WAIT then waits for)."""
        assert self.replica_of is not None
        primary = redis.Redis.from_url(self.replica_of.url, socket_connect_timeout=1)

        def synced(written: int) -> bool:
            links = primary.info("replication")
            return any(
                isinstance(link, dict)
                and link.get("port") == self.port
                and link.get("state") == "online"
                and int(link.get("offset", -1)) >= written
                for name, link in links.items()
                if name.startswith("slave")
            )

        try:
            primary.set("test:replica-probe", self.port)
            written = int(primary.info("replication")["master_repl_offset"])
            wait_until(lambda: synced(written), "the replica did not catch up", within=10)
        finally:
            primary.close()

    def freeze(self) -> None:
        """SIGSTOP: its sockets stay open, what is sent to it waits unread."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def unread_bytes(self) -> int:
        """Bytes its clients sent that it has not read (the kernel's receive queues
        of its established sockets, from /proc/net/tcp): while frozen, > 0 once a
        command was sent to it."""
        port = f"{self.port:04X}"
        total = 0
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            fields = line.split()
            local, state, queues = fields[1], fields[3], fields[4]
            if local.endswith(":" + port) and state == "01":  # ESTABLISHED
                total += int(queues.split(":")[1], 16)
        return total

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)  # a frozen one cannot terminate
            self.process.terminate()
            self.process.wait(timeout=10)
        self.process = None


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    if shutil.which("redis-server") is None:
        _unavailable("redis-server", FileNotFoundError("not on PATH"))
    server = PrivateRedis(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()
