"""The whole turn: `POST /v1/chat/init`, the stream through the edge, the settlement.

Three kinds of phase, all on the stack `edge_bench` runs:

- **init**: only `/v1/chat/init`, at a given concurrency: inits per second, latency
  and the control plane's CPU per init.
- **turn**: what a user's chat turn is: init, then the stream with the token it
  returned, then (in the background) the usage webhook that settles the hold. Per
  turn: each process's CPU, time to first token from the start of the init, and the
  time from the stream's last byte until the ledger shows the hold settled (read
  from the database, `reservations.settled_at`). The same streams straight to the
  mock, just before, are the reference.
- **loaded TTFT**: concurrency-1 streams through the edge with the control plane
  idle, then again while a background load keeps it busy minting tokens.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import orjson

from bench import turn_report as tr
from bench.report import percentile
from bench.sse_client import Pool, chat_request, init_request, ramp_delay

if TYPE_CHECKING:
    from bench.edge_bench import Bench

HOST = "127.0.0.1"
PHASE_PROCESSES = ("generator", "mock", "edge", "cp")


@dataclass(frozen=True, slots=True)
class TurnResult:
    ok: bool
    init_s: float = 0.0
    ttft_s: float | None = None  # from writing the init to the first content event
    stream_ttft_s: float | None = None  # from writing the stream request
    ended_at: float = 0.0  # epoch seconds when the stream's last byte arrived
    reservation_id: str = ""
    error: str = ""


def _triple(values: list[float]) -> tuple[float, float, float]:
    ms = [v * 1000 for v in values]
    return (percentile(ms, 50), percentile(ms, 95), percentile(ms, 99))


def _spent(before: dict[str, float], after: dict[str, float]) -> tuple[float, ...]:
    spent = {name: after[name] - before[name] for name in (*PHASE_PROCESSES, "machine")}
    rest = max(0.0, spent["machine"] - sum(spent[name] for name in PHASE_PROCESSES))
    return (*(spent[name] for name in PHASE_PROCESSES), rest)


def init_users(bench: Bench) -> list[str]:
    """Users for a phase whose tokens are never streamed, with no grants pending. Each
    init reads its user's set of pending (unstarted) grants, so grants piling up from
    one init phase to the next would slow every later init: the stack forgets them
    (their holds stay until their deadline, as any abandoned init's do)."""
    if not bench.init_users:
        bench.init_users = bench.stack.provision(users=bench.plan.users)
    else:
        bench.stack.forget_pending_inits()
    return bench.init_users


class InitLoad:
    """Keeps the control plane busy minting tokens until stopped (the *busy* case)."""

    def __init__(self, bench: Bench, concurrency: int) -> None:
        self._bench = bench
        self._concurrency = concurrency
        self._stop = False
        self._task: asyncio.Task[None] | None = None
        self._users: list[str] = []
        self.done = 0
        self.started = 0.0
        self.stopped = 0.0

    async def __aenter__(self) -> InitLoad:
        self._users = init_users(self._bench)
        self._task = asyncio.create_task(self._run())
        self.started = time.perf_counter()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop = True
        if self._task is not None:
            await self._task
        self.stopped = time.perf_counter()

    @property
    def per_s(self) -> float:
        wall = self.stopped - self.started
        return self.done / wall if wall > 0 else 0.0

    async def _run(self) -> None:
        stack, users = self._bench.stack, self._users
        port = stack.ports["cp"]
        body = orjson.dumps(self._bench.body(0))
        pool = Pool(HOST, port, self._concurrency)
        await pool.open()

        async def client(slot: int) -> None:
            while not self._stop:
                request = init_request(HOST, port, body, users[self.done % len(users)])
                result = await (await pool.slot(slot)).send(request, keep_body=True)
                if result.status != 201:
                    raise RuntimeError(f"background init answered {result.status}")
                self.done += 1

        try:
            await asyncio.gather(*(client(i) for i in range(self._concurrency)))
        finally:
            pool.close()


async def init_phase(bench: Bench, plan: tr.InitPlan) -> tr.InitStats:
    bench.log(f"init: concurrency {plan.concurrency}, {plan.inits} inits")
    port = bench.stack.ports["cp"]
    body = orjson.dumps(bench.body(0))
    users = init_users(bench)

    def requests(count: int) -> list[bytes]:
        return [init_request(HOST, port, body, users[i % len(users)]) for i in range(count)]

    pool = Pool(HOST, port, plan.concurrency)
    await pool.open()
    try:
        await pool.run(requests(plan.warmup), keep_body=True)
        await bench.quiesce()
        before = bench.cpu()
        run = await pool.run(requests(plan.inits), keep_body=True)
        after = bench.cpu()
    finally:
        pool.close()
    good = [r for r in run.results if r.status == 201 and r.error is None]
    stats = tr.InitStats(
        concurrency=plan.concurrency,
        inits=len(good),
        errors=len(run.results) - len(good),
        latency_ms=_triple([r.duration for r in good]),
        per_s=len(good) / run.wall if run.wall > 0 else 0.0,
        cpu=_spent(before, after),
    )
    bench.log("  " + tr.init_summary(stats))
    return stats


async def _turns(
    bench: Bench, concurrency: int, body: bytes, count: int, ramp_s: float = 0.0
) -> list[TurnResult]:
    """`count` whole turns, `concurrency` at a time, each client on its own pair of
    keep-alive connections (control plane, edge)."""
    cp_port, edge_port = bench.stack.ports["cp"], bench.stack.ports["edge"]
    users = bench.users
    cp, edge = Pool(HOST, cp_port, concurrency), Pool(HOST, edge_port, concurrency)
    await asyncio.gather(cp.open(), edge.open())
    results: list[TurnResult] = []
    next_index = 0

    async def turn(slot: int, index: int) -> TurnResult:
        request = init_request(HOST, cp_port, body, users[index % len(users)])
        wall, started = time.time(), time.perf_counter()
        init = await (await cp.slot(slot)).send(request, keep_body=True)
        if init.status != 201 or init.error:
            return TurnResult(False, error=init.error or f"init answered {init.status}")
        data = orjson.loads(init.body)["data"]
        stream_request = chat_request(HOST, edge_port, body, data["stream_token"])
        stream = await (await edge.slot(slot)).send(stream_request)
        ended = wall + (stream.sent_at + stream.duration - started)
        if not stream.ok or stream.ttft is None:
            return TurnResult(False, error=stream.error or f"stream answered {stream.status}")
        return TurnResult(
            True,
            init_s=init.duration,
            ttft_s=stream.sent_at - started + stream.ttft,
            stream_ttft_s=stream.ttft,
            ended_at=ended,
            reservation_id=data["reservation_id"],
        )

    async def client(slot: int) -> None:
        nonlocal next_index
        await asyncio.sleep(ramp_delay(slot, concurrency, ramp_s))
        while next_index < count:
            index = next_index
            next_index += 1
            results.append(await turn(slot, index))

    try:
        await asyncio.gather(*(client(slot) for slot in range(min(concurrency, count))))
    finally:
        cp.close()
        edge.close()
    return results


async def turn_phase(bench: Bench, plan: tr.TurnPlan) -> tr.TurnStats:
    # One answer's length: the spread clients' first requests fall within it.
    ramp_s = bench.plan.tokens * plan.delay_ms / 1000 if plan.spread else 0.0
    bench.log(
        f"turns: concurrency {plan.concurrency}, {plan.delay_ms} ms between tokens, "
        f"{plan.turns} turns" + (f", starts spread over {ramp_s:.2f} s" if ramp_s else "")
    )
    body = orjson.dumps(bench.body(plan.delay_ms))
    direct = await bench.direct(
        plan.concurrency, plan.delay_ms, plan.turns, plan.warmup, ramp_s=ramp_s
    )
    await _turns(bench, plan.concurrency, orjson.dumps(bench.body(0)), plan.warmup)
    await bench.quiesce()
    before = bench.cpu()
    started = time.perf_counter()
    results = await _turns(bench, plan.concurrency, body, plan.turns, ramp_s)
    wall = time.perf_counter() - started
    await bench.quiesce()  # every webhook delivered: the settlements are in the CPU
    after = bench.cpu()
    good = [r for r in results if r.ok]
    settled = bench.stack.settlements([r.reservation_id for r in good])
    settle_s = [
        max(0.0, settled[r.reservation_id] - r.ended_at)
        for r in good
        if r.reservation_id in settled
    ]
    for error in sorted({r.error for r in results if not r.ok})[:3]:
        bench.log(f"  turn failed: {error}")
    stats = tr.TurnStats(
        concurrency=plan.concurrency,
        delay_ms=plan.delay_ms,
        turns=len(good),
        errors=len(results) - len(good),
        settled=len(settle_s),
        init_ms=_triple([r.init_s for r in good]),
        ttft_ms=_triple([r.ttft_s for r in good if r.ttft_s is not None]),
        stream_ttft_ms=_triple([r.stream_ttft_s for r in good if r.stream_ttft_s is not None]),
        settle_ms=_triple(settle_s),
        turns_per_s=len(good) / wall if wall > 0 else 0.0,
        cpu=_spent(before, after),
        direct=direct,
        spread=plan.spread,
    )
    bench.log("  " + tr.turn_summary(stats))
    return stats


async def loaded_ttft(bench: Bench, plan: tr.LoadedPlan) -> tr.LoadedTtft:
    bench.log(
        f"TTFT at concurrency 1 with the control plane idle, then busy "
        f"({plan.busy_concurrency} clients minting tokens)"
    )
    direct_idle = await bench.direct(1, 0, plan.streams, plan.warmup)
    idle = await bench.edge(1, 0, plan.streams, plan.warmup)
    tokens = await bench.mint(bench.body(0), plan.streams + plan.warmup)
    async with InitLoad(bench, plan.busy_concurrency) as load:
        direct_busy = await bench.direct(1, 0, plan.streams, plan.warmup)
        busy = await bench.edge(1, 0, plan.streams, plan.warmup, tokens=tokens)
    result = tr.LoadedTtft(direct_idle, idle, direct_busy, busy, load.per_s)
    for line in tr.loaded_lines(result):
        bench.log("  " + line.removeprefix("- "))
    return result
