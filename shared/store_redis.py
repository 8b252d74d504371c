"""Redis store: shared by every process, so limits and single use hold across edges.

The outbox is a hash (id -> payload) plus a sorted set (id -> due time); claiming
moves due items' scores forward by a lease in one Lua script, so two edges never
deliver the same item at the same moment, and an edge that dies mid-delivery only
delays the item by the lease.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import NoScriptError, RedisError

from shared.redis_pipe import REPLY_TIMEOUT, PipeLender, PipelinedRedis
from shared.store import Admission, Admitted, InitGate, InitGated, SlotRelease

# What a Redis store raises when Redis is unreachable or too slow to answer; the apps
# answer these with 503 instead of an unhandled 500.
STORE_ERRORS: tuple[type[Exception], ...] = (RedisError,)

# The store's clock, for scripts that compare times written by different processes:
# each caller's `now` only turns its deadline into a life (`expires_at - now`),
# counted here from Redis's own `TIME`. Replicas whose clocks disagree (no NTP, a VM
# resumed from pause) then agree on which members still live; a caller's clock ahead
# of the others' no longer expires their live members. (Redis 7 replicates a
# script's effects, so `TIME` is allowed in one.) `at(deadline, now)`: a caller's
# deadline on the store's clock; `theirs(score, now)`: a stored one back on the
# caller's clock (as text: a Lua number comes back as an integer).
_CLOCK = """
local t = redis.call('TIME')
local clock = tonumber(t[1]) + tonumber(t[2]) / 1000000
local function at(deadline, now) return clock + (tonumber(deadline) - tonumber(now)) end
local function theirs(score, now)
  return string.format('%.17g', tonumber(now) + (tonumber(score) - clock))
end
"""

# Connections of the admissions that wait for replicas (`ReplicaAcks`): each is held
# for the script and its WAIT, a replica round trip when the replicas keep up, the
# whole timeout when they do not.
ACKED_CONNECTIONS = 64

logger = logging.getLogger("llmgw.store.redis")


@dataclass(frozen=True, slots=True)
class ReplicaAcks:
    """An admission counts once `count` replicas have it (``WAIT count timeout``
    right after the script, on its connection): a failover to any of them keeps
    the token's single use. `timeout_seconds`: how long to wait for them."""

    count: int
    timeout_seconds: float

    def timeout_ms(self) -> int:
        # Never 0: WAIT's 0 is "block forever".
        return max(1, round(self.timeout_seconds * 1000))


class ReplicaAckMissing(RedisError):
    """An admission ran on the primary but too few replicas acknowledged it in time:
    a failover now could lose it. A `RedisError`, so callers handle it as the store
    being unavailable (the edge takes the admission back and answers 503)."""


# KEYS: the due set, the waiting set. A claimed item no longer waits for a retry
# (`_EXPEDITE` must not move its lease).
_CLAIM = """
local ids = redis.call('ZRANGE', KEYS[1], '-inf', ARGV[1], 'BYSCORE', 'LIMIT', 0, ARGV[3])
for _, id in ipairs(ids) do
  redis.call('ZADD', KEYS[1], ARGV[2], id)
  redis.call('ZREM', KEYS[2], id)
end
return ids
"""


