"""Name lookups for the hosts companies name (their webhook URLs), kept apart from
the process's own.

A company chooses its webhook's host, and so whoever answers for that name's DNS:
an owner can make every lookup of it hang until the system resolver gives up
(seconds to tens of seconds per lookup). `asyncio.timeout` stops waiting for such a
lookup but cannot stop it: `getaddrinfo` blocks the thread it runs on to the end.
Through the event loop's resolver, each delivery attempt left one more thread
blocked, and they were the process's shared ones: uvloop's four libuv threads, which
every other name the process resolves waits for (Redis by its service name, the
identity provider's JWKS, every other company's webhook), or, on the plain asyncio
loop, the default executor, where password checks run too (measured on 2 CPUs: four
passes of one company's events left all six of its threads hanging; another
company's delivery then failed and a login's password check waited behind them).

Here lookups run on threads of their own, and a name already being looked up is not
looked up again: whoever asks for it meanwhile shares the lookup under way. So a
hanging name holds one thread, however many deliveries ask for it, and the threads
left serve every other name.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

Lookup = Callable[[str, int], list[str]]

# One per name hanging at once: a company names one host (a new URL while the old
# name still hangs holds a second until the resolver gives that one up).
THREADS = 8


def system_lookup(host: str, port: int) -> list[str]:
    """The addresses `host` resolves to (blocking: run it on a thread)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


class HostLookups:
    """`addresses(host, port)`, at most one lookup per name under way."""

    def __init__(self, lookup: Lookup | None = None, threads: int = THREADS) -> None:
        self._lookup = lookup if lookup is not None else system_lookup
        self._threads = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="host-lookup")
        self._under_way: dict[tuple[str, int], Future[list[str]]] = {}

    async def addresses(self, host: str, port: int) -> list[str]:
        """What `host` resolves to; raises what the lookup raises (OSError for a name
        that does not resolve). Cancelling the wait leaves the lookup running for
        whoever asks next."""
        key = (host, port)
        pending = self._under_way.get(key)
        if pending is None:
            pending = self._threads.submit(self._lookup, host, port)
            self._under_way[key] = pending
            pending.add_done_callback(lambda done: self._forget(key, done))
        # A concurrent future (not a task): the waits of several loops and callers
        # share it, and one caller's cancellation does not cancel it.
        return await asyncio.shield(asyncio.wrap_future(pending))

    def _forget(self, key: tuple[str, int], done: Future[list[str]]) -> None:
        # Runs on the lookup's thread; a dict operation is atomic under the GIL.
        if self._under_way.get(key) is done:
            del self._under_way[key]

    def close(self) -> None:
        """No new lookups; those under way end on their own (never waited for)."""
        self._threads.shutdown(wait=False, cancel_futures=True)
