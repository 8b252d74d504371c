"""`shared.turns.Turns` under random acquires, cancellations and releases across
owners, the loop stepped by hand so that a cancellation can land between a release
handing a slot over and the waiter resuming with it."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from shared.turns import Turns

OWNERS = ["a", "b", "c", None]


@dataclass
class Caller:
    owner: str | None
    order: int
    task: asyncio.Task[None] | None = None
    granted: bool = False
    released: bool = False
    cancelled: bool = False
    grants: list[int] = field(default_factory=list)


class TurnsMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.slots = 2
        self.turns = Turns(self.slots)
        self.callers: list[Caller] = []
        self.grant_order: list[Caller] = []

    def teardown(self) -> None:
        for caller in self.callers:
            if caller.task is not None and not caller.task.done():
                caller.task.cancel()
        self._settle()
        self.loop.close()

    def _settle(self) -> None:
        for _ in range(5):
            self.loop.run_until_complete(asyncio.sleep(0))

    async def _acquire(self, caller: Caller) -> None:
        await self.turns.acquire(caller.owner)
        caller.granted = True
        self.grant_order.append(caller)

    def _waiting(self) -> list[Caller]:
        return [c for c in self.callers if not c.granted and not c.cancelled]

    def _holding(self) -> list[Caller]:
        return [c for c in self.callers if c.granted and not c.released]

    @rule(owner=st.sampled_from(OWNERS))
    def acquire(self, owner: str | None) -> None:
        caller = Caller(owner, len(self.callers))
        caller.task = self.loop.create_task(self._acquire(caller))
        self.callers.append(caller)

    @rule(settle=st.booleans(), pick=st.integers(0, 1000))
    @precondition(lambda self: any(not c.granted and not c.cancelled for c in self.callers))
    def cancel_a_waiter(self, settle: bool, pick: int) -> None:
        waiting = self._waiting()
        caller = waiting[pick % len(waiting)]
        assert caller.task is not None
        caller.task.cancel()
        caller.cancelled = True
        if settle:
            self._settle()

    @rule(pick=st.integers(0, 1000), cancel_next=st.booleans(), settle=st.booleans())
    @precondition(lambda self: any(c.granted and not c.released for c in self.callers))
    def release(self, pick: int, cancel_next: bool, settle: bool) -> None:
        holding = self._holding()
        caller = holding[pick % len(holding)]
        self.turns.release(caller.owner)
        caller.released = True
        if cancel_next:
            # The slot was just handed over (a future set) but its waiter has not run:
            # a cancellation now must pass the slot on, not lose it.
            for other in self._waiting():
                assert other.task is not None
                other.task.cancel()
                other.cancelled = True
                break
        if settle:
            self._settle()

    @rule()
    def step(self) -> None:
        self._settle()

    @invariant()
    def slots_conserved(self) -> None:
        self._settle()
        # A cancelled caller that had been granted before its cancellation landed
        # gave its slot back itself (`acquire`'s except) and never reports granted.
        holding = len(self._holding())
        assert self.turns._free + sum(self.turns._holding.values()) == self.slots
        assert sum(self.turns._holding.values()) == holding
        assert 0 <= self.turns._free <= self.slots

    @invariant()
    def no_waiter_while_a_slot_is_free(self) -> None:
        self._settle()
        if self.turns._free > 0:
            assert not self._waiting()
            assert not self.turns._waiting

    @invariant()
    def first_come_first_served_within_an_owner(self) -> None:
        for owner in OWNERS:
            granted = [c.order for c in self.grant_order if c.owner == owner]
            assert granted == sorted(granted)
            waiting = [c.order for c in self._waiting() if c.owner == owner]
            if granted and waiting:
                assert max(granted) < min(waiting)

    @invariant()
    def bookkeeping_forgets_idle_owners(self) -> None:
        self._settle()
        for owner in self.turns._latest:
            assert owner in self.turns._holding or owner in self.turns._waiting


TurnsMachine.TestCase.settings = settings(max_examples=400, stateful_step_count=60, deadline=None)
test_turns_state_machine = TurnsMachine.TestCase


def test_a_freed_slot_goes_to_the_owner_waiting_without_one() -> None:
    """Owner b waiting behind three of a's gets the first slot a frees, before a's."""

    async def scenario() -> list[str]:
        turns = Turns(1)
        order: list[str] = []
        await turns.acquire("a")

        async def one(owner: str) -> None:
            await turns.acquire(owner)
            order.append(owner)
            turns.release(owner)

        tasks = [asyncio.create_task(one(o)) for o in ["a", "a", "a", "b"]]
        await asyncio.sleep(0)
        turns.release("a")
        await asyncio.gather(*tasks)
        return order

    assert asyncio.run(scenario()) == ["b", "a", "a", "a"]


def test_a_waiting_owner_is_overtaken_by_one_round_of_newcomers_at_most() -> None:
    """B's second check waits while a newcomer arrives before every release (a
    steady stream of owners with one check each, as fast as the slot serves them):
    it is served after at most the newcomers that came before B's last slot was
    handed out. Before: not while they came (49 newcomers served, it still waiting)."""

    async def scenario() -> list[str]:
        turns = Turns(1)
        order: list[str] = []
        await turns.acquire("x")

        async def one(owner: str) -> None:
            await turns.acquire(owner)
            order.append(owner)

        tasks = [asyncio.create_task(one("B")) for _ in range(2)]
        await asyncio.sleep(0)
        holder = "x"
        for i in range(20):
            tasks.append(asyncio.create_task(one(f"n{i}")))
            await asyncio.sleep(0)
            turns.release(holder)
            await asyncio.sleep(0)
            holder = order[-1]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return order

    order = asyncio.run(scenario())
    # n0 came before B's first slot, n1 while B held it: then B's second.
    assert [i for i, owner in enumerate(order) if owner == "B"] == [0, 3], order
