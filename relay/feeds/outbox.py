"""The outbox: one feed's persisted cursor over its worker's spool events.

Input: the spool's events (Spool.events_after, in commit order).  Output:
batches of events after the cursor; ``advance`` moves the cursor, durably
(spool meta ``feed.<name>.cursor``), once the feed has delivered a batch.
A feed that crashes before advancing gets the same batch again: feeds are
at-least-once, never lossy.  Events are pruned after
``deliver.event_retention``, which bounds a backlog.
"""

from __future__ import annotations


class Outbox:
    def __init__(self, spool, name: str) -> None:
        self.spool = spool
        self.name = name
        self.cursor = 0
        self.lag = 0  # events committed but not yet through this feed
        self._last = 0  # the newest event id seen

    @property
    def _key(self) -> str:
        return f"feed.{self.name}.cursor"

    async def open(self) -> None:
        saved = await self.spool.get_meta(self._key)
        self.cursor = int(saved) if saved else 0

    async def next_batch(self, limit: int) -> list[dict]:
        last = await self.spool.last_event_id()
        if last < self.cursor:
            # Every event was pruned and ids started again from 1: none of
            # the new ones has been seen.
            await self.advance(0)
        self._last = last
        self.lag = max(last - self.cursor, 0)
        return await self.spool.events_after(self.cursor, limit)

    async def advance(self, cursor: int) -> None:
        await self.spool.set_meta(self._key, str(cursor))
        self.cursor = cursor
        self.lag = max(self._last - cursor, 0)
