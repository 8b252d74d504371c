"""The one connection serving each resumable stream, within one edge process.

DESIGN §9: one live connection per stream, a reconnect superseding the one before.
Across edges the store's `live:<jti>` key decides, and each process's watcher reads
it once a second (revocation_watch.py). Within a process that second was room for a
flood: reconnects of one stream URL arriving faster than the watcher's passes each
started a follower, and a superseded follower whose client read nothing was never
let go (its clean end waited on that client), each holding the frames its client had
not taken. Measured: 30 non-reading reconnects 200 ms apart on a stream of 1 MB
deltas kept 30 followers running and 366 MB in their connections' write buffers,
still there 12 s later. Here a reconnect ends this process's previous connection to
the same stream at once, before the new one reads a frame, so a flood leaves at most
one follower per stream per edge, whatever its rate.

A reconnect `claim`s the stream (before writing `live:<jti>`, so a later reconnect on
this edge always wins here as it does in the store), then `attach`es its response
when it starts; a response superseded in between is ended as soon as it starts.
"""

from __future__ import annotations

from typing import Protocol


class Connection(Protocol):
    def supersede(self) -> None:
        """End this client's response: another connection serves the stream now."""
        ...


class LiveConnections:
    """Maps each stream's `live_key` to the id of the connection that serves it on
    this edge (None: the first connection, which has no id) and, once its response
    runs, the connection itself."""

    def __init__(self) -> None:
        self._current: dict[str, tuple[bytes | None, Connection | None]] = {}

    def claim(self, key: str, connection: bytes) -> None:
        """A reconnect takes the stream: the connection serving it here ends now."""
        previous = self._current.get(key)
        self._current[key] = (connection, None)
        if previous is not None and previous[1] is not None:
            previous[1].supersede()

    def forget(self, key: str, connection: bytes) -> None:
        """Drop a claim whose response will never run (its request failed)."""
        if self._current.get(key) == (connection, None):
            del self._current[key]

    def attach(self, key: str, connection: bytes | None, stream: Connection) -> bool:
        """The response of `connection` starts. False: a later reconnect took the
        stream meanwhile, and the caller ends this one."""
        current = self._current.get(key)
        # The first connection needs no claim; a reconnect's must still stand (none
        # left means a later one claimed, ran and ended meanwhile).
        if current == (connection, None) or (current is None and connection is None):
            self._current[key] = (connection, stream)
            return True
        return False

    def release(self, key: str, stream: Connection) -> None:
        """`stream`'s response is over."""
        current = self._current.get(key)
        if current is not None and current[1] is stream:
            del self._current[key]

    def serving(self, key: str) -> Connection | None:
        """The connection serving the stream on this edge now, if its response runs."""
        current = self._current.get(key)
        return None if current is None else current[1]
