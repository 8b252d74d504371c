"""Micro-benchmark: one upstream stream through httpx vs `stream_edge.http1`.

    python -m bench.http1_bench                       # 2000 requests per client, uvloop
    python -m bench.http1_bench --loop asyncio --requests 500

Starts `mock-llm` in a subprocess (its CPU is not counted), then sends sequential
streamed chat completions of 32 tokens exactly as the edge does (POST, read the body
raw, close) through `httpx.AsyncClient` and through `Http1Client`, in alternating
rounds so drift on the machine hits both alike. It reports this process's CPU time
per request (getrusage, the median over rounds) and the median time from sending the
request to the first body byte.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import resource
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import httpx

from stream_edge.http1 import Http1Client

ROOT = Path(__file__).resolve().parent.parent
BODY = (
    b'{"model":"mock-fast","stream":true,"messages":[{"role":"user",'
    b'"content":"hi [[mock tokens=32 first_ms=0 delay_ms=0]]"}]}'
)
HEADERS = {
    "Content-Type": "application/json",
    "Accept": "text/event-stream",
    "Authorization": "Bearer sk-bench",
}
Stream = Callable[[], Awaitable[float]]  # one request; returns seconds to the first byte


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def mock_llm() -> Iterator[str]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "llm_gateway.cli", "mock-llm", "--port", str(port)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{base}/healthz").status_code == 200:
                    break
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("mock-llm did not start")
            time.sleep(0.1)
        yield f"{base}/v1/chat/completions"
    finally:
        process.terminate()
        process.wait(10)


def via_httpx(client: httpx.AsyncClient, url: str) -> Stream:
    async def one() -> float:
        started = time.perf_counter()
        request = client.build_request("POST", url, headers=HEADERS, content=BODY)
        response = await client.send(request, stream=True)
        return await _drain(started, response.aiter_raw(), response.aclose)

    return one


def via_http1(client: Http1Client, url: str) -> Stream:
    async def one() -> float:
        started = time.perf_counter()
        response = await client.send("POST", url, HEADERS, BODY)
        return await _drain(started, response.aiter_raw(), response.aclose)

    return one


async def _drain(
    started: float, body: AsyncIterator[bytes], aclose: Callable[[], Awaitable[None]]
) -> float:
    first: float | None = None
    last = b""
    async for piece in body:
        if first is None:
            first = time.perf_counter() - started
        last = piece
    await aclose()
    if first is None or b"[DONE]" not in last:
        raise RuntimeError("the stream did not end with [DONE]")
    return first


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def measure(stream: Stream, requests: int) -> tuple[float, list[float]]:
    """(CPU seconds per request, time to first byte of each request)."""
    gc.collect()
    ttfb = []
    cpu = cpu_seconds()
    for _ in range(requests):
        ttfb.append(await stream())
    return (cpu_seconds() - cpu) / requests, ttfb


async def main(requests: int, rounds: int) -> None:
    with mock_llm() as url:
        limits = httpx.Limits(max_connections=4096, max_keepalive_connections=256)
        timeout = httpx.Timeout(connect=5.0, read=60.0, write=30.0, pool=10.0)
        async with httpx.AsyncClient(timeout=timeout, limits=limits) as hx:
            lean = Http1Client(connect_timeout=5.0, read_timeout=60.0)
            clients = {"httpx.AsyncClient": via_httpx(hx, url), "Http1Client": via_http1(lean, url)}
            for stream in clients.values():  # warm-up: connections, caches, code paths
                await measure(stream, 200)
            cpu: dict[str, list[float]] = {name: [] for name in clients}
            ttfb: dict[str, list[float]] = {name: [] for name in clients}
            per_round = requests // rounds
            for index in range(rounds):
                names = list(clients) if index % 2 == 0 else list(reversed(clients))
                for name in names:
                    seconds, firsts = await measure(clients[name], per_round)
                    cpu[name].append(seconds)
                    ttfb[name].extend(firsts)
            await lean.aclose()
    print(f"\n{per_round * rounds} sequential streams per client, {rounds} alternating rounds")
    print(f"{'client':<20}{'CPU µs/request':>16}{'rounds (µs)':>28}{'TTFB p50 ms':>13}")
    summary = {}
    for name in clients:
        summary[name] = statistics.median(cpu[name]), statistics.median(ttfb[name])
        each = " ".join(f"{seconds * 1e6:.0f}" for seconds in cpu[name])
        print(f"{name:<20}{summary[name][0] * 1e6:>16.0f}{each:>28}{summary[name][1] * 1e3:>13.3f}")
    (hx_cpu, hx_ttfb), (lean_cpu, lean_ttfb) = summary.values()
    ratios = f"{hx_cpu / lean_cpu:>15.2f}x{'':>28}{hx_ttfb / lean_ttfb:>12.2f}x"
    print(f"{'httpx / Http1Client':<20}{ratios}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000, help="per client (default 2000)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    args = parser.parse_args()
    factory = None
    if args.loop == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop
    print(f"event loop: {args.loop}, python {sys.version.split()[0]}, httpx {httpx.__version__}")
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main(args.requests, args.rounds))
