"""The control plane's CPU per whole turn in the real process, and nothing else.

    python -m bench.cp_turn_cpu --turns 200 --rounds 3 --idle 10

Starts the stack as `make bench` does (`bench.stack`), then for each round runs
`--turns` whole turns at concurrency 1 (init with an access token, the stream through
the edge, the edge's usage webhook) and reads each process's CPU from /proc around
them, after waiting for every webhook to be settled. Then it leaves the stack idle
for `--idle` seconds and reads the control plane's CPU again: what its background
loops cost per second, to subtract from (or compare with) the per-turn figure.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import time
from typing import Any

import orjson

from bench import turns
from bench.edge_bench import QUICK, Bench, _runner, chat_body
from bench.procfs import cpu_seconds, load_average, system_seconds
from bench.stack import BenchStack, mint

PROCESSES = ("cp", "edge", "mock")


async def _round(bench: Bench, count: int) -> dict[str, float]:
    body = orjson.dumps(chat_body(bench.plan.tokens, 0))
    await bench.quiesce()
    before = {name: cpu_seconds(bench.stack.pid(name)) for name in PROCESSES}
    before["cp_sys"] = system_seconds(bench.stack.pid("cp"))
    started = time.perf_counter()
    results = await turns._turns(bench, 1, body, count)
    wall = time.perf_counter() - started
    await bench.quiesce()
    after = {name: cpu_seconds(bench.stack.pid(name)) for name in PROCESSES}
    after["cp_sys"] = system_seconds(bench.stack.pid("cp"))
    good = sum(1 for r in results if r.ok)
    out = {name: (after[name] - before[name]) * 1000 / max(good, 1) for name in before}
    out["turns"] = good
    out["wall_ms"] = wall * 1000 / max(good, 1)
    return out


def _requests(bench: Bench) -> dict[str, float]:
    """`llmgw_cp_http_requests_total` by route: what a turn makes the control plane serve."""
    text = bench.stack.http.get(bench.stack.urls["cp"] + "/metrics").text
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("llmgw_cp_http_requests_total{"):
            labels, _, value = line.rpartition(" ")
            route = labels.split('route="', 1)[1].split('"', 1)[0]
            out[route] = out.get(route, 0.0) + float(value)
    return out


async def _idle(bench: Bench, seconds: float) -> float:
    pid = bench.stack.pid("cp")
    before = cpu_seconds(pid)
    await asyncio.sleep(seconds)
    return (cpu_seconds(pid) - before) * 1000 / seconds


async def _main(bench: Bench, args: argparse.Namespace) -> None:
    bench.users = bench.stack.provision(users=2)
    print(f"cp pid {bench.stack.pid('cp')}, edge pid {bench.stack.pid('edge')}", flush=True)
    if args.pending:
        # What `make bench`'s init phases leave behind before its turn phases: holds
        # whose tokens are never streamed, active until their deadline.
        owners = bench.stack.provision(users=8)
        await mint(bench.stack.urls["cp"], owners, chat_body(4, 0), args.pending, parallel=8)
        print(f"{args.pending} holds left pending", flush=True)
        if args.idle > 0:
            print(f"cp idle with them: {await _idle(bench, args.idle):.2f} ms CPU/s", flush=True)
    await _round(bench, args.warmup)
    rows: list[dict[str, Any]] = []
    served = _requests(bench)
    for index in range(args.rounds):
        row = await _round(bench, args.turns)
        rows.append(row)
        print(
            f"round {index}: {row['turns']} turns, cp {row['cp']:.2f} "
            f"(sys {row['cp_sys']:.2f}) edge {row['edge']:.2f} mock {row['mock']:.2f} "
            f"ms CPU/turn, {row['wall_ms']:.1f} ms wall/turn, "
            f"load {load_average():.2f}",
            flush=True,
        )
    after = _requests(bench)
    total = sum(row["turns"] for row in rows) or 1
    for route, count in sorted(after.items()):
        # The scrapes themselves add one `/metrics` each.
        print(f"  {route}: {(count - served.get(route, 0.0)) / total:.3f} per turn", flush=True)
    if args.idle > 0:
        print(f"cp idle: {await _idle(bench, args.idle):.2f} ms CPU/s", flush=True)
    cps = sorted(row["cp"] for row in rows)
    print(f"median cp {cps[len(cps) // 2]:.3f} ms CPU/turn", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cp_turn_cpu", description=__doc__)
    parser.add_argument("--turns", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pending", type=int, default=0, help="unstreamed holds made first")
    parser.add_argument("--idle", type=float, default=10.0, help="seconds of idle CPU reading")
    parser.add_argument("--pg-dsn", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    args = parser.parse_args(argv)
    plan = dataclasses.replace(QUICK, tokens=32)  # the full bench's answer length
    with BenchStack(args.pg_dsn, args.redis_url) as stack, _runner() as runner:
        runner.run(_main(Bench(stack, plan, lambda line: print(line, flush=True)), args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
