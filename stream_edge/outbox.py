"""The usage-webhook outbox: every finished stream's report, kept until delivered.

`enqueue` writes the event to the store (durable with Redis) before anything is
sent, already leased to this process, and posts it from memory: the common case
costs two store round trips (write, acknowledge) instead of the five a
claim-then-read cycle takes. Should this process die before the acknowledgement,
the lease runs out and any edge's deliverer loop claims the event.

The post waits up to `linger` (50 ms by default) for other streams' reports, and
they go together: the control plane settles webhooks that arrive together in one
transaction, and a lone webhook costs it about three times one of a batch (the
HTTP request, the commit, the wake-ups of its threads). Measured on `make bench`'s
stack, the whole turn at concurrency 1: 2.8 → 2.2 ms of control-plane CPU, its init
3.6 → 2.5 ms (no longer sharing the CPUs with the previous turn's settlement;
docs/cp-profile.md, "Settlement, fifth round"). The price is the hold: it is
released up to `linger` later. The event is in the store before it waits, so a
crash while it waits costs what a crash before the post always did: a redelivery
after the lease.

The deliverer loop claims due items (retries, other processes' leftovers), signs
each attempt afresh (the signature timestamp must be within the receiver's
5-minute window even on a late retry), and posts it. 2xx acknowledges;
408/429/5xx and network errors retry with jittered exponential backoff; any other
4xx is permanent and the event moves to the dead-letter list for an operator. The
first post that passes after the receiver was unavailable brings every report still
backing off forward (`_expedite`): once the control plane is back, the backlog is
settled at the pace it answers, not over as long again as the outage lasted.

When the store will not take a report (`keep`, after `enqueue` failed), the report
is appended to the local spool (spool.py) and posted at once, straight from memory;
the loop moves the spool into the store when the store answers again, together with
the stream's slots still to give back. At shutdown (`flush`) the spool may be on a
disk that goes with the process: a store still down, each spooled report is posted
directly, and leaves the spool once accepted. The receiver recognises a report
delivered twice by its webhook id and charges it once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import orjson

from shared.retry import Backoff, parse_retry_after
from shared.store import OutboxStore, SlotRelease, Store
from shared.turns import Turns
from shared.webhooks import UsageEvent, sign
from stream_edge.metrics import EdgeMetrics
from stream_edge.spool import Spool
from stream_edge.transport import Transport, TransportError

log = logging.getLogger("llmgw.edge.outbox")


# How long a delivered event's acknowledgement waits to share a round trip with others.
ACK_DELAY = 0.05


# Direct posts waiting or in flight at most; past it, reports wait for the deliverer
# loop (they are in the store), so a slow control plane cannot grow the edge's memory
# without bound.
MAX_DIRECT_QUEUE = 10_000
# The control plane's 401 for a webhook its secret signed but dated more than 5
# minutes off its clock (`control_plane.errors.TimestampOutOfWindow`).
TIMESTAMP_OUT_OF_WINDOW = "timestamp_out_of_window"
# A direct post starts only this long before its lease runs out, at the latest.
LEASE_MARGIN = 2.0
# Bringing the backlog forward (`_expedite`) at most this often: a report the
# receiver keeps failing (while others pass) is retried no more often than that.
EXPEDITE_INTERVAL = 5.0
# Posts failing in a row (no answer, 502/503/504) that make an outage.
OUTAGE_AFTER = 2


def is_permanent(status: int) -> bool:
    return 400 <= status < 500 and status not in (408, 425, 429)


def receiver_unavailable(status: int) -> bool:
    """No answer, or the receiver (or its proxy) says it cannot serve: an outage,
    over when a post passes again. 429 asks us to slow down, and is obeyed."""
    return status == 0 or status in (502, 503, 504)


class Outbox:
    def __init__(
        self,
        store: OutboxStore,
        client: Transport,
        url: str,
        secret: str,
        metrics: EdgeMetrics,
        *,
        backoff: Backoff | None = None,
        lease_seconds: float = 30.0,
        max_direct: int = 64,
        spool: Spool | None = None,
        linger: float = 0.05,
        clock: Callable[[], float] = time.time,
        store_clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        # The store's clock (`shared.store_clock.StoreClock.now`, the edge's lifespan
        # passes it): due times and leases meet other edges' in the one sorted set,
        # so all are read on it. On this host's clock, an edge 10 minutes ahead
        # claimed the others' leased reports while they posted them, and one behind
        # left a dead edge's reports waiting 10 minutes more.
        self._now = store_clock
        # The wall clock a signature's timestamp is read from (tests skew it), and
        # how far the control plane's is from it, once it told us (`_send`).
        self._clock = clock
        self._offset = 0.0
        self._client = client
        self._url = url
        self._secret = secret
        self._metrics = metrics
        self._backoff = backoff or Backoff(base=0.5, cap=300.0)
        self._lease = lease_seconds
        self._spool = spool
        # Bounds the posts in flight after a burst of streams ending together; the
        # rest wait their turn (their lease is long enough for that), the companies in
        # turn: one company's burst (up to its 200 streams, long transcripts each)
        # kept another company's report behind all of its own.
        self._direct = Turns(max_direct)
        self._max_direct = max_direct
        # Reports waiting (up to `linger`, or until a batch of `max_direct`) to be
        # posted together.
        self._linger = linger
        self._waiting: list[tuple[dict[str, Any], bytes, float, str]] = []
        self._linger_timer: asyncio.TimerHandle | None = None
        self._in_flight: set[asyncio.Task[Any]] = set()
        # Acknowledgements wait up to ACK_DELAY and go to the store together. Losing
        # them in a crash costs only a redelivery after the lease, which the
        # receiver recognises by its webhook id and answers 200 without charging.
        self._acks: list[str] = []
        self._ack_timer: asyncio.Task[None] | None = None
        # Whether the receiver was unavailable since the backlog was last brought
        # forward. A new process cannot know what happened before it: it assumes so.
        # Monotonic time of the last expedite (`EXPEDITE_INTERVAL`). An outage is two
        # posts failing in a row (`OUTAGE_AFTER`): one report failing between others
        # that pass (one the receiver chokes on, a timeout every time) is that
        # report's trouble, and keeps backing off instead of coming back every 5 s.
        self._outage_seen = True
        self._failed_in_a_row = 0
        self._monotonic = monotonic
        self._expedited_at: float | None = None

    async def enqueue(self, event: UsageEvent, release: SlotRelease | None = None) -> None:
        """Store the event durably (giving back `release`'s slots in the same round
        trip), then deliver it in the background."""
        item = {"id": event.webhook_id, "body": event.body().decode(), "attempt": 0}
        raw = orjson.dumps(item)
        leased_until = self._now() + self._lease
        await self._store.outbox_put(event.webhook_id, raw, leased_until, release)
        self._metrics.outbox_pending.inc()
        if len(self._in_flight) + len(self._waiting) >= MAX_DIRECT_QUEUE:
            # The control plane is not keeping up: the report is durable in the store,
            # and the deliverer loop claims it once its lease runs out.
            return
        self._waiting.append((item, raw, leased_until, event.company_id))
        if self._linger <= 0 or len(self._waiting) >= self._max_direct:
            self._post_waiting()
        elif self._linger_timer is None:
            self._linger_timer = asyncio.get_running_loop().call_later(
                self._linger, self._post_waiting
            )

    def _post_waiting(self) -> None:
        if self._linger_timer is not None:
            self._linger_timer.cancel()
            self._linger_timer = None
        waiting, self._waiting = self._waiting, []
        for item, raw, leased_until, company in waiting:
            task = asyncio.create_task(self._deliver_now(item, raw, leased_until, company))
            self._in_flight.add(task)
            task.add_done_callback(self._in_flight.discard)

    async def keep(self, event: UsageEvent, release: SlotRelease | None = None) -> None:
        """The store would not take the report: spool it, post it directly. Never
        raises (the stream's client must not see the edge's bookkeeping fail)."""
        item = {"id": event.webhook_id, "body": event.body().decode(), "attempt": 0}
        record: dict[str, Any] = {"item": item, "release": None}
        if release is not None:
            record["release"] = {"slot_keys": release.slot_keys, "member": release.member}
        if self._spool is None:
            log.error("usage webhook %s has no spool to wait in", item["id"])
        else:
            try:
                await asyncio.to_thread(self._spool.append, orjson.dumps(record))
            except OSError as exc:
                log.error("could not spool usage webhook %s: %s", item["id"], exc)
        task = asyncio.create_task(self._post_direct(item))
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)

    async def _post_direct(self, item: dict[str, Any]) -> bool:
        """One delivery attempt with no store bookkeeping; whether it was accepted.
        The spool keeps the report until the store has it, whatever this attempt's
        fate (or, at shutdown, until this attempt is accepted: `post_spool`)."""
        async with self._direct.held(None):  # a spooled report's company is not read
            status, _ = await self._send(item["id"], item["body"].encode())
        if not status:
            return False
        # 2xx only: the receiver answers a report it already settled 200 (a
        # duplicate); anything else is either a retry or a refusal an operator must
        # see, and with no store there is no dead-letter list: the spool keeps it.
        accepted = 200 <= status < 300
        self._metrics.webhook_deliveries.labels("delivered" if accepted else "retry").inc()
        return accepted

    async def drain_spool(self) -> int:
        """Move spooled reports into the store (due now, their slots released in the
        same round trip); returns how many. A file stays spooled until all of it is in."""
        if self._spool is None or not self._spool.has_pending():
            return 0
        spool, moved = self._spool, 0
        for path in await asyncio.to_thread(spool.claim):
            for line in await asyncio.to_thread(spool.read, path):
                parsed = _spooled(line, path.name)
                if parsed is None:
                    continue
                item, release = parsed
                await self._store.outbox_put(item["id"], orjson.dumps(item), self._now(), release)
                self._metrics.outbox_pending.inc()
                moved += 1
            await asyncio.to_thread(spool.remove, path)
        if moved:
            log.info("moved %d spooled usage webhooks into the outbox", moved)
        return moved

    async def post_spool(self) -> int:
        """Post each spooled report directly (at shutdown, the store still refusing
        them); returns how many were accepted. Only those leave the spool: the rest
        stay for whoever drains it next. Their slots stay held until they expire
        (releasing them needs the store)."""
        if self._spool is None or not self._spool.has_pending():
            return 0
        spool, accepted = self._spool, 0
        for path in await asyncio.to_thread(spool.claim):
            posts: list[tuple[bytes, dict[str, Any]]] = []
            for line in await asyncio.to_thread(spool.read, path):
                parsed = _spooled(line, path.name)  # a malformed one goes, as in the drain
                if parsed is not None:
                    posts.append((line, parsed[0]))
            # Together, as many at once as the direct posts allow (`_direct`).
            results = await asyncio.gather(*(self._post_direct(item) for _, item in posts))
            left = [line for (line, _), ok in zip(posts, results, strict=True) if not ok]
            accepted += len(posts) - len(left)
            await asyncio.to_thread(spool.keep_only, path, left)
        if accepted:
            log.info("posted %d spooled usage webhooks directly at shutdown", accepted)
        return accepted

    async def _deliver_now(
        self, item: dict[str, Any], raw: bytes, leased_until: float, company: str
    ) -> None:
        try:
            async with self._direct.held(company):
                if self._now() > leased_until - LEASE_MARGIN:
                    # Waited its turn past the lease: the deliverer loop may have claimed
                    # it, and two posts of one report would double the load on a
                    # control plane that is already slow.
                    return
                await self._post(item, raw)
        except Exception:  # the store is down: the lease expires, the loop retries
            log.warning("usage webhook %s left for a retry", item["id"])

    async def run(self, poll_seconds: float = 1.0) -> None:
        """Deliver what is due forever; cancelled by the app's lifespan at shutdown."""
        while True:
            try:
                await self.drain_spool()
                delivered = await self.deliver_due()
                self._metrics.outbox_pending.set(await self._store.outbox_size())
            except Exception:  # the store being briefly down must not kill the loop
                log.exception("outbox pass failed")
                delivered = 0
            if not delivered:
                await asyncio.sleep(poll_seconds)

    async def deliver_due(self, limit: int = 50) -> int:
        ids = await self._store.outbox_claim(self._now(), self._lease, limit)
        if not ids:
            return 0
        await asyncio.gather(*(self._deliver(item_id) for item_id in ids))
        return len(ids)

    async def flush(self, timeout: float) -> int:
        """Try to deliver everything now (at shutdown); returns what is still pending."""
        deadline = time.monotonic() + timeout
        self._post_waiting()
        if self._in_flight:
            await asyncio.wait(set(self._in_flight), timeout=timeout)
        # The spool first: a report kept there while the store was down, whose direct
        # post failed too, would otherwise wait on a disk that may go with this
        # process (Kubernetes' `emptyDir` goes with the pod a rolling deploy
        # replaces); the deliverer loop that drains it is already stopped.
        # Bounded, as the rest: a store that went silent must not hold the shutdown,
        # nor take more than half the time left, which the direct posts below need.
        try:
            async with asyncio.timeout(max(deadline - time.monotonic(), 0.0) / 2):
                await self.drain_spool()
        except Exception as exc:  # the store is still down
            log.warning("could not move the spool into the store: %s", type(exc).__name__)
        # Still spooled (the store is down): the control plane is the only place
        # left. It recognises a report already delivered (the direct post at the
        # stream's end, a partial drain) by its webhook id and charges it once.
        try:
            async with asyncio.timeout(max(deadline - time.monotonic(), 0.0)):
                await self.post_spool()
        except Exception as exc:  # a control plane down too: the files stay, as before
            log.warning("spooled usage webhooks left on disk at shutdown: %s", type(exc).__name__)
        while time.monotonic() < deadline:
            if not await self.deliver_due():
                break
        if self._ack_timer is not None:
            self._ack_timer.cancel()
            self._ack_timer = None
        await self._write_acks()
        return await self._store.outbox_size()

    def _ack(self, item_id: str) -> None:
        self._acks.append(item_id)
        self._metrics.outbox_pending.dec()
        if self._ack_timer is None:
            self._ack_timer = asyncio.create_task(self._acks_after(ACK_DELAY))

    async def _acks_after(self, delay: float) -> None:
        await asyncio.sleep(delay)
        self._ack_timer = None
        await self._write_acks()

    async def _write_acks(self) -> None:
        ids, self._acks = self._acks, []
        try:
            await self._store.outbox_ack(ids)
        except Exception as exc:  # redelivered after the lease; the receiver dedups
            log.warning("could not acknowledge %d usage webhooks: %s", len(ids), type(exc).__name__)

    async def _deliver(self, item_id: str) -> None:
        raw = await self._store.outbox_get(item_id)
        if raw is None:
            await self._store.outbox_ack([item_id])
            return
        await self._post(orjson.loads(raw), raw)

    async def _send(self, item_id: str, body: bytes) -> tuple[int, float | None]:
        """One signed POST of a report: its status (0: no answer) and Retry-After.

        Dated by the control plane's clock as last learned: a signature more than 5
        minutes off the receiver's clock is a 401, which would be permanent (the
        report dead-lettered, its hold left to the sweeper's deadline). When the
        control plane says that was the only fault (`timestamp_out_of_window`, with
        its time), the report is signed again by that time and posted once more."""
        status, retry_after, server_time = await self._post_signed(item_id, body)
        if server_time is not None:
            offset = server_time - self._clock()
            log.warning(
                "the control plane's clock is %+.0f s from this edge's: usage webhooks are"
                " now dated by the control plane's (fix this host's time sync)",
                offset,
            )
            self._offset = offset
            status, retry_after, _ = await self._post_signed(item_id, body)
        return status, retry_after

    async def _post_signed(self, item_id: str, body: bytes) -> tuple[int, float | None, int | None]:
        """`_send`'s one POST: also the control plane's time when it refused the
        signature's date alone."""
        moment = datetime.fromtimestamp(self._clock() + self._offset, UTC)
        headers = {**sign(self._secret, item_id, body, moment), "content-type": "application/json"}
        try:
            response = await self._client.send("POST", self._url, headers, body)
            try:
                # Read to the end: the connection is then reused.
                answer = await response.aread()
            finally:
                await response.aclose()
        except TransportError as exc:
            log.warning("usage webhook %s not delivered: %s", item_id, type(exc).__name__)
            return 0, None, None
        retry_after = parse_retry_after(response.headers.get("retry-after"))
        server_time = _server_time(answer) if response.status_code == 401 else None
        return response.status_code, retry_after, server_time

    async def _post(self, item: dict[str, Any], raw: bytes) -> None:
        """One delivery attempt of a leased item, and its bookkeeping in the store."""
        item_id: str = item["id"]
        status, retry_after = await self._send(item_id, item["body"].encode())
        if 200 <= status < 300:
            self._metrics.webhook_deliveries.labels("delivered").inc()
            self._ack(item_id)
            self._failed_in_a_row = 0
            await self._expedite()
        elif status and is_permanent(status):
            self._metrics.webhook_deliveries.labels("rejected").inc()
            log.error("usage webhook %s rejected with %s; moved to dead letters", item_id, status)
            await self._store.dead_letter_put(item_id, raw)  # out of the outbox too
            self._metrics.outbox_pending.dec()
        else:
            self._metrics.webhook_deliveries.labels("retry").inc()
            if receiver_unavailable(status):
                self._failed_in_a_row += 1
                self._outage_seen = self._outage_seen or self._failed_in_a_row >= OUTAGE_AFTER
            item["attempt"] += 1
            delay = self._backoff.delay(item["attempt"], retry_after)
            await self._store.outbox_reschedule(item_id, orjson.dumps(item), self._now() + delay)

    async def _expedite(self) -> None:
        """A post passed after the receiver was unavailable: the reports that backed
        off meanwhile become due now, rather than each after its own backoff (up to
        the 300 s cap, about as long as the outage lasted), holds unsettled and
        credits unavailable all that time. The deliverer loop then drains them at the
        pace the receiver answers, 50 claimed at a time."""
        now = self._monotonic()
        if not self._outage_seen:
            return
        if self._expedited_at is not None and now - self._expedited_at < EXPEDITE_INTERVAL:
            return
        self._outage_seen, self._expedited_at = False, now
        try:
            moved = await self._store.outbox_expedite(self._now())
        except Exception as exc:  # the store is down: the next passing post tries again
            self._outage_seen = True
            log.warning("could not bring the outbox's backlog forward: %s", type(exc).__name__)
            return
        if moved:
            log.info("the control plane answers again: %d usage webhooks due now", moved)


