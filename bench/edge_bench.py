"""The edge benchmark: the same streamed load against `mock_llm` directly and through
the stream edge, in one run, and what the edge costs in latency, CPU and memory.

    python -m bench.edge_bench            # full run (~6 min), writes docs/performance.md
    python -m bench.edge_bench --quick    # a smoke run in well under a minute

For each (concurrency, inter-token delay) cell it runs a warm-up and then the
measured streams, first straight to the mock and then through the edge (stream
tokens minted beforehand, outside the clock), and reads each process's CPU time
from /proc around the phase. Then it holds thousands of slow streams open through
the edge and samples its resident memory.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import resource
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from bench import report, turns
from bench import turn_report as tr
from bench.procfs import (
    cpu_seconds,
    load_average,
    machine,
    machine_busy_seconds,
    memory,
    speed_gauge_ms,
)
from bench.sse_client import OpenStreams, Pool, StreamResult, chat_request
from bench.stack import ROOT, BenchStack, mint

HOST = "127.0.0.1"
MODEL = "mock-fast"
SERVICES = ("generator", "mock", "edge", "cp")


@dataclass(frozen=True, slots=True)
class CellPlan:
    concurrency: int
    delay_ms: int
    streams: int
    warmup: int


@dataclass(frozen=True, slots=True)
class Plan:
    name: str
    tokens: int  # content tokens per stream
    cells: tuple[CellPlan, ...]
    users: int  # owners of one company; stream tokens are minted round-robin across them
    memory_streams: int
    memory_tokens: int
    memory_delay_ms: int
    memory_ramp: int
    inits: tuple[tr.InitPlan, ...] = ()
    turns: tuple[tr.TurnPlan, ...] = ()
    loaded: tr.LoadedPlan | None = None


FULL = Plan(
    name="full",
    tokens=32,
    cells=(
        CellPlan(1, 0, 300, 10),
        CellPlan(1, 20, 40, 3),
        CellPlan(50, 0, 600, 25),
        CellPlan(50, 20, 600, 25),
        CellPlan(200, 0, 800, 50),
        CellPlan(200, 20, 800, 50),
    ),
    users=8,
    memory_streams=2000,
    memory_tokens=40,
    memory_delay_ms=5000,
    memory_ramp=200,
    # A p99 needs samples: 2,000 inits a phase put it at the 20th slowest, not the 4th.
    inits=(tr.InitPlan(1, 300, 10), tr.InitPlan(32, 2000, 64), tr.InitPlan(128, 2000, 128)),
    turns=(
        tr.TurnPlan(1, 0, 300, 10),
        tr.TurnPlan(200, 20, 800, 50),
        tr.TurnPlan(200, 20, 800, 50, spread=True),
    ),
    loaded=tr.LoadedPlan(150, 10, 8),
)
QUICK = Plan(
    name="quick",
    tokens=4,
    cells=(
        CellPlan(1, 0, 10, 1),
        CellPlan(1, 20, 2, 1),
        CellPlan(50, 0, 30, 2),
        CellPlan(50, 20, 30, 2),
        # Fewer streams than clients: a smoke run checks the path, not the numbers.
        CellPlan(200, 0, 40, 2),
        CellPlan(200, 20, 40, 2),
    ),
    users=2,
    memory_streams=20,
    memory_tokens=20,
    memory_delay_ms=1000,
    memory_ramp=20,
    inits=(tr.InitPlan(1, 5, 1), tr.InitPlan(32, 20, 2), tr.InitPlan(128, 20, 2)),
    turns=(
        tr.TurnPlan(1, 0, 5, 1),
        tr.TurnPlan(200, 20, 20, 2),
        tr.TurnPlan(200, 20, 20, 2, spread=True),
    ),
    loaded=tr.LoadedPlan(5, 1, 2),
)


def chat_body(tokens: int, delay_ms: int) -> dict[str, Any]:
    """The one request body both paths get (the directive scripts the mock)."""
    directive = f"[[mock tokens={tokens} first_ms=0 delay_ms={delay_ms}]]"
    return {
        "model": MODEL,
        "stream": True,
        "messages": [{"role": "user", "content": f"Benchmark the relay, please. {directive}"}],
    }


def raise_fd_limit() -> None:
    """Thousands of sockets: lift the soft limit to the hard one (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Bench:
    def __init__(self, stack: BenchStack, plan: Plan, log: Callable[[str], None]) -> None:
        self.stack = stack
        self.plan = plan
        self.log = log
        self.users: list[str] = []
        self.init_users: list[str] = []  # see `turns.init_users`

    def cpu(self) -> dict[str, float]:
        out = {name: cpu_seconds(self.stack.pid(name)) for name in ("mock", "edge", "cp")}
        out["generator"] = own_cpu_seconds()
        out["machine"] = machine_busy_seconds()
        return out

    async def quiesce(self, timeout: float = 60.0) -> None:
        """Wait until every usage webhook is delivered and the edge has gone idle, so
        one phase's tail never lands in the next phase's CPU or latency."""
        deadline = time.monotonic() + timeout
        edge = self.stack.pid("edge")
        last = cpu_seconds(edge)
        idle_windows = 0
        while time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            for name in ("mock", "cp", "edge"):
                self.stack.check_alive(name)
            now = cpu_seconds(edge)
            # At most one clock tick of CPU in 100 ms; twice in a row, outbox empty.
            idle_windows = idle_windows + 1 if now - last <= 0.011 else 0
            last = now
            if idle_windows >= 2 and self.stack.outbox_pending() == 0:
                return
        self.log(f"  (still busy after {timeout:.0f} s; outbox {self.stack.outbox_pending()})")

    async def mint(self, body: dict[str, Any], count: int) -> list[str]:
        started = time.perf_counter()
        tokens = await mint(self.stack.urls["cp"], self.users, body, count)
        self.log(f"  minted {count} stream tokens in {time.perf_counter() - started:.1f} s")
        return tokens

    async def phase(
        self,
        port: int,
        server: str,
        concurrency: int,
        warmup: list[bytes],
        measured: list[bytes],
        ramp_s: float = 0.0,
    ) -> report.PathStats:
        pool = Pool(HOST, port, concurrency)
        await pool.open()
        try:
            await pool.run(warmup)
            await self.quiesce()
            before = self.cpu()
            run = await pool.run(measured, ramp_s=ramp_s)
            if server == "edge":
                await self.quiesce()  # the webhooks are part of what a stream costs
            after = self.cpu()
        finally:
            pool.close()
        spent = {name: after[name] - before[name] for name in (*SERVICES, "machine")}
        # Everyone else: PostgreSQL and Redis serving this run, and any other load.
        rest = max(0.0, spent["machine"] - sum(spent[name] for name in SERVICES))
        good = [r for r in run.results if r.ok]
        failures = Counter(_failure(r) for r in run.results if not r.ok)
        for failure, count in failures.most_common(3):
            self.log(f"  {server} phase: {count} failed: {failure}")
        return report.path_stats(
            ttfts=[r.ttft for r in good if r.ttft is not None],
            errors=len(run.results) - len(good),
            wall_s=run.wall,
            chunks=sum(r.events for r in run.results),
            server_cpu_s=spent[server],
            mock_cpu_s=spent["mock"],
            cpu=(*(spent[name] for name in SERVICES), rest),
        )

    def body(self, delay_ms: int) -> dict[str, Any]:
        return chat_body(self.plan.tokens, delay_ms)

    async def direct(
        self, concurrency: int, delay_ms: int, streams: int, warmup: int, ramp_s: float = 0.0
    ) -> report.PathStats:
        """`streams` streams straight to the mock, `concurrency` at a time (the first
        of each client `ramp_s` spread, see `sse_client.ramp_delay`)."""
        port = self.stack.ports["mock"]
        warm, raw = orjson.dumps(self.body(0)), orjson.dumps(self.body(delay_ms))
        stats = await self.phase(
            port,
            "mock",
            concurrency,
            [chat_request(HOST, port, warm)] * warmup,
            [chat_request(HOST, port, raw)] * streams,
            ramp_s,
        )
        self.log(_summary("direct", stats))
        return stats

    async def edge(
        self,
        concurrency: int,
        delay_ms: int,
        streams: int,
        warmup: int,
        tokens: list[str] | None = None,
    ) -> report.PathStats:
        """The same through the edge; `tokens` (warm-up ones first, minted with the
        0 ms body) when they were minted beforehand, else minted here."""
        port = self.stack.ports["edge"]
        warm, raw = orjson.dumps(self.body(0)), orjson.dumps(self.body(delay_ms))
        if tokens is None:
            tokens = await self.mint(self.body(0), warmup)
            tokens += await self.mint(self.body(delay_ms), streams)
            await self.quiesce()
        stats = await self.phase(
            port,
            "edge",
            concurrency,
            [chat_request(HOST, port, warm, t) for t in tokens[:warmup]],
            [chat_request(HOST, port, raw, t) for t in tokens[warmup : warmup + streams]],
        )
        self.log(_summary("edge", stats))
        return stats

    async def cell(self, cell: CellPlan) -> report.Cell:
        self.log(f"cell: concurrency {cell.concurrency}, {cell.delay_ms} ms between tokens")
        c, d = cell.concurrency, cell.delay_ms
        direct = await self.direct(c, d, cell.streams, cell.warmup)
        edge = await self.edge(c, d, cell.streams, cell.warmup)
        return report.Cell(c, d, direct, edge)

    async def memory(self) -> report.MemoryResult:
        plan = self.plan
        self.log(f"memory: {plan.memory_streams} slow streams held open through the edge")
        body = chat_body(plan.memory_tokens, plan.memory_delay_ms)
        tokens = await self.mint(body, plan.memory_streams)
        await self.quiesce()
        edge_pid, port, raw = self.stack.pid("edge"), self.stack.ports["edge"], orjson.dumps(body)
        idle = memory(edge_pid).rss
        streams = OpenStreams()
        try:
            took = await streams.open(
                HOST, port, [chat_request(HOST, port, raw, t) for t in tokens], plan.memory_ramp
            )
            open_rss = 0
            for _ in range(10):
                open_rss = max(open_rss, memory(edge_pid).rss)
                await asyncio.sleep(0.1)
            still_open = streams.still_open
        finally:
            # The last phase: the edge cancels these and reports them while it stops;
            # nothing after this needs it idle.
            streams.close()
        for failure, count in streams.failures.most_common(3):
            self.log(f"  memory phase: {count} failed: {failure}")
        result = report.MemoryResult(
            requested=plan.memory_streams,
            opened=streams.opened,
            still_open=still_open,
            failures=sum(streams.failures.values()),
            open_seconds=took,
            idle_rss=idle,
            open_rss=open_rss,
            peak_rss=memory(edge_pid).peak,
        )
        for line in report.memory_lines(result):
            self.log("  " + line.removeprefix("- "))
        return result

    async def whole_turns(self) -> tr.TurnResults:
        inits = [await turns.init_phase(self, p) for p in self.plan.inits]
        whole = [await turns.turn_phase(self, p) for p in self.plan.turns]
        loaded = await turns.loaded_ttft(self, self.plan.loaded) if self.plan.loaded else None
        return tr.TurnResults(inits, whole, loaded)

    async def run(self) -> tuple[list[report.Cell], report.MemoryResult, tr.TurnResults]:
        self.users = self.stack.provision(users=self.plan.users)
        cells = [await self.cell(cell) for cell in self.plan.cells]
        turn_results = await self.whole_turns()
        mem = await self.memory()
        for name in ("edge", "mock", "cp"):
            problems = self.stack.problems(name)
            if problems:
                self.log(f"{name} logged {len(problems)} warnings/errors, the last ones:")
                for line in problems[-5:]:
                    self.log("  " + line[:300])
        return cells, mem, turn_results


def _failure(result: StreamResult) -> str:
    if result.error:
        return result.error
    if result.status != 200:
        return f"HTTP {result.status}"
    return "no [DONE]" if not result.done else "no content event"


def _summary(label: str, stats: report.PathStats) -> str:
    p50, p95, p99 = stats.ttft_ms
    return (
        f"  {label:>6}: {stats.streams} streams ({stats.errors} errors), TTFT p50 {p50:.2f} "
        f"p95 {p95:.2f} p99 {p99:.2f} ms, {stats.streams_per_s:.1f} streams/s, "
        f"{stats.cpu_us_per_chunk:.1f} µs CPU/chunk"
    )


def _runner() -> asyncio.Runner:
    # The generator competes with the services for the CPUs: use the leaner loop.
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvicorn[standard] brings it
        return asyncio.Runner()
    return asyncio.Runner(loop_factory=uvloop.new_event_loop)


def run(
    plan: Plan, pg_dsn: str, redis_url: str, log: Callable[[str], None]
) -> tuple[list[report.Cell], report.MemoryResult, tr.TurnResults, float]:
    started = time.monotonic()
    cpus = machine().cpus
    if load_average() > cpus / 2:
        log(
            f"warning: the 1-minute load average is {load_average():.1f} on {cpus} CPUs; "
            "other work on this machine will distort the numbers"
        )
    with BenchStack(pg_dsn, redis_url) as stack, _runner() as runner:
        bench = Bench(stack, plan, log)
        coro: Coroutine[Any, Any, tuple[list[report.Cell], report.MemoryResult, tr.TurnResults]] = (
            bench.run()
        )
        cells, mem, turn_results = runner.run(coro)
    return cells, mem, turn_results, time.monotonic() - started


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.edge_bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny counts, for a smoke run")
    parser.add_argument(
        "--output",
        type=Path,
        default=ROOT / "docs" / "performance.md",
        help="where to write the report (default: docs/performance.md)",
    )
    parser.add_argument("--pg-dsn", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    return parser.parse_args(argv)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    # Unwind normally so the stack stops its processes and drops its database.
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = QUICK if args.quick else FULL
    raise_fd_limit()
    signal.signal(signal.SIGTERM, _exit_on_sigterm)

    started = time.monotonic()

    def log(line: str) -> None:
        print(f"[{time.monotonic() - started:6.1f} s] {line}", flush=True)

    load_before, gauge_before = load_average(), speed_gauge_ms()
    cells, mem, turn_results, elapsed = run(plan, args.pg_dsn, args.redis_url, log)
    gauge = (gauge_before, speed_gauge_ms())
    log(f"speed gauge: {gauge[0]:.1f} ms before, {gauge[1]:.1f} ms after")
    verdicts = report.verdicts(cells, mem)
    print()
    print(report.stdout_table(cells))
    print()
    for line in report.memory_lines(mem) + report.verdict_lines(verdicts):
        print(line)
    print()
    for line in tr.target_section(cells, turn_results):
        print(line)
    document = report.markdown(
        when=datetime.now(UTC),
        host=machine(),
        plan_name=plan.name,
        tokens=plan.tokens,
        cell_sizes=[(c.concurrency, c.delay_ms, c.streams, c.warmup) for c in plan.cells],
        memory_body=(plan.memory_tokens, plan.memory_delay_ms),
        cells=cells,
        memory=mem,
        verdicts=verdicts,
        elapsed_s=elapsed,
        load_before=load_before,
        gauge=gauge,
        method_extra=tr.method_lines(),
        results_extra=tr.markdown_sections(cells, turn_results),
        targets_extra=tr.target_section(cells, turn_results),
    )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    # Sections other benchmarks write below the marker (key_hop_bench.py) stay.
    previous = args.output.read_text() if args.output.exists() else ""
    if report.KEPT_MARKER in previous:
        kept = previous.split(report.KEPT_MARKER, 1)[1]
        document = f"{document.rstrip()}\n\n{report.KEPT_MARKER}{kept}"
    args.output.write_text(document)
    with contextlib.suppress(ValueError):
        print(f"\nwrote {args.output.resolve().relative_to(Path.cwd())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
