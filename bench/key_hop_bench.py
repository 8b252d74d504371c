"""What "one key, one call" (issue 16.5) adds to the time to first token.

    python -m bench.key_hop_bench              # 300 streams per path and concurrency
    python -m bench.key_hop_bench --streams 60 # a quick look

Real processes (`BenchStack`: mock-llm, control plane, stream edge on PostgreSQL and
Redis), the same `[[mock tokens=8 first_ms=0]]` stream, three ways, in alternating
rounds so drift on a shared machine hits all three alike:

* **token**: `POST /v1/chat/completions` with a stream token minted beforehand,
  outside the clock (the edge benchmark's *edge* path);
* **init + token**: what a client does itself without the key path: `POST
  /v1/chat/init`, then the stream; the clock runs from the init's request;
* **key**: the same POST with `Authorization: Bearer sk_…`; the edge makes the
  signed internal init call, then streams.

TTFT is from writing the (first) request to reading the first content event.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable

import httpx
import orjson

from bench.report import percentile
from bench.sse_client import Connection, chat_request, connect
from bench.stack import BenchStack, mint

HOST = "127.0.0.1"
PROMPT = "key hop [[mock tokens=8 first_ms=0]]"
BODY = {"model": "mock-fast", "messages": [{"role": "user", "content": PROMPT}], "stream": True}
ROUNDS = 6


async def _ttft(conn: Connection, request: bytes) -> float:
    result = await asyncio.wait_for(conn.send(request), timeout=60)
    if not result.ok or result.ttft is None:
        raise RuntimeError(f"stream failed: HTTP {result.status} {result.error}")
    return result.ttft


async def run(stack: BenchStack, streams: int, concurrency: int) -> dict[str, list[float]]:
    access = stack.provision(1)[0]
    me = stack.http.get(stack.urls["cp"] + "/v1/me", headers={"Authorization": f"Bearer {access}"})
    user_id = me.json()["data"]["user"]["id"]
    key = stack._admin("/v1/admin/api-keys", {"user_id": user_id})["key"]
    edge_port = stack.ports["edge"]
    body = orjson.dumps(BODY)
    per_round = max(1, streams // ROUNDS)
    times: dict[str, list[float]] = {"token": [], "init + token": [], "key": []}
    conns = [await connect(HOST, edge_port) for _ in range(concurrency)]
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=stack.urls["cp"], timeout=60, limits=limits) as cp:

        async def init_then_stream(conn: Connection) -> float:
            started = time.perf_counter()
            answer = await cp.post(
                "/v1/chat/init", json=BODY, headers={"Authorization": f"Bearer {access}"}
            )
            token = answer.json()["data"]["stream_token"]
            sent = time.perf_counter()
            return sent - started + await _ttft(conn, chat_request(HOST, edge_port, body, token))

        async def phase(name: str, one: Callable[[Connection, int], Awaitable[float]]) -> None:
            queue = list(range(per_round))

            async def worker(slot: int) -> None:
                while queue:
                    index = queue.pop()
                    if conns[slot].closed:  # the edge closed it while idle (minting)
                        conns[slot] = await connect(HOST, edge_port)
                    times[name].append(await one(conns[slot], index))

            await asyncio.gather(*(worker(slot) for slot in range(len(conns))))

        for _ in range(ROUNDS):
            tokens = await mint(stack.urls["cp"], [access], BODY, per_round)
            await phase(
                "token",
                lambda c, i, minted=tokens: _ttft(  # type: ignore[misc]
                    c, chat_request(HOST, edge_port, body, minted[i])
                ),
            )
            await phase("init + token", lambda c, i: init_then_stream(c))
            await phase("key", lambda c, i: _ttft(c, chat_request(HOST, edge_port, body, key)))
    for conn in conns:
        conn.abort()
    return times


def table(results: dict[int, dict[str, list[float]]]) -> str:
    lines = [
        "| concurrency | path | streams | TTFT p50 (ms) | p95 (ms) | p50 Δ vs token (ms) |",
        "|---|---|---|---|---|---|",
    ]
    for concurrency, times in results.items():
        base = percentile(times["token"], 50)
        for name, values in times.items():
            p50, p95 = percentile(values, 50) * 1000, percentile(values, 95) * 1000
            lines.append(
                f"| {concurrency} | {name} | {len(values)} | {p50:.2f} | {p95:.2f} "
                f"| {p50 - base * 1000:+.2f} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=300)
    parser.add_argument("--concurrency", type=int, nargs="*", default=[1, 8])
    parser.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    args = parser.parse_args()
    results: dict[int, dict[str, list[float]]] = {}
    with contextlib.ExitStack() as resources:
        stack = resources.enter_context(BenchStack(args.pg, args.redis))
        for concurrency in args.concurrency:
            results[concurrency] = asyncio.run(run(stack, args.streams, concurrency))
    print(table(results))


if __name__ == "__main__":
    main()