def _server_time(answer: bytes) -> int | None:
    """The control plane's clock from a 401 `timestamp_out_of_window` (our secret's
    signature verified, only its date was off); None for any other refusal."""
    try:
        error = orjson.loads(answer)["error"]
        if error["code"] != TIMESTAMP_OUT_OF_WINDOW:
            return None
        server_time = error["details"]["server_time"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return None
    if isinstance(server_time, bool) or not isinstance(server_time, int):
        return None
    return server_time


def _spooled(line: bytes, file: str) -> tuple[dict[str, Any], SlotRelease | None] | None:
    """A spool record's outbox item and the slots to give back; None if malformed."""
    try:
        record = orjson.loads(line)
        item, freed = record["item"], record.get("release")
        release = SlotRelease(freed["slot_keys"], freed["member"]) if freed else None
        if not isinstance(item["id"], str) or not isinstance(item["body"], str):
            raise TypeError("item")
    except (orjson.JSONDecodeError, KeyError, TypeError):
        log.error("skipping a malformed spool record in %s", file)
        return None
    return item, release


async def replay_dead_letter(store: Store, item_id: str) -> bool:
    """Move a dead letter back into the outbox, due now (an operator's decision, e.g.
    after fixing what made the control plane refuse it). Any edge delivers it. Now on
    the store's clock: the operator's host may be minutes off the edges'."""
    raw = await store.dead_letter_take(item_id)
    if raw is None:
        return False
    item = orjson.loads(raw)
    item["attempt"] = 0
    await store.outbox_put(item_id, orjson.dumps(item), await store.server_time())
    return True
