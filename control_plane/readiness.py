"""What `/readyz` checks: the database and the store, each within 5 s."""

from __future__ import annotations

import asyncio

from control_plane.db import Database
from shared.store import Store


async def failing(db: Database, store: Store) -> list[str]:
    """The names of the components that do not answer (empty: ready)."""

    async def store_ok() -> bool:
        try:
            return await asyncio.wait_for(store.ping(), timeout=5)
        except Exception:
            return False

    database, store_good = await asyncio.gather(db.ping(), store_ok())
    return [name for name, good in (("database", database), ("store", store_good)) if not good]
