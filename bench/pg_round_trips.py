"""PostgreSQL round trips, statements and thread hops per init and per webhook (issue 14).

Runs the control plane in-process (as `bench.cp_cpu`) with its database URL pointed
at a counting TCP proxy in front of PostgreSQL, drives ``--n`` inits and then their
usage webhooks one at a time (so nothing overlaps), and prints per request:

* round trips: the client's writes to the server (libpq sends a whole extended
  query, Parse/Bind/Describe/Execute/Sync, in one write, and waits for its answer);
* statements: Execute messages of the extended protocol plus simple queries, with
  the simple queries by text (BEGIN, COMMIT, ROLLBACK, the empty ping…);
* thread hops: calls handed to the database threads (`DbThreads.run`).

Run: ``python -m bench.pg_round_trips [--n 200] [--no-transcripts]``. Needs the
PostgreSQL and Redis of `tests/conftest.py`.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import socket
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import jwt
from sqlalchemy.engine import make_url

from bench.cp_cpu import bench_settings, provision, throwaway_state, webhook_of
from control_plane.app import create_app
from control_plane.db_threads import DbThreads
from shared.webhooks import generate_secret


class Counts:
    """What crossed the proxy from clients to the server (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.writes = 0
        self.executes = 0
        self.simple: collections.Counter[str] = collections.Counter()

    def add(self, writes: int, executes: int, simple: list[str]) -> None:
        with self._lock:
            self.writes += writes
            self.executes += executes
            self.simple.update(simple)

    def snapshot(self) -> tuple[int, int, collections.Counter[str]]:
        with self._lock:
            return self.writes, self.executes, collections.Counter(self.simple)


class _Frontend:
    """The client's side of one proxied connection: its messages, parsed."""

    def __init__(self, counts: Counts) -> None:
        self._counts = counts
        self._buffer = b""
        self._started = False

    def feed(self, data: bytes) -> None:
        self._buffer += data
        executes = 0
        simple: list[str] = []
        while True:
            if not self._started:  # the startup message has no type byte
                if len(self._buffer) < 4:
                    break
                (length,) = struct.unpack("!I", self._buffer[:4])
                if len(self._buffer) < length:
                    break
                self._buffer = self._buffer[length:]
                self._started = True
                continue
            if len(self._buffer) < 5:
                break
            kind = self._buffer[:1]
            (length,) = struct.unpack("!I", self._buffer[1:5])
            if len(self._buffer) < 1 + length:
                break
            body = self._buffer[5 : 1 + length]
            self._buffer = self._buffer[1 + length :]
            if kind == b"E":
                executes += 1
            elif kind == b"Q":
                text = body.rstrip(b"\0").decode(errors="replace").strip()
                simple.append(text.split(" ")[0].upper() if text else "<empty>")
        self._counts.add(1, executes, simple)


def _pipe(src: socket.socket, dst: socket.socket, frontend: _Frontend | None) -> None:
    try:
        while data := src.recv(65536):
            if frontend is not None:
                frontend.feed(data)
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        src.close()  # each socket is the source of exactly one pipe


@contextmanager
def counting_proxy(host: str, port: int, counts: Counts) -> Iterator[int]:
    """A TCP proxy to (host, port) on an unused local port, counting as it goes."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)

    def accept() -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            server = socket.create_connection((host, port))
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(
                target=_pipe, args=(client, server, _Frontend(counts)), daemon=True
            ).start()
            threading.Thread(target=_pipe, args=(server, client, None), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()


def count_hops() -> list[int]:
    """Counts `DbThreads.run` calls from now on (the process's, for this tool)."""
    hops = [0]
    original = DbThreads.run

    def counted(self: DbThreads, fn: Any) -> Any:
        hops[0] += 1
        return original(self, fn)

    DbThreads.run = counted  # type: ignore[method-assign]
    return hops


def _per(
    before: tuple[int, int, collections.Counter[str]],
    after: tuple[int, int, collections.Counter[str]],
    hops: int,
    n: int,
) -> str:
    writes = (after[0] - before[0]) / n
    executes = (after[1] - before[1]) / n
    simple = after[2] - before[2]
    named = ", ".join(f"{k} {v / n:.2f}" for k, v in sorted(simple.items()))
    statements = executes + sum(simple.values()) / n
    return (
        f"round trips {writes:.2f}, statements {statements:.2f} "
        f"(extended {executes:.2f}; simple: {named or 'none'}), thread hops {hops / n:.2f}"
    )


async def main(n: int, transcripts: bool) -> None:
    secret = generate_secret()
    counts = Counts()
    hops = count_hops()
    with throwaway_state() as (database_url, prefix):
        url = make_url(database_url)
        with counting_proxy(url.host or "127.0.0.1", url.port or 5432, counts) as port:
            proxied = url.set(host="127.0.0.1", port=port, query={"sslmode": "disable"})
            settings = bench_settings(proxied.render_as_string(hide_password=False), prefix, secret)
            if not transcripts:
                settings = dataclasses.replace(settings, store_transcripts=False)
            app = create_app(settings)
            async with app.router.lifespan_context(app):
                transport = httpx.ASGITransport(app=app)
                async with httpx.AsyncClient(
                    transport=transport, base_url="http://cp.test", timeout=60
                ) as client:
                    keys = await provision(client, 1)
                    auth = {"Authorization": f"Bearer {keys[0]}"}

                    async def init(i: int) -> dict[str, Any]:
                        r = await client.post(
                            "/v1/chat/init",
                            json={"query": f"hello {i}", "max_tokens": 64},
                            headers=auth,
                        )
                        assert r.status_code == 201, r.text
                        return dict(r.json()["data"])

                    for i in range(5):  # warm up: connections made, caches filled
                        await init(-i)
                    before, hops0 = counts.snapshot(), hops[0]
                    inits = [await init(i) for i in range(n)]
                    after, hops1 = counts.snapshot(), hops[0]
                    print(f"per init:    {_per(before, after, hops1 - hops0, n)}")
                    claims = jwt.decode(
                        inits[0]["stream_token"], options={"verify_signature": False}
                    )
                    signed = [webhook_of(i, claims["company_id"], secret) for i in inits]
                    before, hops0 = counts.snapshot(), hops[0]
                    for body, headers in signed:
                        r = await client.post("/v1/webhooks/usage", content=body, headers=headers)
                        assert r.status_code == 200 and r.json()["data"].get("settled"), r.text
                    after, hops1 = counts.snapshot(), hops[0]
                    print(f"per webhook: {_per(before, after, hops1 - hops0, n)}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--no-transcripts", action="store_true")
    args = parser.parse_args()
    asyncio.run(main(args.n, not args.no_transcripts))
