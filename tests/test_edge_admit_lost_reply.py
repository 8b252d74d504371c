"""A stream's admission whose reply is lost after the store ran it (the connection
dropped after the write, a timeout while the reply was on its way).

Before: the edge answered 503, but the token stayed marked used, its stream slots
taken until the stream's maximum life, and its stashed request deleted: the client's
retry with the same token was refused as a second use (401 `token_used`), and with
one stream allowed per user nothing else could start either. Now the edge takes back
what its own admission took (`Store.unadmit`, matched by the request's nonce); a
different request with the same token is still refused while the mark stands.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from shared.store import Admission, Admitted
from stream_edge import admission as edge_admission
from tests.inproc import Gateway
from tests.stack import base_env

HI = {"role": "user", "content": "hi [[mock tokens=2]]"}


class LostReply:
    """Wraps the store's `admit`: the real store runs the admission, then its reply
    is lost (the client sees a connection error), `times` times."""

    def __init__(self, inner: Any, times: int = 1) -> None:
        self.inner = inner
        self.times = times
        self.ran: list[Admission] = []

    async def __call__(self, admission: Admission) -> Admitted:
        answer: Admitted = await self.inner(admission)
        self.ran.append(admission)
        if self.times > 0:
            self.times -= 1
            raise RedisConnectionError("the Redis connection was lost")
        return answer


async def test_a_lost_admission_reply_leaves_the_token_usable_and_its_slots_free(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = {**base_env(f"sqlite:///{tmp_path}/gw.db"), "LLMGW_MAX_STREAMS_PER_USER": "1"}
    async with Gateway(env) as gw:
        user = await gw.new_user()
        token = (await gw.init_ok(user, {"messages": [HI], "max_tokens": 16}))["stream_token"]
        lost = LostReply(gw.store.admit)
        monkeypatch.setattr(gw.store, "admit", lost)
        status, answer = await gw.complete(token, {"messages": [HI]})
        assert status == 503, answer
        first = lost.ran[0]
        assert first.nonce  # a per-request nonce marks the admission as this request's
        # Taken back: no used mark, no slot held.
        assert await gw.store.get(first.used_key) is None
        for key in first.slot_keys:
            assert await gw.store.bounded_members(key) == []
        # The client's retry with the same token streams (a first use, its own nonce).
        status, answer = await gw.complete(token, {"messages": [HI]})
        assert status == 200, answer
        second = lost.ran[1]
        assert second.nonce != first.nonce
        # And that use is single: the same token again is a second use.
        status, answer = await gw.complete(token, {"messages": [HI]})
        assert (status, answer["error"]["code"]) == (401, "token_used"), answer


async def test_a_lost_reply_taken_back_never_reopens_a_token_another_request_holds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The take-back only removes a mark carrying its own request's nonce: a request
    whose admission never ran (refused, or lost before the store) cannot undo the
    admission of the request that did use the token."""
    async with Gateway(base_env(f"sqlite:///{tmp_path}/gw.db")) as gw:
        user = await gw.new_user()
        token = (await gw.init_ok(user, {"messages": [HI], "max_tokens": 16}))["stream_token"]
        status, answer = await gw.complete(token, {"messages": [HI]})
        assert status == 200, answer
        lost = LostReply(gw.store.admit)
        monkeypatch.setattr(gw.store, "admit", lost)
        status, answer = await gw.complete(token, {"messages": [HI]})
        assert status == 503, answer  # its admission ran ("used"), its reply was lost
        assert await gw.store.get(lost.ran[0].used_key) is not None  # the mark stands
        status, answer = await gw.complete(token, {"messages": [HI]})
        assert (status, answer["error"]["code"]) == (401, "token_used"), answer


class LostReplyWhileAnotherTries(LostReply):
    """The first admission runs and, before its reply is lost, another request with
    the same token arrives (a client whose own timeout retried meanwhile): that one
    is refused, its admission meeting the first's mark."""

    def __init__(self, inner: Any, meanwhile: Any) -> None:
        super().__init__(inner, times=1)
        self.meanwhile = meanwhile
        self.answered: list[tuple[int, Any]] = []

    async def __call__(self, admission: Admission) -> Admitted:
        if self.times == 0:
            return await super().__call__(admission)
        await self.inner(admission)
        self.ran.append(admission)
        self.times = 0
        self.answered.append(await self.meanwhile())
        raise RedisConnectionError("the Redis connection was lost")


async def test_a_request_refused_by_a_lost_admissions_mark_leaves_its_stash_for_the_retry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A refused request must not delete the stash: it belongs to the admission whose
    mark refused it. Before, every `reconnect` verdict deleted it as a started stream's
    would: the lost admission's take-back then reopened a token whose request was gone,
    and the client's retry was refused 401 `token_unknown`, its hold kept until the
    sweeper's deadline."""
    async with Gateway(base_env(f"sqlite:///{tmp_path}/gw.db")) as gw:
        user = await gw.new_user()
        token = (await gw.init_ok(user, {"messages": [HI], "max_tokens": 16}))["stream_token"]
        lost = LostReplyWhileAnotherTries(
            gw.store.admit, lambda: gw.complete(token, {"messages": [HI]})
        )
        monkeypatch.setattr(gw.store, "admit", lost)
        status, answer = await gw.complete(token, {"messages": [HI]})
        assert status == 503, answer
        ((status, answer),) = lost.answered
        assert (status, answer["error"]["code"]) == (401, "token_used"), answer
        await asyncio.gather(*edge_admission._forgetting)  # any stash deletion has happened
        assert await gw.store.get(lost.ran[0].used_key) is None  # taken back
        status, answer = await gw.complete(token, {"messages": [HI]})
        assert status == 200, answer
