"""`llm-gateway outbox …`: inspect the usage-webhook outbox and replay dead letters.

Works on the shared store (`LLMGW_REDIS_URL`), so it sees every edge's events."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from typing import Any

import orjson
import redis.asyncio

from shared.store_factory import open_store
from shared.store_redis import cluster_url
from stream_edge.outbox import replay_dead_letter


def _positive(raw: str) -> int:
    value = int(raw)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def add_outbox_parser(sub: Any) -> None:
    outbox = sub.add_parser("outbox", help="inspect pending usage events and dead letters")
    actions = outbox.add_subparsers(dest="action", required=True)
    actions.add_parser("status", help="how many events wait for delivery")
    dead = actions.add_parser("dead-letters", help="events the control plane refused")
    dead.add_argument("--limit", type=_positive, default=100)
    replay = actions.add_parser("replay", help="send dead letters again")
    replay.add_argument("ids", nargs="*", help="webhook ids (usage_<jti>); none = all")


# A report's transcript (DESIGN §11): the model's answer and its tool calls. What the
# operator needs of a refused report is its ids, status and usage; the member's
# conversation is not theirs to read, and the listing goes to terminals, tickets and
# log pipelines, where it outlived the session its owner deleted.
TRANSCRIPT_FIELDS = ("content", "tool_calls")


def listed(data: dict[str, Any]) -> dict[str, Any]:
    """A dead letter's `data` as `dead-letters` prints it: the transcript's fields as
    their sizes (`content_chars`, `tool_calls_count`), never their text. The letter
    itself keeps them, so a replay still stores the reply."""
    shown = {k: v for k, v in data.items() if k not in TRANSCRIPT_FIELDS}
    if isinstance(data.get("content"), str):
        shown["content_chars"] = len(data["content"])
    if isinstance(data.get("tool_calls"), list):
        shown["tool_calls_count"] = len(data["tool_calls"])
    return shown


async def _run(args: argparse.Namespace, redis_url: str) -> int:
    prefix = os.environ.get("LLMGW_REDIS_PREFIX") or "llmgw:"
    store = open_store(redis_url, prefix=prefix)
    found = True  # whether the prefix held anything the action asked for
    code = 0
    try:
        if args.action == "status":
            pending = await store.outbox_size()
            # Counted in the store: reading them to count them stopped at 100,000 (and
            # held them all in memory), so a flood of refusals looked smaller than it was.
            dead = await store.dead_letter_count()
            found = bool(pending or dead)
            print(json.dumps({"pending": pending, "dead_letters": dead}))
        elif args.action == "dead-letters":
            letters = await store.dead_letters(args.limit)
            found = bool(letters)
            for item_id, raw in letters:
                body = orjson.loads(orjson.loads(raw)["body"])
                shown = {"id": item_id, "type": body["type"], "data": listed(body["data"])}
                print(json.dumps(shown))
        else:
            # All of them, not the first 100,000: the rest stayed dead while the answer
            # said every one was replayed.
            ids = args.ids or await store.dead_letter_ids()
            replayed = [item_id for item_id in ids if await replay_dead_letter(store, item_id)]
            missing = sorted(set(ids) - set(replayed))
            found = bool(replayed)
            print(json.dumps({"replayed": replayed, "not_found": missing}))
            code = 1 if missing else 0
    finally:
        await store.close()
    if not found:
        for other in await other_prefixes(redis_url, prefix):
            print(
                f"llm-gateway outbox: nothing under LLMGW_REDIS_PREFIX {prefix!r}, but this "
                f"Redis holds an outbox under {other!r}: if that is the services' prefix, "
                f"run with LLMGW_REDIS_PREFIX={other}",
                file=sys.stderr,
            )
    return code


# The outbox's keys on a single Redis (`shared.store_redis`: `<prefix>outbox:…`).
OUTBOX_SUFFIXES = ("outbox:items", "outbox:dead")


async def other_prefixes(redis_url: str, prefix: str) -> list[str]:
    """The prefixes other than `prefix` under which this Redis holds an outbox. Run
    from a shell without the services' LLMGW_REDIS_PREFIX, the command read an empty
    outbox and said `{"pending": 0, "dead_letters": 0}` over the edges' dead letters.
    Only when the prefix held nothing (a SCAN walks every key); not on a cluster,
    whose keys are spread over its shards."""
    if cluster_url(redis_url) is not None:
        return []
    client = redis.asyncio.Redis.from_url(redis_url)
    found: set[str] = set()
    try:
        for suffix in OUTBOX_SUFFIXES:
            async for key in client.scan_iter(match=f"*{suffix}", count=1000):
                other = key.decode("utf-8", "replace").removesuffix(suffix)
                if other != prefix:
                    found.add(other)
    except redis.RedisError:
        return []  # advice only: the answer above stands
    finally:
        await client.aclose()
    return sorted(found)


def run_outbox(args: argparse.Namespace) -> int:
    redis_url = os.environ.get("LLMGW_REDIS_URL")
    if not redis_url:
        print("llm-gateway outbox: set LLMGW_REDIS_URL (the edges' shared store)", file=sys.stderr)
        return 2
    return asyncio.run(_run(args, redis_url))
