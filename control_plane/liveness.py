"""Which running streams went silent (issue 11.5): a pure, per-process memory of
each stream's last checkpoint marker and when this process first saw it.

Only this process's monotonic clock is used, never the edge's timestamps, so clock
skew between the edge and the control plane cannot make a live stream look dead.
A marker first seen now counts from now: a stream is silent once two sweeps at
least `silent_after` seconds apart read the same checkpoint.

A store that answers late (frozen, a stalled host, less than its client's timeout)
holds the edge's writes queued behind the read as well, so the time a read waits
is no proof of silence. A marker is first seen when its answer came back, and a
later reading counts from when its request was sent: a late answer can only make a
stream look younger, never older.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Iterable


class SilenceWatch:
    def __init__(self, silent_after: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.silent_after = silent_after
        self._clock = clock
        self._seen: dict[str, tuple[Hashable, float]] = {}
        # The streams whose checkpoint this watch saw change: alive, not just written.
        self._changed: set[str] = set()
        # Where the next silence pass starts reading (the id it read last; "": the
        # first): with more running than one pass reads, each pass goes on from the
        # last, so every stream is read within a few passes, not only the oldest.
        self.resume_after = ""

    def now(self) -> float:
        """This watch's clock: what a sweep notes just before it sends its read."""
        return self._clock()

    def is_silent(
        self,
        reservation_id: str,
        marker: Hashable,
        sent_at: float | None = None,
        limit: float | None = None,
    ) -> bool:
        """Record `marker`, read by a request sent at `sent_at` (`now()` taken before
        the read; None: now, a read answered at once) and answered now; True when a
        read sent `limit` (None: `silent_after`) seconds or more after an earlier one
        was answered found the same marker."""
        now = self._clock()
        seen = self._seen.get(reservation_id)
        if seen is None or seen[0] != marker:
            if seen is not None:
                self._changed.add(reservation_id)
            self._seen[reservation_id] = (marker, now)
            return False
        asked = now if sent_at is None else min(sent_at, now)
        return asked - seen[1] >= (self.silent_after if limit is None else limit)

    def seen_alive(self, reservation_id: str) -> bool:
        """Whether this watch saw the stream's checkpoint change and has not found it
        silent since (a silent one is settled, or forgotten at the pass's end): its
        edge is writing it. A checkpoint seen once, or never changing, proves nothing."""
        return reservation_id in self._changed and reservation_id in self._seen

    def keep_only(self, reservation_ids: Iterable[str]) -> None:
        """Forget streams no longer running (settled, released, ended)."""
        keep = set(reservation_ids)
        self._seen = {rid: seen for rid, seen in self._seen.items() if rid in keep}
        self._changed &= keep

    def keep_only_read(self, after: str, through: str, reservation_ids: Iterable[str]) -> None:
        """Forget the streams a pass read that no longer run: it read every active
        reservation after `after` through `through` (in id order; wrapped past the
        last id to the first when `through` <= `after`) and found only
        `reservation_ids` running. The streams it did not read are kept as they
        were, their first sighting too: the next pass that reads them judges them."""
        keep = set(reservation_ids)

        def stays(rid: str) -> bool:
            if rid in keep:
                return True
            if after < through:
                return not after < rid <= through
            return through < rid <= after

        self._seen = {rid: seen for rid, seen in self._seen.items() if stays(rid)}
        self._changed = {rid for rid in self._changed if stays(rid)}

    def __len__(self) -> int:
        return len(self._seen)
