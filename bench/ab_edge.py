"""A/B the edge: an older tree against this one, interleaved, on the bench stack.

    git archive <commit> | tar -x -C /tmp/before
    python -m bench.ab_edge --before /tmp/before [--rounds 2] [--shape paced]
    python -m bench.ab_edge --profile /tmp/edge.prof --shape paced   # this tree only

Each round starts the whole stack from the *before* tree, then from this one (the
services run with that tree as their working directory, so its code is what runs),
and measures 32-token streams straight to the mock and through the edge: `burst`
(the default) at concurrency 1 and 50 with no delay between tokens, `paced` at
concurrency 200 and 50 with 20 ms between tokens (each token then arrives in its
own read and leaves in its own write, so the per-chunk path dominates).
`--tokens N` changes the stream's length (32 content tokens, 35 events): the edge's
CPU per stream at two lengths splits into a fixed part and a part per event.
`--profile OUT` runs this tree once with the edge under `bench.profiled`, profiling
each shape's edge phase into `OUT.1`, `OUT.2`, … (read them with `pstats`).
Interleaving the two keeps a busy shared machine's drift out of the comparison; the
medians over the rounds are printed last.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
from pathlib import Path

import bench.stack as stack_module
from bench.edge_bench import Bench, Plan, _runner
from bench.report import CP, PathStats

Shape = tuple[tuple[int, int, int, int], ...]  # concurrency, streams, warm-up, delay ms
SHAPES: dict[str, Shape] = {
    "burst": ((1, 300, 20, 0), (50, 600, 50, 0)),
    "paced": ((200, 800, 50, 20), (50, 600, 50, 20)),
}


def measure(
    root: Path,
    pg_dsn: str,
    redis_url: str,
    shape: Shape,
    profile: Path | None = None,
    tokens: int = 32,
) -> dict[int, tuple[PathStats, PathStats]]:
    stack_module.ROOT = root
    plan = Plan("ab", tokens, (), 2, 0, 0, 0, 0)
    with (
        stack_module.BenchStack(pg_dsn, redis_url, edge_profile=profile) as stack,
        _runner() as runner,
    ):
        bench = Bench(stack, plan, lambda line: print(line, flush=True))

        async def go() -> dict[int, tuple[PathStats, PathStats]]:
            bench.users = stack.provision(users=2)
            out = {}
            for concurrency, streams, warmup, delay in shape:
                direct = await bench.direct(concurrency, delay, streams, warmup)
                tokens = await bench.mint(bench.body(0), warmup)
                tokens += await bench.mint(bench.body(delay), streams)
                await bench.quiesce()
                if profile is not None:
                    os.kill(stack.pid("edge"), signal.SIGUSR1)
                edge = await bench.edge(concurrency, delay, streams, warmup, tokens)
                if profile is not None:
                    os.kill(stack.pid("edge"), signal.SIGUSR2)
                out[concurrency] = (direct, edge)
            return out

        return runner.run(go())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ab_edge", description=__doc__)
    parser.add_argument("--before", type=Path)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="burst")
    parser.add_argument("--profile", type=Path, help="profile this tree's edge; no A/B")
    parser.add_argument(
        "--tokens",
        type=int,
        default=32,
        help="content tokens per stream (32); two lengths split a stream's CPU into a "
        "fixed part and a part per event (docs/edge-profile.md)",
    )
    parser.add_argument("--pg-dsn", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    args = parser.parse_args(argv)
    shape = SHAPES[args.shape]
    if args.profile is not None:
        profile = args.profile.resolve()
        measure(stack_module.ROOT, args.pg_dsn, args.redis_url, shape, profile, args.tokens)
        return 0
    if args.before is None:
        parser.error("--before is required unless --profile is given")
    trees = (("before", args.before.resolve()), ("after", stack_module.ROOT))
    rows: list[tuple[str, int, float, float, float, float, float, float]] = []
    for round_ in range(args.rounds):
        for name, root in trees:
            measured = measure(root, args.pg_dsn, args.redis_url, shape, tokens=args.tokens)
            for concurrency, (direct, edge) in measured.items():
                count = edge.streams + edge.errors
                row = (
                    name,
                    concurrency,
                    edge.ttft_ms[0] - direct.ttft_ms[0],
                    edge.server_cpu_s / count * 1000,
                    edge.cpu[CP] / count * 1000,
                    edge.streams_per_s / direct.streams_per_s,
                    edge.ttft_ms[1] - direct.ttft_ms[1],
                    edge.cpu_us_per_chunk,
                )
                rows.append(row)
                print(f"RESULT round {round_} {name} c={concurrency}: {row[2:]}", flush=True)
    for name, _ in trees:
        for concurrency, *_ in shape:
            picked = [r for r in rows if r[0] == name and r[1] == concurrency]
            print(
                f"{name:>6} c={concurrency:<3} TTFT p50 over direct "
                f"{statistics.median(r[2] for r in picked):+.2f} ms, edge CPU per stream "
                f"{statistics.median(r[3] for r in picked):.2f} ms, control plane "
                f"{statistics.median(r[4] for r in picked):.2f} ms, streams/s edge ÷ direct "
                f"{statistics.median(r[5] for r in picked):.2f}, TTFT p95 over direct "
                f"{statistics.median(r[6] for r in picked):+.1f} ms, edge CPU per event "
                f"{statistics.median(r[7] for r in picked):.0f} µs"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