# See `Admission`. KEYS: the revocation keys, the used key, the slot sets, then the
# key to fetch (if any), then the issued key (if any; on a first use deleted after the
# fetch, or with a nonce kept repeat_seconds at most). ARGV: n_revocations, n_slots,
# path, used_ttl_ms, now, slots_expire_at, member, slots_ttl_ms, has_fetch,
# has_issued, nonce ('' for none), repeat_ms, then one limit per slot set.
_ADMIT = (
    _CLOCK
    + """
local n_rev, n_slots = tonumber(ARGV[1]), tonumber(ARGV[2])
local fetch = ARGV[9] == '1' and KEYS[n_rev + n_slots + 2] or nil
for i = 1, n_rev do
  if redis.call('EXISTS', KEYS[i]) == 1 then return {'revoked'} end
end
local used_key = KEYS[n_rev + 1]
local nonce = ARGV[11]
local mark = nonce == '' and ARGV[3] or ARGV[3] .. ' ' .. nonce
local first = redis.call('GET', used_key)
if first then
  if nonce ~= '' and first == mark then
    -- This very admission again (its reply was lost): what it took is still taken.
    local again = fetch and redis.call('GET', fetch) or nil
    if fetch then return {'ok', -1, again} end
    return {'ok', -1}
  end
  if string.match(first, '^[^ ]*') == ARGV[3] then return {'reconnect'} end
  return {'used'}
end
if ARGV[10] == '1' and redis.call('EXISTS', KEYS[#KEYS]) == 0 then return {'unknown'} end
for i = 1, n_slots do
  local key = KEYS[n_rev + 1 + i]
  redis.call('ZREMRANGEBYSCORE', key, '-inf', clock)
  if redis.call('ZSCORE', key, ARGV[7]) == false
     and redis.call('ZCARD', key) >= tonumber(ARGV[12 + i]) then
    return {'full', i - 1}
  end
end
for i = 1, n_slots do
  local key = KEYS[n_rev + 1 + i]
  redis.call('ZADD', key, at(ARGV[6], ARGV[5]), ARGV[7])
  redis.call('PEXPIRE', key, ARGV[8])
end
redis.call('SET', used_key, mark, 'PX', ARGV[4])
local fetched = fetch and redis.call('GET', fetch) or nil
if ARGV[10] == '1' then
  if nonce == '' then
    redis.call('DEL', KEYS[#KEYS])
  else
    local left = redis.call('PTTL', KEYS[#KEYS])
    if left < 0 or left > tonumber(ARGV[12]) then redis.call('PEXPIRE', KEYS[#KEYS], ARGV[12]) end
  end
end
if fetch then return {'ok', -1, fetched} end
return {'ok', -1}
"""
)


