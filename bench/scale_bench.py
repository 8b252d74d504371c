"""Turns per second with 1 and 2 workers of each service (issue 14.5), on real
processes: ``control-plane --workers N`` and ``stream-edge --workers N`` behind one
PostgreSQL and a private Redis (so its command count is ours alone).

A turn is what a chat client does: ``POST /v1/chat/init`` on the control plane,
then the whole EventSource stream from the edge (a short answer from mock-llm, no
delay: the gateway's own cost), and the usage webhook that settles the hold (counted
when the edge's outbox is empty again). `concurrency` clients loop for `seconds`.

Per configuration it prints: turns/s, CPU seconds per turn of each service (all
its processes), Redis commands per turn and PostgreSQL transactions per turn. Run:
``python -m bench.scale_bench [--seconds 20] [--concurrency 32] [--tokens 20 --delay-ms 0]``
(prints a table, writes nothing).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psycopg
import redis

from bench.procfs import cpu_seconds, machine
from bench.stack import CLI, ROOT, SERVICES, BenchStack, _die_with_parent, free_port


def body(tokens: int, delay_ms: int) -> dict[str, object]:
    return {
        "query": f"scale [[mock tokens={tokens} delay_ms={delay_ms}]]",
        "max_tokens": tokens + 8,
    }


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            raw = stat.read_text()
            if int(raw[raw.rindex(")") + 2 :].split()[1]) == pid:
                found.append(int(stat.parent.name))
    return found


def tree_cpu(pid: int) -> float:
    """CPU seconds of a process and its (live) children: uvicorn's supervisor and
    its workers."""
    total = 0.0
    for one in [pid, *_children(pid)]:
        with contextlib.suppress(OSError):
            total += cpu_seconds(one)
    return total


class WorkersStack(BenchStack):
    """`BenchStack` with `--workers N` for the control plane and the edge."""

    def __init__(self, pg_dsn: str, redis_url: str, workers: int) -> None:
        super().__init__(pg_dsn, redis_url)
        self.workers = workers

    def _spawn(self, name: str, env: dict[str, str]) -> None:
        command = dict(SERVICES)[name]
        extra = ["--workers", str(self.workers)] if name in ("cp", "edge") else []
        with (self._tmp / f"{name}.log").open("wb") as log:
            self.procs[name] = subprocess.Popen(
                [*CLI, command, "--port", str(self.ports[name]), *extra],
                env=env,
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
            )


@contextlib.contextmanager
def private_redis() -> Iterator[str]:
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="llmgw-scale-redis-")
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", workdir],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=_die_with_parent,
    )  # fmt: skip
    try:
        client = redis.Redis(port=port)
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(redis.ConnectionError):
                if client.ping():
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("private redis-server did not start")
            time.sleep(0.05)
        client.close()
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
        shutil.rmtree(workdir, ignore_errors=True)


@dataclass
class Result:
    workers: int
    turns: int
    seconds: float
    cp_cpu: float
    edge_cpu: float
    redis_commands: int
    pg_transactions: int
    failures: int

    def row(self) -> str:
        n = max(1, self.turns)
        return (
            f"| {self.workers} | {self.turns / self.seconds:.1f} | "
            f"{1000 * self.cp_cpu / n:.1f} | {1000 * self.edge_cpu / n:.1f} | "
            f"{self.redis_commands / n:.1f} | {self.pg_transactions / n:.1f} | {self.failures} |"
        )


async def _loop(
    stack: BenchStack, tokens: list[str], stop_at: float, counts: list[int], chat: object
) -> None:
    limits = httpx.Limits(max_connections=4, max_keepalive_connections=4)
    async with httpx.AsyncClient(timeout=60, limits=limits) as http:
        index = 0
        while time.monotonic() < stop_at:
            index += 1
            token = tokens[index % len(tokens)]
            try:
                init = await http.post(
                    stack.urls["cp"] + "/v1/chat/init",
                    json=chat,
                    headers={"Authorization": f"Bearer {token}"},
                )
                if init.status_code != 201:
                    counts[1] += 1
                    continue
                stream = await http.get(init.json()["data"]["stream_url"])
                if stream.status_code != 200 or b"event: complete" not in stream.content:
                    counts[1] += 1
                    continue
                counts[0] += 1
            except httpx.HTTPError:
                counts[1] += 1


def _redis_commands(client: redis.Redis) -> int:
    return int(client.info("stats")["total_commands_processed"])


def _pg_transactions(stack: BenchStack) -> int:
    with psycopg.connect(stack.pg_dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = %s",
            (stack.database,),
        ).fetchone()
    return int(row[0]) if row else 0


def measure(
    pg_dsn: str, workers: int, seconds: float, concurrency: int, chat: dict[str, object]
) -> Result:
    with private_redis() as redis_url, WorkersStack(pg_dsn, redis_url, workers) as stack:
        tokens = stack.provision(8)
        client = redis.Redis.from_url(redis_url)
        # Warm up: every worker opens its pools and JIT-free caches fill.
        asyncio.run(_run(stack, tokens, 3.0, concurrency, chat))
        _drain(stack)
        pids = {name: stack.pid(name) for name in ("cp", "edge")}
        cpu0 = {name: tree_cpu(pid) for name, pid in pids.items()}
        redis0, pg0 = _redis_commands(client), _pg_transactions(stack)
        started = time.monotonic()
        counts = asyncio.run(_run(stack, tokens, seconds, concurrency, chat))
        elapsed = time.monotonic() - started
        _drain(stack)  # the turns' settlements belong to them
        # pg_stat_database is updated by backends at transaction end, with a delay.
        time.sleep(1.0)
        result = Result(
            workers=workers,
            turns=counts[0],
            seconds=elapsed,
            cp_cpu=tree_cpu(pids["cp"]) - cpu0["cp"],
            edge_cpu=tree_cpu(pids["edge"]) - cpu0["edge"],
            redis_commands=_redis_commands(client) - redis0,
            pg_transactions=_pg_transactions(stack) - pg0,
            failures=counts[1],
        )
        client.close()
        return result


async def _run(
    stack: BenchStack, tokens: list[str], seconds: float, concurrency: int, chat: object
) -> list[int]:
    counts = [0, 0]
    stop_at = time.monotonic() + seconds
    loops = (_loop(stack, tokens, stop_at, counts, chat) for _ in range(concurrency))
    await asyncio.gather(*loops)
    return counts


def _drain(stack: BenchStack, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while stack.outbox_pending() and time.monotonic() < deadline:
        time.sleep(0.1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--pg-dsn", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--tokens", type=int, default=20, help="answer length (chunks)")
    parser.add_argument("--delay-ms", type=int, default=0, help="mock delay between chunks")
    args = parser.parse_args(argv)
    chat = body(args.tokens, args.delay_ms)
    print(f"{args.concurrency} clients, {args.seconds:.0f} s, answers of {args.tokens} chunks, "
          f"{args.delay_ms} ms apart")  # fmt: skip
    print(machine().describe())
    print("| workers of each | turns/s | CP CPU ms/turn | edge CPU ms/turn | "
          "Redis cmds/turn | PG xacts/turn | failed |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for workers in args.workers:
        result = measure(args.pg_dsn, workers, args.seconds, args.concurrency, chat)
        print(result.row(), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
