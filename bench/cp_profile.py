"""Where the control plane's CPU goes: one profile of `POST /v1/chat/init`, one of
settling usage webhooks (docs/cp-profile.md).

    python -m bench.cp_profile [--count 400] [--concurrency 8]

Starts the bench stack (PostgreSQL, Redis, real processes) with the control plane
under `bench.profiled`, warms it up, then profiles two windows: `count` inits, and
`count` streams through the edge whose usage webhooks the control plane settles
(their tokens minted before the window opens). Prints, per window, the CPU per
request split into the parts named below, ranked, and the costliest functions.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pstats
import signal
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import orjson

from bench.edge_bench import HOST, chat_body
from bench.sse_client import Pool, chat_request, init_request
from bench.stack import BenchStack, mint

# (part, does the path contain one of these) in order: the first match wins.
PARTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("password hashing (argon2)", ("argon2",)),
    ("token signing and checks (Ed25519, JWS)", ("cryptography", "jws_fast", "shared/tokens",
                                                 "signing_keys", "/jwt/")),
    ("logging", ("logging/", "shared/logs")),
    ("metrics (prometheus_client)", ("prometheus_client", "control_plane/metrics")),
    ("Redis client (redis-py)", ("redis/",)),
    ("PostgreSQL driver (psycopg)", ("psycopg",)),
    ("SQLModel / pydantic model objects (construct, validate, setattr)", ("sqlmodel", "pydantic")),
    ("ORM session bookkeeping (flush, unit of work, identity map, attribute events)",
     ("orm/session", "orm/unitofwork", "orm/identity", "orm/state", "orm/attributes",
      "orm/persistence", "orm/instrumentation", "orm/dependency", "orm/events",
      "orm/collections", "orm/base", "orm/mapper", "orm/sync", "orm/util")),
    ("ORM queries and loading (select → objects)", ("sqlalchemy/orm",)),
    ("SQL expression building and compilation", ("sqlalchemy/sql",)),
    ("SQLAlchemy engine, connection pool, events", ("sqlalchemy/",)),
    ("JSON (orjson, json)", ("orjson", "json/")),
    ("middleware (ours and Starlette's)", ("middleware",)),
    ("ASGI server and framework (uvicorn, Starlette, h11, httptools)",
     ("uvicorn", "starlette", "h11", "httptools")),
    ("asyncio, thread-pool hand-off, anyio", ("asyncio", "concurrent/futures", "threading",
                                              "queue.py", "anyio", "uvloop", "selectors")),
    ("our control-plane code", ("control_plane/",)),
    ("our shared code", ("shared/",)),
)  # fmt: skip


def part_of(filename: str) -> str:
    path = filename.replace(os.sep, "/")
    for name, marks in PARTS:
        if any(mark in path for mark in marks):
            return name
    return "other (interpreter, stdlib)"


Func = tuple[str, int, str]


def self_times(stats: pstats.Stats) -> dict[Func, float]:
    """Each function's own time, with builtins (C functions, file `~`) charged to the
    Python function that called them."""
    out: dict[Func, float] = defaultdict(float)
    raw: dict[Func, tuple[int, int, float, float, dict[Func, tuple[int, int, float, float]]]]
    raw = stats.stats  # type: ignore[attr-defined]
    for func, (_cc, _nc, tt, _ct, callers) in raw.items():
        if func[0] != "~" or not callers:
            out[func] += tt
            continue
        for caller, (_c, _n, caller_tt, _t) in callers.items():
            out[caller] += caller_tt
    return out


def summarize(path: str, count: int, label: str, top: int = 15) -> list[str]:
    stats = pstats.Stats(path)
    own = self_times(stats)
    total = sum(own.values())
    parts: dict[str, float] = defaultdict(float)
    for func, seconds in own.items():
        parts[part_of(func[0])] += seconds
    raw = stats.stats  # type: ignore[attr-defined]
    # Every statement, the ORM's and the raw ones alike, ends in psycopg's cursor.
    statements = sum(
        nc for (file, _, name), (_, nc, *_) in raw.items()
        if name in ("execute", "executemany") and file.endswith("psycopg/cursor.py")
    )  # fmt: skip
    lines = [
        f"## {label}: {total / count * 1000:.2f} ms of CPU per request ({count} requests, "
        f"under the profiler), {statements / count:.1f} SQL statements per request"
    ]
    lines += ["", "| part | ms per request | share |", "|---|---|---|"]
    for name, seconds in sorted(parts.items(), key=lambda item: -item[1]):
        lines.append(f"| {name} | {seconds / count * 1000:.2f} | {seconds / total:.0%} |")
    lines += ["", "| function (builtins charged to it) | ms per request |", "|---|---|"]
    root = str(Path(__file__).resolve().parent.parent)
    for func, seconds in sorted(own.items(), key=lambda item: -item[1])[:top]:
        where = func[0].replace(root + os.sep, "").split("site-packages" + os.sep)[-1]
        lines.append(f"| `{where}:{func[1]} {func[2]}` | {seconds / count * 1000:.3f} |")
    return [*lines, ""]


async def drive(
    stack: BenchStack, count: int, concurrency: int, window: Callable[[], None]
) -> None:
    users = stack.provision(users=8)
    cp, edge = stack.ports["cp"], stack.ports["edge"]
    body = orjson.dumps(chat_body(32, 0))
    inits = [init_request(HOST, cp, body, users[i % len(users)]) for i in range(count)]

    async def streams(tokens: list[str]) -> None:
        pool = Pool(HOST, edge, concurrency)
        await pool.open()
        try:
            run = await pool.run([chat_request(HOST, edge, body, t) for t in tokens])
        finally:
            pool.close()
        assert all(r.ok for r in run.results), "a stream failed"
        await settled(stack)

    # Warm-up: every code path once, outside the windows.
    await streams(await mint(stack.urls["cp"], users, chat_body(32, 0), 50))
    pool = Pool(HOST, cp, concurrency)
    await pool.open()
    try:
        window()
        run = await pool.run(inits, keep_body=True)
        window()
    finally:
        pool.close()
    assert all(r.status == 201 for r in run.results), "an init failed"
    tokens = await mint(stack.urls["cp"], users, chat_body(32, 0), count)
    window()
    await streams(tokens)
    window()


async def settled(stack: BenchStack, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while stack.outbox_pending() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cp_profile", description=__doc__)
    parser.add_argument("--count", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--pg-dsn", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--keep", type=Path, help="copy the .pstats files here")
    args = parser.parse_args(argv)
    out = Path(tempfile.mkdtemp(prefix="llmgw-cp-profile-")) / "cp"
    with BenchStack(args.pg_dsn, args.redis_url, cp_profile=out) as stack:
        pid = stack.pid("cp")
        opened = [False]

        def window() -> None:
            os.kill(pid, signal.SIGUSR2 if opened[0] else signal.SIGUSR1)
            opened[0] = not opened[0]
            time.sleep(0.2)  # the signal lands between two of the loop's callbacks

        asyncio.run(drive(stack, args.count, args.concurrency, window))
    for index, label in ((1, "POST /v1/chat/init"), (2, "usage webhook → settled")):
        path = f"{out}.{index}"
        for line in summarize(path, args.count, label):
            print(line)
        if args.keep:
            args.keep.mkdir(parents=True, exist_ok=True)
            Path(path).replace(args.keep / f"cp-{index}.pstats")
    return 0


if __name__ == "__main__":
    sys.exit(main())