# See `AdmissionStore.unadmit`. KEYS: the used key, the slot sets, then the issued key
# (if any). ARGV: the mark (path and nonce), member, has_issued, issued_ttl_ms.
_UNADMIT = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
local last = #KEYS
if ARGV[3] == '1' then
  last = last - 1
  if redis.call('EXISTS', KEYS[#KEYS]) == 1 then redis.call('PEXPIRE', KEYS[#KEYS], ARGV[4]) end
end
for i = 2, last do redis.call('ZREM', KEYS[i], ARGV[2]) end
return 1
"""


# KEYS: the outbox hash, the due set, then slot sets to leave; ARGV: id, payload,
# due time, the member leaving the slot sets.
_PUT = """
for i = 3, #KEYS do redis.call('ZREM', KEYS[i], ARGV[4]) end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
return 1
"""


# KEYS: the outbox hash, the due set, the waiting set; ARGV: id, payload, due time.
# An item acknowledged meanwhile (another edge delivered it once its lease ran out)
# stays gone: writing its payload back would keep it in the hash forever. The waiting
# set holds the same due time, marking the item as backing off, not leased.
_RESCHEDULE = """
if redis.call('ZSCORE', KEYS[2], ARGV[1]) == false then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[1])
return 1
"""


# KEYS: the due set, the waiting set; ARGV: now, how many at most. Items backing off
# become due now; one whose due time is no longer its backoff's (claimed by an edge
# of an older release, which does not clear the waiting set) keeps its lease.
_EXPEDITE = """
local waiting = redis.call('ZRANGE', KEYS[2], 0, tonumber(ARGV[2]) - 1, 'WITHSCORES')
local moved = 0
for i = 1, #waiting, 2 do
  local id, at = waiting[i], waiting[i + 1]
  local due = redis.call('ZSCORE', KEYS[1], id)
  if due and tonumber(due) == tonumber(at) and tonumber(at) > tonumber(ARGV[1]) then
    redis.call('ZADD', KEYS[1], ARGV[1], id)
    moved = moved + 1
  end
  redis.call('ZREM', KEYS[2], id)
end
return {moved, #waiting / 2}
"""


# See `BoundedSetStore.bounded_add`. KEYS: the set; ARGV: now, member, expires_at, limit,
# ttl_ms, then the members to drop.
_BOUNDED_ADD = (
    _CLOCK
    + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', clock)
for i = 6, #ARGV do redis.call('ZREM', KEYS[1], ARGV[i]) end
if redis.call('ZSCORE', KEYS[1], ARGV[2]) == false
   and redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[4]) then
  return theirs(redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')[2], ARGV[1])
end
redis.call('ZADD', KEYS[1], at(ARGV[3], ARGV[1]), ARGV[2])
-- Only ever longer: a member with less life left must not cut the others' short.
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[5]) then redis.call('PEXPIRE', KEYS[1], ARGV[5]) end
return false
"""
)


# See `BoundedSetStore.bounded_members`: the members still live on the store's clock.
_BOUNDED_MEMBERS = (
    _CLOCK
    + """
return redis.call('ZRANGE', KEYS[1], '(' .. string.format('%.17g', clock), '+inf', 'BYSCORE')
"""
)


# A log's items from ARGV[1], at most ARGV[2] of them and no more than ARGV[3] bytes in
# all, the first always (`LogStore.log_range`). Read a few at a time, so neither the
# reply nor the script holds much more than the budget when the items are large.
_LOG_RANGE = """
local first, last = tonumber(ARGV[1]), tonumber(ARGV[1]) + tonumber(ARGV[2]) - 1
local budget, out, size = tonumber(ARGV[3]), {}, 0
local i = first
while i <= last do
  local items = redis.call('LRANGE', KEYS[1], i, math.min(i + 7, last))
  if #items == 0 then return out end
  for _, item in ipairs(items) do
    size = size + #item
    if #out > 0 and size > budget then return out end
    out[#out + 1] = item
  end
  i = i + 8
end
return out
"""


# --- init's gate (issue 14.3) --------------------------------------------------------
# See `InitGate`. KEYS: the rate counters, the TPM counters, the pending sets (user,
# company), then the key to fetch (if any). ARGV: n_rate, n_tpm, window_ms, now,
# member, expires_at, n_pending, pending_ttl_ms, used_prefix, then the rate limits,
# the TPM limits, the pending limits. Every pending set is checked before the member
# is added to any: refused by one, it is in none.
# The used marks (`used_prefix` .. member) are named here, not in KEYS: a single
# Redis only (on a cluster `init_gate` runs the steps one by one instead).
_INIT_GATE = (
    _CLOCK
    + """
local n_rate, n_tpm, n_pending = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[7])
for i = 1, n_rate do
  local count = redis.call('INCR', KEYS[i])
  redis.call('PEXPIRE', KEYS[i], ARGV[3], 'NX')
  if count > tonumber(ARGV[9 + i]) then return {'rate', i - 1} end
end
for i = 1, n_tpm do
  local held = redis.call('GET', KEYS[n_rate + i])
  if held and tonumber(held) >= tonumber(ARGV[9 + n_rate + i]) then return {'tpm', i - 1} end
end
local sets = n_rate + n_tpm
for i = 1, n_pending do
  local set, limit = KEYS[sets + i], tonumber(ARGV[9 + sets + i])
  redis.call('ZREMRANGEBYSCORE', set, '-inf', clock)
  if redis.call('ZSCORE', set, ARGV[5]) == false and redis.call('ZCARD', set) >= limit then
    for _, m in ipairs(redis.call('ZRANGE', set, 0, -1)) do
      if redis.call('EXISTS', ARGV[9] .. m) == 1 then redis.call('ZREM', set, m) end
    end
    if redis.call('ZCARD', set) >= limit then
      local first = redis.call('ZRANGE', set, 0, 0, 'WITHSCORES')[2]
      return {'pending', i - 1, theirs(first, ARGV[4])}
    end
  end
end
for i = 1, n_pending do
  redis.call('ZADD', KEYS[sets + i], at(ARGV[6], ARGV[4]), ARGV[5])
  redis.call('PEXPIRE', KEYS[sets + i], ARGV[8])
end
if #KEYS > sets + n_pending then return {'ok', -1, '', redis.call('GET', KEYS[#KEYS])} end
return {'ok'}
"""
)
# --- end of init's gate ------------------------------------------------------------


CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}


def cluster_url(url: str) -> str | None:
    """``redis+cluster://host:port`` (any node of a Redis Cluster) as the plain
    ``redis://`` URL the cluster client bootstraps from; None for a single Redis."""
    parts = urlsplit(url)
    plain = CLUSTER_SCHEMES.get(parts.scheme)
    return None if plain is None else urlunsplit(parts._replace(scheme=plain))


