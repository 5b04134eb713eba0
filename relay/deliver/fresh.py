"""Bodies of fresh mail, kept in memory from intake to the first transaction.

Input: a message's body once the spool has stored it with its recipients
claimed at birth (``Spool.fresh``).  Output: a holder the message's jobs
share, so their first transaction needs no read of the body back from
SQLite.  The bytes count against a budget from the reservation (before the
commit) until the last job lets go of the holder; a full budget sends new
mail the old way (the spool's claim).  A message the operator deletes
loses its holder's body: its transaction then reads the spool and finds
nothing, as it always did.
"""

from __future__ import annotations

import weakref

BUDGET = 64 * 1024 * 1024  # bytes of bodies per worker (max_loaded bounds the recipients)


class FreshBody:
    """A body and its reservation, which ends when the last job lets go."""

    __slots__ = ("body", "_size", "_bodies", "__weakref__")

    def __init__(self, body: bytes, bodies: FreshBodies) -> None:
        self.body: bytes | None = body
        self._size = len(body)
        self._bodies = bodies

    def __del__(self) -> None:  # cheaper than a weakref.finalize per message
        self._bodies.unreserve(self._size)


class FreshBodies:
    def __init__(self, budget: int = BUDGET) -> None:
        self.budget = budget
        self.held = 0  # bytes reserved or held
        self._by_queue_id: weakref.WeakValueDictionary[str, FreshBody] = weakref.WeakValueDictionary()

    def reserve(self, size: int) -> bool:
        if self.held + size > self.budget:
            return False
        self.held += size
        return True

    def unreserve(self, size: int) -> None:
        self.held -= size

    def keep(self, queue_id: str, body: bytes) -> FreshBody:
        """The holder of a reserved body; the reservation ends with it."""
        holder = FreshBody(body, self)
        self._by_queue_id[queue_id] = holder
        return holder

    def forget(self, queue_id: str) -> None:
        """The message was deleted: no transaction may send it from memory."""
        holder = self._by_queue_id.get(queue_id)
        if holder is not None:
            holder.body = None
