"""Clean-up a cancelled request still owes (a hold to give back, an admission to
take back), run to its end whatever cancels the request, once or again."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable

import anyio


async def despite_cancellation(work: Awaitable[None]) -> None:
    """Run `work` to its end though the calling task is being cancelled: the short,
    bounded clean-up a cancelled request still owes, awaited in its `except` that
    raises the cancellation again afterwards. anyio's shield stops only anyio's own
    cancellations; a server's `task.cancel()` (again) reaches through it, so `work`
    runs in a task of its own, awaited through any of them."""
    task = asyncio.ensure_future(work)
    with anyio.CancelScope(shield=True):
        while not task.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait([task])
    task.result()
