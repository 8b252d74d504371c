"""Turn measured phases into the results table, the verdicts and `docs/performance.md`.

Pure: no I/O, no clocks; `edge_bench` feeds it numbers and writes what it returns.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from bench.procfs import Machine

MB = 1024 * 1024
MODEL = "mock-fast"

# The targets.
TTFT_P50_C1_MS = 1.0
TTFT_P95_C200_MS = 5.0
CPU_PER_CHUNK_US = 50.0
MEMORY_LIMIT_MB = 500.0
MEMORY_STREAMS = 2000

# Columns of `PathStats.cpu`: our four processes, then everything else on the machine.
PROCESSES = ("generator", "mock", "edge", "control plane", "rest of the machine")
CP = PROCESSES.index("control plane")
OURS = slice(0, CP + 1)


# `make bench` rewrites docs/performance.md down to this line and keeps what follows:
# sections other benchmarks write (bench/key_hop_bench.py).
KEPT_MARKER = "<!-- sections below are written by other benchmarks; make bench keeps them -->"


def percentile(values: Sequence[float], q: float) -> float:
    """The `q`-th percentile (0 to 100), linear between closest ranks (NumPy's default)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True, slots=True)
class PathStats:
    """One path (direct to the mock, or through the edge) in one cell."""

    streams: int  # completed cleanly
    errors: int
    ttft_ms: tuple[float, float, float]  # p50, p95, p99
    streams_per_s: float
    chunks: int  # SSE events the client received
    server_cpu_s: float  # CPU of the process under test (mock or edge) over the phase
    mock_cpu_s: float  # the mock's CPU over the phase (the backend either way)
    cpu: tuple[float, ...] = ()  # CPU seconds of each process in `PROCESSES` over the phase

    @property
    def cpu_us_per_chunk(self) -> float:
        return self.server_cpu_s / self.chunks * 1e6 if self.chunks else math.nan

    @property
    def chunks_per_cpu_s(self) -> float:
        return self.chunks / self.server_cpu_s if self.server_cpu_s > 0 else math.nan


def path_stats(
    ttfts: Sequence[float],
    errors: int,
    wall_s: float,
    chunks: int,
    server_cpu_s: float,
    mock_cpu_s: float,
    cpu: tuple[float, ...] = (),
) -> PathStats:
    ms = [t * 1000 for t in ttfts]
    return PathStats(
        streams=len(ttfts),
        errors=errors,
        ttft_ms=(percentile(ms, 50), percentile(ms, 95), percentile(ms, 99)),
        streams_per_s=len(ttfts) / wall_s if wall_s > 0 else math.nan,
        chunks=chunks,
        server_cpu_s=server_cpu_s,
        mock_cpu_s=mock_cpu_s,
        cpu=cpu,
    )


@dataclass(frozen=True, slots=True)
class Cell:
    concurrency: int
    delay_ms: int
    direct: PathStats
    edge: PathStats

    def added_ms(self, index: int) -> float:
        return self.edge.ttft_ms[index] - self.direct.ttft_ms[index]


@dataclass(frozen=True, slots=True)
class MemoryResult:
    requested: int
    opened: int  # streams that got their first content event
    still_open: int  # of those, still open when the RSS was sampled
    failures: int
    open_seconds: float
    idle_rss: int  # bytes, just before opening
    open_rss: int  # bytes, highest sample while all were open
    peak_rss: int  # bytes, the edge's VmHWM after the test (its lifetime peak)

    @property
    def per_stream_kb(self) -> float:
        return (self.open_rss - self.idle_rss) / max(1, self.opened) / 1024


@dataclass(frozen=True, slots=True)
class Verdict:
    target: str
    measured: str
    met: bool | None  # None: this run was too small to judge the target
    margin: str

    @property
    def label(self) -> str:
        return "not judged" if self.met is None else "met" if self.met else "not met"


def _fmt(value: float, digits: int = 2) -> str:
    return "n/a" if math.isnan(value) else f"{value:.{digits}f}"


def verdicts(cells: Sequence[Cell], memory: MemoryResult | None) -> list[Verdict]:
    out: list[Verdict] = []

    def latency(concurrency: int, index: int, limit: float, label: str) -> None:
        picked = [c for c in cells if c.concurrency == concurrency]
        if not picked:
            return
        worst = max(c.added_ms(index) for c in picked)
        detail = ", ".join(f"{c.added_ms(index):+.2f} ms at {c.delay_ms} ms delay" for c in picked)
        out.append(
            Verdict(
                f"{label} through the edge ≤ {limit:g} ms above direct at concurrency "
                f"{concurrency}",
                detail,
                worst <= limit,
                f"{limit - worst:+.2f} ms of headroom"
                if worst <= limit
                else f"{worst - limit:.2f} ms over",
            )
        )

    latency(1, 0, TTFT_P50_C1_MS, "TTFT p50")
    latency(200, 1, TTFT_P95_C200_MS, "TTFT p95")
    per_chunk = [(c, c.edge.cpu_us_per_chunk) for c in cells if c.edge.chunks]
    if per_chunk:
        worst_cell, worst = max(per_chunk, key=lambda item: item[1])
        best = min(value for _, value in per_chunk)
        out.append(
            Verdict(
                f"edge CPU ≤ {CPU_PER_CHUNK_US:g} µs per relayed chunk",
                f"{best:.1f} to {worst:.1f} µs (worst at c={worst_cell.concurrency}, "
                f"{worst_cell.delay_ms} ms delay)",
                worst <= CPU_PER_CHUNK_US,
                f"{CPU_PER_CHUNK_US - worst:.1f} µs of headroom"
                if worst <= CPU_PER_CHUNK_US
                else f"{worst / CPU_PER_CHUNK_US:.1f} times the budget, "
                f"{worst - CPU_PER_CHUNK_US:.1f} µs over",
            )
        )
    if memory is not None:
        out.append(_memory_verdict(memory))
    return out


def _memory_verdict(memory: MemoryResult) -> Verdict:
    target = f"{MEMORY_STREAMS:,} open slow streams in < {MEMORY_LIMIT_MB:g} MB"
    measured_mb = memory.open_rss / MB
    if memory.still_open < 0.9 * MEMORY_STREAMS:
        how = f"only {memory.still_open:,} streams held open, edge RSS {measured_mb:.0f} MB"
        return Verdict(target, how, None, "a smaller run; run the full benchmark")
    if memory.still_open >= MEMORY_STREAMS:
        mb, how = measured_mb, f"{memory.still_open:,} open, edge RSS {measured_mb:.0f} MB"
    else:
        # A few streams failed to open: scale the measured per-stream increment up
        # to the target's count, and say so.
        mb = (memory.idle_rss + memory.per_stream_kb * 1024 * MEMORY_STREAMS) / MB
        how = (
            f"{memory.still_open:,} open, edge RSS {measured_mb:.0f} MB; "
            f"extrapolated to {MEMORY_STREAMS:,}: {mb:.0f} MB"
        )
    met = mb < MEMORY_LIMIT_MB
    margin = (
        f"{MEMORY_LIMIT_MB - mb:.0f} MB of headroom"
        if met
        else f"{mb - MEMORY_LIMIT_MB:.0f} MB over"
    )
    return Verdict(target, how, met, margin)


LATENCY_HEADER = (
    "| concurrency | delay | TTFT p50 direct / edge / Δ (ms) | TTFT p95 direct / edge / Δ (ms) "
    "| TTFT p99 direct / edge / Δ (ms) | streams (errors) direct / edge |"
)
THROUGHPUT_HEADER = (
    "| concurrency | delay | streams/s direct | streams/s edge | edge / direct "
    "| edge µs CPU / chunk | chunks / edge CPU-s | mock µs CPU / chunk (direct) |"
)


def _triple(cell: Cell, index: int) -> str:
    d, e = cell.direct.ttft_ms[index], cell.edge.ttft_ms[index]
    return f"{_fmt(d)} / {_fmt(e)} / {e - d:+.2f}"


def latency_rows(cells: Sequence[Cell]) -> list[str]:
    rows = [LATENCY_HEADER, "|" + "---|" * 6]
    for c in cells:
        rows.append(
            f"| {c.concurrency} | {c.delay_ms} ms | {_triple(c, 0)} | {_triple(c, 1)} "
            f"| {_triple(c, 2)} | {c.direct.streams} ({c.direct.errors}) / "
            f"{c.edge.streams} ({c.edge.errors}) |"
        )
    return rows


def throughput_rows(cells: Sequence[Cell]) -> list[str]:
    rows = [THROUGHPUT_HEADER, "|" + "---|" * 8]
    for c in cells:
        ratio = c.edge.streams_per_s / c.direct.streams_per_s if c.direct.streams_per_s else 0
        rows.append(
            f"| {c.concurrency} | {c.delay_ms} ms | {_fmt(c.direct.streams_per_s, 1)} "
            f"| {_fmt(c.edge.streams_per_s, 1)} | {ratio:.2f} "
            f"| {_fmt(c.edge.cpu_us_per_chunk, 1)} | {_fmt(c.edge.chunks_per_cpu_s, 0)} "
            f"| {_fmt(c.direct.cpu_us_per_chunk, 1)} |"
        )
    return rows


def memory_lines(memory: MemoryResult) -> list[str]:
    return [
        f"- streams held open through the edge: {memory.still_open:,} of {memory.requested:,} "
        f"requested ({memory.failures} failed to open), all open after "
        f"{memory.open_seconds:.1f} s",
        f"- edge RSS idle before: {memory.idle_rss / MB:.0f} MB; with all open: "
        f"{memory.open_rss / MB:.0f} MB; lifetime peak (VmHWM, includes the load phases): "
        f"{memory.peak_rss / MB:.0f} MB",
        f"- increment per open stream: {memory.per_stream_kb:.1f} KB",
    ]


def verdict_lines(items: Sequence[Verdict]) -> list[str]:
    return [f"- **{v.label}** — {v.target}: {v.measured} ({v.margin})" for v in items]


def stdout_table(cells: Sequence[Cell]) -> str:
    """A compact fixed-width table for the terminal (times in ms)."""
    head = (
        f"{'c':>4} {'delay':>6} | {'p50 dir':>8} {'p50 edge':>9} {'Δ':>9} | {'p95 dir':>8} "
        f"{'p95 edge':>9} {'Δ':>9} | {'p99 dir':>8} {'p99 edge':>9} {'Δ':>9} | "
        f"{'str/s dir':>9} {'str/s edge':>10} | {'µs/chunk':>8} {'chunks/cpu-s':>12} | "
        f"{'errors':>6}"
    )
    lines = [head, "-" * len(head)]
    for c in cells:
        d, e = c.direct, c.edge
        lines.append(
            f"{c.concurrency:>4} {c.delay_ms:>4}ms | {d.ttft_ms[0]:>8.2f} {e.ttft_ms[0]:>9.2f} "
            f"{c.added_ms(0):>+9.2f} | {d.ttft_ms[1]:>8.2f} {e.ttft_ms[1]:>9.2f} "
            f"{c.added_ms(1):>+9.2f} | {d.ttft_ms[2]:>8.2f} {e.ttft_ms[2]:>9.2f} "
            f"{c.added_ms(2):>+9.2f} | {d.streams_per_s:>9.1f} {e.streams_per_s:>10.1f} | "
            f"{e.cpu_us_per_chunk:>8.1f} {e.chunks_per_cpu_s:>12.0f} | "
            f"{d.errors + e.errors:>6}"
        )
    return "\n".join(lines)


def cpu_rows(cells: Sequence[Cell]) -> list[str]:
    rows = [
        "| concurrency | delay | path | streaming wall (s) | "
        + " | ".join(PROCESSES)
        + " | ms CPU per stream: server / control plane |",
        "|" + "---|" * (5 + len(PROCESSES)),
    ]
    for c in cells:
        for label, stats in (("direct", c.direct), ("edge", c.edge)):
            wall = stats.streams / stats.streams_per_s if stats.streams_per_s else math.nan
            spent = " | ".join(f"{value:.2f}" for value in stats.cpu)
            count = max(1, stats.streams + stats.errors)
            per_stream = f"{stats.server_cpu_s / count * 1000:.2f}"
            if stats.cpu:
                per_stream += f" / {stats.cpu[CP] / count * 1000:.2f}"
            rows.append(
                f"| {c.concurrency} | {c.delay_ms} ms | {label} | {_fmt(wall)} | {spent} "
                f"| {per_stream} |"
            )
    return rows


def reading_lines(cells: Sequence[Cell], cpus: int) -> list[str]:
    """What the CPU table implies: each edge stream's CPU across all processes caps
    how many streams per second the machine can carry through the edge."""
    edge_ms, cp_ms, ceiling = [], [], []
    for c in cells:
        count = c.edge.streams + c.edge.errors
        if not count or len(c.edge.cpu) != len(PROCESSES) or sum(c.edge.cpu[OURS]) <= 0:
            continue
        edge_ms.append(c.edge.server_cpu_s / count * 1000)
        cp_ms.append(c.edge.cpu[CP] / count * 1000)
        ceiling.append(cpus / (sum(c.edge.cpu[OURS]) / count))
    if not edge_ms:
        return []
    return [
        f"Through the edge, each stream cost {min(edge_ms):.1f} to {max(edge_ms):.1f} ms of "
        f"edge CPU and {min(cp_ms):.1f} to {max(cp_ms):.1f} ms of control-plane CPU "
        "(settling its usage webhook). Counting the CPU of the generator, the mock, the "
        f"edge and the control plane (not PostgreSQL or Redis), {cpus} CPUs carry at most "
        f"{min(ceiling):.0f} to {max(ceiling):.0f} such streams per second; where a cell "
        "offers more than that, time to first token through the edge is mostly time "
        "spent waiting for a CPU.",
        "",
    ]


def markdown(
    *,
    when: datetime,
    host: Machine,
    plan_name: str,
    tokens: int,
    cell_sizes: Sequence[tuple[int, int, int, int]],
    memory_body: tuple[int, int],
    cells: Sequence[Cell],
    memory: MemoryResult,
    verdicts: Sequence[Verdict],
    elapsed_s: float,
    load_before: float,
    gauge: tuple[float, float] | None = None,
    method_extra: Sequence[str] = (),
    results_extra: Sequence[str] = (),
    targets_extra: Sequence[str] = (),
) -> str:
    """The whole `docs/performance.md`."""
    sizes = [
        "| concurrency | delay | warm-up streams | measured streams (each path) |",
        "|---|---|---|---|",
        *(f"| {c} | {d} ms | {w} | {n} |" for c, d, n, w in cell_sizes),
    ]
    if any(n < c for c, _, n, _ in cell_sizes):
        sizes += ["", "(Where a cell has fewer streams than clients, that is its concurrency.)"]
    events = tokens + 3
    lines = [
        "# Performance",
        "",
        f"Generated by `make bench` (`python -m bench.edge_bench`, {plan_name} plan) on "
        f"{when:%Y-%m-%d %H:%M} UTC in {elapsed_s / 60:.1f} minutes. Every run overwrites "
        "this page; the numbers below are from one run, direct and edge measured "
        "side by side in it.",
        "",
        "## Machine",
        "",
        f"- {host.describe()}.",
        *(
            [
                f"- Speed gauge (`python -m timeit 'sum(range(10**6))'`, best of 5, this "
                f"Python): {gauge[0]:.1f} ms before the run, {gauge[1]:.1f} ms after. A shared "
                "VM's speed drifts from day to day: absolute figures from runs apart compare "
                "only at similar gauges; the ratios and deltas within one run always do."
            ]
            if gauge
            else []
        ),
        f"- 1-minute load average when the run started: {load_before:.2f}. The CPU table's "
        "last process column, *rest of the machine*, is every other process's CPU "
        "during the phase: PostgreSQL and Redis serving this run, plus whatever else ran; "
        "if it is large beyond them, something else shared the machine and the timings "
        "are pessimistic.",
        "- Everything runs on this one machine: the load generator, `mock-llm`, the control "
        "plane, the stream edge, PostgreSQL and Redis share its CPUs. During the edge "
        "phases the control plane works too: it settles every stream's usage webhook "
        "(its column in the CPU table below). When the CPUs are saturated, the other "
        "processes take CPU the edge would otherwise have, so absolute throughput is a "
        "floor; the deltas against direct, measured back to back in the same run, "
        "compare like with like.",
        "",
        "## Method",
        "",
        "- **Processes.** `python -m llm_gateway.cli mock-llm | control-plane | stream-edge` "
        "on free loopback ports, as separate processes, on PostgreSQL (a throwaway "
        "database) and Redis (a throwaway key prefix), `LLMGW_LOG_LEVEL=WARNING`. "
        "Concurrent-stream and init-rate limits are set far above the load. uvicorn's "
        "access log is on, as shipped; at `WARNING` its per-request `INFO` record is "
        "dropped at the logger's level check, so it costs next to nothing here (at the "
        "default `INFO` level every stream also formats, redacts and writes one line).",
        f"- **Load.** Every stream is the same `POST /v1/chat/completions` body with "
        f"`stream: true`, model `{MODEL}` and a `[[mock tokens={tokens} first_ms=0 "
        "delay_ms=D]]` directive, sent straight to the mock (*direct*) and to the edge "
        "with `Authorization: Bearer <stream token>` (*edge*). Stream tokens are minted "
        "with `POST /v1/chat/init` before each edge phase, outside the clock. Each stream "
        f"carries {events} SSE events (role, {tokens} content deltas, finish, "
        "`[DONE]`).",
        "- **Generator.** One process, asyncio on uvloop, one keep-alive HTTP/1.1 "
        "connection per concurrent client (opened before the clock starts), responses "
        "parsed with `httptools`; it reads only as far as it must: the first event with "
        "non-empty `content`, the event count, the final `[DONE]`.",
        "- **Cells.** For each cell a warm-up (0 ms delay, not counted), then the measured "
        "streams, direct first and then through the edge:",
        "",
        *sizes,
        "",
        "- **Time to first token (TTFT):** from writing the request to reading the first "
        "content event. **Streams/s:** measured streams over the phase's wall time. "
        "Percentiles interpolate linearly between ranks (with fewer than 100 streams, "
        "p99 is close to the slowest one). Counts are bounded by the run time: the "
        "whole run, with minting and setup, should stay under ten minutes.",
        "- **Edge CPU per relayed chunk:** the edge's `utime + stime` from "
        "`/proc/<pid>/stat` across the measured phase, up to the delivery of its last "
        "usage webhook, divided by the SSE events its clients received. It therefore "
        "includes each stream's fixed costs (token verification, the single-use claim "
        "in Redis, the upstream request, the usage report and its webhook) spread over "
        f"{events} events. The mock's CPU per chunk in the direct phase is the reference "
        "for what serving the same events costs.",
        f"- **Memory:** {memory.requested:,} slow streams (`tokens={memory_body[0]} "
        f"delay_ms={memory_body[1]}`) opened through the edge, at most a few hundred "
        "opening at once; once every stream has its first content event, the edge's "
        "`VmRSS` is sampled ten times over a second and the highest is reported, against "
        "its `VmRSS` just before.",
        *method_extra,
        "",
        "## Results",
        "",
        "### Time to first token",
        "",
        *latency_rows(cells),
        "",
        "### Throughput and CPU",
        "",
        *throughput_rows(cells),
        "",
        "### CPU seconds spent by each process during each measured phase",
        "",
        *cpu_rows(cells),
        "",
        *reading_lines(cells, host.cpus),
        *results_extra,
        "## Memory",
        "",
        *memory_lines(memory),
        "",
        "## Targets",
        "",
        *verdict_lines(verdicts),
        "",
        *targets_extra,
    ]
    return "\n".join(lines)