class RedisStore:
    """`pipe`: the connection every stream's commands share (admission, checkpoints,
    the usage report and its acknowledgement, the revocation watch's reads); the
    rest goes through redis-py's pool. Without it, everything does. A Redis Cluster
    has no pipe: its commands go to each key's shard through the cluster client.

    `acks` (with `acked`, connections of their own: `_acked_connections`): admissions
    then run there, each followed by WAIT on its own connection. Not on the pipe: WAIT holds its
    connection until the replicas answer, and every stream's commands would queue
    behind it; and WAIT counts only the writes of the connection it is sent on."""

    def __init__(
        self,
        client: redis.Redis | RedisCluster,
        prefix: str,
        pipe: PipelinedRedis | None = None,
        *,
        acks: ReplicaAcks | None = None,
        acked: PipeLender | redis.Redis | None = None,
    ) -> None:
        if (acks is None) != (acked is None):
            raise ValueError("replica acknowledgements need their own client, and only they")
        # Typed as the single-node client: the cluster client has the same commands.
        self._redis = cast(redis.Redis, client)
        self._pipe = pipe
        self._acks = acks
        self._acked = acked
        self._prefix = prefix
        self.is_cluster = isinstance(client, RedisCluster)
        self._cluster = client if isinstance(client, RedisCluster) else None
        # On a cluster the outbox's keys share the hash tag `{outbox}` (its scripts
        # touch both); a single Redis keeps the names it always had, so pending
        # reports survive an upgrade.
        outbox = f"{prefix}{{outbox}}" if self.is_cluster else f"{prefix}outbox"
        self._outbox_items = f"{outbox}:items"
        self._outbox_due = f"{outbox}:due"
        self._outbox_waiting = f"{outbox}:waiting"
        self._dead = f"{outbox}:dead"
        self._scripts = {
            source: client.register_script(source)
            for source in (
                _CLAIM,
                _ADMIT,
                _UNADMIT,
                _PUT,
                _RESCHEDULE,
                _EXPEDITE,
                _BOUNDED_ADD,
                _BOUNDED_MEMBERS,
                _INIT_GATE,
                _LOG_RANGE,
            )
        }

    async def _run(self, source: str, keys: list[str], args: list[Any]) -> Any:
        """One of our Lua scripts: on the pipelined connection when there is one,
        else through redis-py's registered script (a cluster, or a pool-only store)."""
        if self._pipe is not None:
            return await self._pipe.script(source, keys, args)
        return await self._scripts[source](keys=keys, args=args)

    async def _run_acknowledged(
        self,
        acks: ReplicaAcks,
        acked: PipeLender | redis.Redis,
        source: str,
        keys: list[str],
        args: list[Any],
    ) -> tuple[Any, int]:
        """The script and WAIT in one write on one connection (one round trip, plus
        the replicas'): its reply and how many replicas have its writes."""
        sha = hashlib.sha1(source.encode()).hexdigest()
        wait = ("WAIT", acks.count, acks.timeout_ms())
        if isinstance(acked, PipeLender):
            try:
                reply, replicas = await acked.batch(
                    [("EVALSHA", sha, len(keys), *keys, *args), wait]
                )
            except NoScriptError:  # a fresh Redis: EVAL caches it
                reply, replicas = await acked.batch(
                    [("EVAL", source, len(keys), *keys, *args), wait]
                )
            return reply, int(replicas)
        # TLS or a Unix socket: redis-py's pipeline, one connection of its own pool.
        for command in ("EVALSHA", "EVAL"):
            async with acked.pipeline(transaction=False) as pipe:
                script = sha if command == "EVALSHA" else source
                pipe.execute_command(command, script, len(keys), *keys, *args)
                pipe.execute_command(*wait)
                reply, replicas = await pipe.execute(raise_on_error=False)
            if not isinstance(reply, NoScriptError):
                break
        for outcome in (reply, replicas):
            if isinstance(outcome, Exception):
                raise outcome
        return reply, int(replicas)

    async def connected_replicas(self) -> int:
        """How many replicas follow this Redis now (`INFO replication`); a single
        Redis only, what `LLMGW_REDIS_MIN_REPLICA_ACKS` waits for."""
        info = await self._redis.info("replication")
        return int(info.get("connected_slaves", 0))

    @classmethod
    def from_url(
        cls, url: str, *, prefix: str, replica_acks: ReplicaAcks | None = None
    ) -> RedisStore:
        """A single Redis (``redis://``, ``rediss://``, ``unix://``) or a Redis Cluster
        (``redis+cluster://`` / ``rediss+cluster://`` naming any of its nodes).
        `replica_acks`: a single Redis only (see `RedisStore`)."""
        nodes = cluster_url(url)
        if nodes is not None and replica_acks is not None:
            # WAIT has no key to route by; the edge's settings refuse this at start.
            raise ValueError("replica acknowledgements are for a single Redis, not a cluster")
        if nodes is not None:
            # One pool per node. The cluster client cannot wait for a free
            # connection (past the cap it raises, a RedisError: 503), so each node
            # gets the single-node pool's cap, and replies the same generous wait.
            cluster = RedisCluster.from_url(
                nodes,
                max_connections=1024,
                socket_timeout=20,
                socket_connect_timeout=2.0,
                health_check_interval=30,
            )
            return cls(cluster, prefix)
        # A blocking pool: under a burst, callers wait for a connection instead of
        # failing (the default pool raises once it is exhausted). An edge relaying
        # thousands of streams keeps hundreds of commands in flight, and a CPU-bound
        # event loop reads their replies late: the wait is generous so a busy process
        # slows down rather than dropping checkpoints and resume events.
        pool = redis.BlockingConnectionPool.from_url(
            url,
            max_connections=1024,
            timeout=20,
            socket_connect_timeout=2.0,
            health_check_interval=30,
        )
        pipe = PipelinedRedis.from_url(url)
        acked: PipeLender | redis.Redis | None = None
        if replica_acks is not None:
            acked = _acked_connections(url, replica_acks, lean=pipe is not None)
        return cls(redis.Redis(connection_pool=pool), prefix, pipe, acks=replica_acks, acked=acked)

    def _key(self, key: str) -> str:
        return self._prefix + key

    async def get(self, key: str) -> bytes | None:
        if self._pipe is not None:  # the hot paths' single reads: no pool checkout
            return cast(bytes | None, await self._pipe.execute("GET", self._key(key)))
        return cast(bytes | None, await self._redis.get(self._key(key)))

    async def get_many(self, keys: list[str]) -> list[bytes | None]:
        names = [self._key(k) for k in keys]
        if self._cluster is not None:  # many companies' keys: one MGET per slot, in order
            return cast(list[bytes | None], await self._cluster.mget_nonatomic(names))
        if self._pipe is not None:
            if not keys:
                return []
            return cast(list[bytes | None], await self._pipe.execute("MGET", *names))
        return cast(list[bytes | None], await self._redis.mget(names))

    async def set(self, key: str, value: bytes, ttl_seconds: float) -> None:
        if self._pipe is not None:
            await self._pipe.execute(
                "SET", self._key(key), value, "PX", max(1, int(ttl_seconds * 1000))
            )
            return
        await self._redis.set(self._key(key), value, px=max(1, int(ttl_seconds * 1000)))

    async def set_if_absent(self, key: str, value: bytes, ttl_seconds: float) -> bool:
        px = max(1, int(ttl_seconds * 1000))
        if self._pipe is not None:
            reply = await self._pipe.execute("SET", self._key(key), value, "PX", px, "NX")
            return reply is not None
        return bool(await self._redis.set(self._key(key), value, px=px, nx=True))

    async def delete(self, key: str) -> None:
        if self._pipe is not None:
            await self._pipe.execute("DEL", self._key(key))
            return
        await self._redis.delete(self._key(key))

    async def outbox_put(
        self, item_id: str, payload: bytes, due_at: float, release: SlotRelease | None = None
    ) -> None:
        # One script call, not a MULTI/EXEC pipeline: redis-py packs and parses every
        # queued command separately, which made this the edge's costliest store call.
        slots = [self._key(k) for k in release.slot_keys] if release is not None else []
        member = release.member if release is not None else ""
        # On a cluster the slot sets (company tag) and the outbox (`{outbox}`) live
        # on different shards, out of one script's reach: the slots are given back
        # right after the report is stored. An edge dying in between leaks them
        # until the stream's maximum life, as any crashed edge does.
        here = [] if self.is_cluster else slots
        keys = [self._outbox_items, self._outbox_due, *here]
        await self._run(_PUT, keys, [item_id, payload, due_at, member])
        if release is not None and self.is_cluster:
            await self.release_slots(release)

    async def release_slots(self, release: SlotRelease) -> None:
        if self._pipe is not None:
            commands = [("ZREM", self._key(key), release.member) for key in release.slot_keys]
            await self._pipe.batch(commands)
            return
        async with self._redis.pipeline(transaction=False) as pipe:
            for key in release.slot_keys:
                pipe.zrem(self._key(key), release.member)
            await pipe.execute()

    async def outbox_claim(self, now: float, lease_seconds: float, limit: int) -> list[str]:
        ids: list[Any] = await self._run(
            _CLAIM, [self._outbox_due, self._outbox_waiting], [now, now + lease_seconds, limit]
        )
        return [_text(i) for i in ids]

    async def outbox_get(self, item_id: str) -> bytes | None:
        # On the connection its claim used: after a Redis restart, a claim that went
        # through must not meet a stale pooled connection here (the item would then
        # wait out its lease).
        if self._pipe is not None:
            return cast(bytes | None, await self._pipe.execute("HGET", self._outbox_items, item_id))
        return cast(bytes | None, await self._redis.hget(self._outbox_items, item_id))

    async def outbox_reschedule(self, item_id: str, payload: bytes, due_at: float) -> None:
        await self._run(
            _RESCHEDULE,
            [self._outbox_items, self._outbox_due, self._outbox_waiting],
            [item_id, payload, due_at],
        )

    async def outbox_expedite(self, now: float) -> int:
        moved, batch = 0, 1000
        while True:  # in batches: one script over a huge backlog would stall Redis
            done, seen = await self._run(
                _EXPEDITE, [self._outbox_due, self._outbox_waiting], [now, batch]
            )
            moved += int(done)
            if int(seen) < batch:
                return moved

    async def outbox_ack(self, item_ids: list[str]) -> None:
        if not item_ids:
            return
        if self._pipe is not None:
            await self._pipe.batch(
                [
                    ("ZREM", self._outbox_due, *item_ids),
                    ("ZREM", self._outbox_waiting, *item_ids),
                    ("HDEL", self._outbox_items, *item_ids),
                ],
                transaction=True,
            )
            return
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.zrem(self._outbox_due, *item_ids)
            pipe.zrem(self._outbox_waiting, *item_ids)
            pipe.hdel(self._outbox_items, *item_ids)
            await pipe.execute()

    async def outbox_size(self) -> int:
        if self._pipe is not None:
            return int(cast(int, await self._pipe.execute("ZCARD", self._outbox_due)))
        return int(await self._redis.zcard(self._outbox_due))

    async def dead_letter_put(self, item_id: str, payload: bytes) -> None:
        # One transaction (the keys share the `{outbox}` hash tag on a cluster).
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.zrem(self._outbox_due, item_id)
            pipe.zrem(self._outbox_waiting, item_id)
            pipe.hdel(self._outbox_items, item_id)
            pipe.hset(self._dead, item_id, payload)
            await pipe.execute()

    async def dead_letters(self, limit: int) -> list[tuple[str, bytes]]:
        items: list[tuple[str, bytes]] = []
        async for key, value in self._redis.hscan_iter(self._dead, count=100):
            items.append((_text(key), value))
            if len(items) >= limit:
                break
        return items

    async def dead_letter_count(self) -> int:
        return int(await self._redis.hlen(self._dead))

    async def dead_letter_ids(self) -> list[str]:
        # HSCAN, not HKEYS: a misconfigured receiver dead-letters every report, and one
        # HKEYS over hundreds of thousands would block Redis for every edge meanwhile.
        # (HSCAN NOVALUES needs Redis 7.4; the bodies pass by, only the ids are kept.)
        ids: set[str] = set()
        async for key, _ in self._redis.hscan_iter(self._dead, count=1000):
            ids.add(_text(key))
        return sorted(ids)

    async def dead_letter_take(self, item_id: str) -> bytes | None:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hget(self._dead, item_id)
            pipe.hdel(self._dead, item_id)
            value, _ = await pipe.execute()
        return cast(bytes | None, value)

    async def admit(self, admission: Admission) -> Admitted:
        a = admission
        keys = [*a.revocation_keys, a.used_key, *a.slot_keys]
        if a.fetch_key is not None:
            keys.append(a.fetch_key)
        if a.issued_key is not None:
            keys.append(a.issued_key)
        args: list[str | int | float] = [
            len(a.revocation_keys),
            len(a.slot_keys),
            a.path,
            max(1, int(a.used_ttl_seconds * 1000)),
            a.now,
            a.slots_expire_at,
            a.member,
            max(1, int((a.slots_expire_at - a.now) * 1000)),
            int(a.fetch_key is not None),
            int(a.issued_key is not None),
            a.nonce,
            max(1, int(a.repeat_seconds * 1000)),
            *a.limits,
        ]
        prefixed = [self._key(k) for k in keys]
        if self._acks is None or self._acked is None:
            reply: list[Any] = await self._run(_ADMIT, prefixed, args)
        else:
            reply, replicas = await self._run_acknowledged(
                self._acks, self._acked, _ADMIT, prefixed, args
            )
            # Only a first use took anything a lost write would give back; a refusal
            # stands whether or not the replicas have its expiry of old slots.
            if _text(reply[0]) == "ok" and replicas < self._acks.count:
                logger.warning(
                    "an admission reached %d of the %d replicas asked for in %g s",
                    replicas,
                    self._acks.count,
                    self._acks.timeout_seconds,
                )
                raise ReplicaAckMissing(
                    f"{replicas} of {self._acks.count} replicas acknowledged the admission"
                )
        verdict = _text(reply[0])
        if verdict == "full":
            return Admitted("full", full_index=int(reply[1]))
        if verdict == "ok":
            return Admitted("ok", fetched=reply[2] if len(reply) > 2 else None)
        return Admitted(cast(Any, verdict))

    async def unadmit(self, admission: Admission) -> bool:
        a = admission
        if not a.nonce:
            raise ValueError("only an admission with a nonce can be taken back")
        keys = [a.used_key, *a.slot_keys, *([a.issued_key] if a.issued_key else [])]
        args: list[str | int] = [
            a.mark(),
            a.member,
            int(a.issued_key is not None),
            max(1, int(a.used_ttl_seconds * 1000)),
        ]
        return bool(await self._run(_UNADMIT, [self._key(k) for k in keys], args))

    async def hit(self, key: str, window_seconds: float) -> int:
        return await self.add(key, 1, window_seconds)

    async def unhit(self, key: str, window_seconds: float) -> None:
        # The key may have expired since its `hit` (the window ended): the expiry
        # set by `add` keeps the -1 it then creates from living forever.
        await self.add(key, -1, window_seconds)

    async def add(self, key: str, amount: int, window_seconds: float) -> int:
        name, px = self._key(key), max(1, int(window_seconds * 1000))
        if self._pipe is not None:
            replies = await self._pipe.batch(
                [("INCRBY", name, amount), ("PEXPIRE", name, px, "NX")], transaction=True
            )
            return int(cast(int, replies[0]))
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.incrby(name, amount)
            pipe.pexpire(name, px, nx=True)
            total, _ = await pipe.execute()
        return int(total)

    async def bounded_members(self, key: str) -> list[str]:
        raw: list[Any] = await self._run(_BOUNDED_MEMBERS, [self._key(key)], [])
        return [_text(m) for m in raw]

    async def bounded_add(
        self, key: str, member: str, expires_at: float, now: float, limit: int, drop: list[str]
    ) -> float | None:
        # The set lives as long as its longest-lived member (an add only extends it).
        ttl_ms = max(1, int((expires_at - now) * 1000))
        args: list[str | int | float] = [now, member, expires_at, limit, ttl_ms, *drop]
        reply = await self._run(_BOUNDED_ADD, [self._key(key)], args)
        return None if reply is None else float(reply)

    async def bounded_remove(self, keys: list[str], member: str) -> None:
        names = [self._key(key) for key in keys]
        if self._pipe is not None:  # once per settled webhook: the pipelined connection
            await self._pipe.batch([("ZREM", name, member) for name in names])
            return
        # Not a transaction: on a cluster the sets may live on different shards.
        async with self._redis.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.zrem(name, member)
            await pipe.execute()

    # --- init's gate (issue 14.3) -------------------------------------------------

    async def init_gate(self, gate: InitGate) -> InitGated:
        g = gate
        if self._cluster is not None:
            # The gate's keys span a user, a company and their tokens without one
            # hash tag in common: the same steps, a round trip each.
            return await self._init_gate_steps(g)
        keys = [*g.rate_keys, *g.tpm_keys, *g.pending_keys]
        if g.fetch_key is not None:
            keys.append(g.fetch_key)
        args: list[str | int | float] = [
            len(g.rate_keys),
            len(g.tpm_keys),
            max(1, int(g.rate_window_seconds * 1000)),
            g.now,
            g.member,
            g.expires_at,
            len(g.pending_keys),
            max(1, int((g.expires_at - g.now) * 1000)),
            self._key(g.used_prefix),
            *g.rate_limits,
            *g.tpm_limits,
            *g.pending_limits,
        ]
        prefixed = [self._key(k) for k in keys]
        reply: list[Any] = await self._run(_INIT_GATE, prefixed, args)
        verdict = _text(reply[0])
        if verdict == "rate":
            return InitGated("rate", index=int(reply[1]))
        if verdict == "tpm":
            return InitGated("tpm", index=int(reply[1]))
        if verdict == "pending":
            return InitGated("pending", index=int(reply[1]), frees_at=float(reply[2]))
        return InitGated("ok", fetched=reply[3] if len(reply) > 3 else None)

    async def _init_gate_steps(self, g: InitGate) -> InitGated:
        for index, (key, limit) in enumerate(zip(g.rate_keys, g.rate_limits, strict=True)):
            if await self.hit(key, g.rate_window_seconds) > limit:
                return InitGated("rate", index)
        held = await self.get_many(g.tpm_keys) if g.tpm_keys else []
        for index, (raw, limit) in enumerate(zip(held, g.tpm_limits, strict=True)):
            if raw is not None and int(raw) >= limit:
                return InitGated("tpm", index)
        # As the script: the pending grants' marks are read only when a set is at
        # its limit (an add refused). Most inits find a place at the first add. Not
        # atomic: refused by a later set, the member is taken out of the earlier ones
        # (a fresh jti: it was in none of them before).
        for index, (key, limit) in enumerate(zip(g.pending_keys, g.pending_limits, strict=True)):
            add = (key, g.member, g.expires_at, g.now, limit)
            frees_at = await self.bounded_add(*add, [])
            if frees_at is not None:
                members = await self.bounded_members(key)
                marks = await self.get_many([g.used_prefix + m for m in members]) if members else []
                started = [m for m, mark in zip(members, marks, strict=True) if mark is not None]
                if started:
                    frees_at = await self.bounded_add(*add, started)
            if frees_at is not None:
                if index:
                    await self.bounded_remove(g.pending_keys[:index], g.member)
                return InitGated("pending", index, frees_at=frees_at)
        fetched = await self.get(g.fetch_key) if g.fetch_key is not None else None
        return InitGated("ok", fetched=fetched)

    # --- end of init's gate ---------------------------------------------------------

    async def log_append(self, key: str, items: list[bytes], ttl_seconds: float) -> int:
        name, px = self._key(key), max(1, int(ttl_seconds * 1000))
        if self._pipe is not None:  # every 50 ms of every stream: the pipelined connection
            replies = await self._pipe.batch(
                [("RPUSH", name, *items), ("PEXPIRE", name, px)], transaction=True
            )
            return int(cast(int, replies[0]))
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.rpush(name, *items)
            pipe.pexpire(name, px)
            length, _ = await pipe.execute()
        return int(length)

    async def log_range(
        self, key: str, start: int, count: int, max_bytes: int | None = None
    ) -> list[bytes]:
        if count <= 0:
            return []
        if max_bytes is not None:
            # Through the pool, not the pipe every stream's commands share: a
            # follower's reads are large, and would hold those up behind them.
            script = self._scripts[_LOG_RANGE]
            items = await script(keys=[self._key(key)], args=[start, count, max_bytes])
            return cast(list[bytes], items)
        # LRANGE's end is inclusive.
        return cast(list[bytes], await self._redis.lrange(self._key(key), start, start + count - 1))

    async def log_length(self, key: str) -> int:
        return int(await self._redis.llen(self._key(key)))

    async def server_time(self) -> float:
        if self._cluster is not None:
            # Each node has a clock: every process reads the same one, the node of
            # one fixed key.
            await self._cluster.initialize()  # (the slots' map, on a first command)
            node = self._cluster.get_node_from_key(self._key("clock"))
            seconds, micros = await self._cluster.time(target_nodes=node)
        else:
            seconds, micros = await self._redis.time()
        return int(seconds) + int(micros) / 1_000_000

    async def ping(self) -> bool:
        try:
            return bool(await self._redis.ping())
        except (redis.RedisError, OSError):
            return False

    async def close(self) -> None:
        if self._cluster is not None:
            await self._cluster.aclose()  # closes every node's pool
            return
        if self._pipe is not None:
            await self._pipe.close()
        if isinstance(self._acked, PipeLender):
            await self._acked.close()
        elif self._acked is not None:
            await self._acked.aclose(close_connection_pool=True)
        await self._redis.aclose(close_connection_pool=True)


def _acked_connections(url: str, acks: ReplicaAcks, *, lean: bool) -> PipeLender | redis.Redis:
    """The connections admissions wait for replicas on: lean ones where the URL allows
    (redis-py costs ~2 ms more per admission on a loaded host, docs/operations.md),
    else a small redis-py pool. Either way a caller past `ACKED_CONNECTIONS` waits its
    turn, and replicas that stall make admissions fail after their timeout."""
    if lean:
        return PipeLender(
            lambda: cast(PipelinedRedis, PipelinedRedis.from_url(url)), ACKED_CONNECTIONS
        )
    pool = redis.BlockingConnectionPool.from_url(
        url,
        max_connections=ACKED_CONNECTIONS,
        timeout=REPLY_TIMEOUT,
        socket_timeout=REPLY_TIMEOUT + acks.timeout_seconds,
        socket_connect_timeout=2.0,
        health_check_interval=30,
    )
    return redis.Redis(connection_pool=pool)


def _text(value: Any) -> str:
    """A script's reply element as text (bytes from the server, str from redis-py's
    decoding clients)."""
    return value.decode() if isinstance(value, bytes) else str(value)
