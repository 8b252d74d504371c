"""A/B the edge: an older tree against this one, interleaved, on the bench stack.

    git archive <commit> | tar -x -C /tmp/before
    python -m bench.ab_edge --before /tmp/before [--rounds 2]

Each round starts the whole stack from the *before* tree, then from this one (the
services run with that tree as their working directory, so its code is what runs),
and measures concurrency-1 and concurrency-50 streams (32 tokens, no delay) straight
to the mock and through the edge. Interleaving the two keeps a busy shared machine's
drift out of the comparison; the medians over the rounds are printed last.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import bench.stack as stack_module
from bench.edge_bench import Bench, Plan, _runner
from bench.report import CP, PathStats

SHAPES = ((1, 300, 20), (50, 600, 50))  # concurrency, streams, warm-up


def measure(root: Path, pg_dsn: str, redis_url: str) -> dict[int, tuple[PathStats, PathStats]]:
    stack_module.ROOT = root
    plan = Plan("ab", 32, (), 2, 0, 0, 0, 0)
    with stack_module.BenchStack(pg_dsn, redis_url) as stack, _runner() as runner:
        bench = Bench(stack, plan, lambda line: print(line, flush=True))

        async def go() -> dict[int, tuple[PathStats, PathStats]]:
            bench.users = stack.provision(users=2)
            out = {}
            for concurrency, streams, warmup in SHAPES:
                direct = await bench.direct(concurrency, 0, streams, warmup)
                out[concurrency] = (direct, await bench.edge(concurrency, 0, streams, warmup))
            return out

        return runner.run(go())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ab_edge", description=__doc__)
    parser.add_argument("--before", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--pg-dsn", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    args = parser.parse_args(argv)
    trees = (("before", args.before.resolve()), ("after", stack_module.ROOT))
    rows: list[tuple[str, int, float, float, float, float]] = []
    for round_ in range(args.rounds):
        for name, root in trees:
            for concurrency, (direct, edge) in measure(root, args.pg_dsn, args.redis_url).items():
                count = edge.streams + edge.errors
                row = (
                    name,
                    concurrency,
                    edge.ttft_ms[0] - direct.ttft_ms[0],
                    edge.server_cpu_s / count * 1000,
                    edge.cpu[CP] / count * 1000,
                    edge.streams_per_s / direct.streams_per_s,
                )
                rows.append(row)
                print(f"RESULT round {round_} {name} c={concurrency}: {row[2:]}", flush=True)
    for name, _ in trees:
        for concurrency, *_ in SHAPES:
            picked = [r for r in rows if r[0] == name and r[1] == concurrency]
            print(
                f"{name:>6} c={concurrency:<3} TTFT p50 over direct "
                f"{statistics.median(r[2] for r in picked):+.2f} ms, edge CPU per stream "
                f"{statistics.median(r[3] for r in picked):.2f} ms, control plane "
                f"{statistics.median(r[4] for r in picked):.2f} ms, streams/s edge ÷ direct "
                f"{statistics.median(r[5] for r in picked):.2f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
