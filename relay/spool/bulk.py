"""Offline bulk writes: a spool filled with deferred mail without a relay
or SMTP (perf/'s large deferred backlogs).

Input: the path of a ``worker-N.db``, the worker count it is homed for, and
batches of ``DeferredMessage``.  Output: the file at this relay's format
version (``store.connect``) holding one message, body and DEFERRED
recipient per record, checkpointed so the ``.db`` alone can be copied.

Durability is relaxed for this offline build only (``synchronous=OFF``:
a crash mid-build leaves a spool to throw away); the relay's own writes
never go through here.  Each batch is one transaction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

from relay.spool.format import MessageState, RecipientState
from relay.spool.store import connect


@dataclass(frozen=True, slots=True)
class DeferredMessage:
    """One message with one recipient, deferred after ``attempts`` tries."""

    queue_id: str
    sender: str
    received: float
    body: bytes
    address: str
    domain: str
    slot: int
    attempts: int
    next_attempt: float
    last_reply: str | None


def write_deferred(path: str, workers: int,
                   batches: Iterable[Sequence[DeferredMessage]]) -> None:
    conn = connect(path)
    try:
        conn.execute("PRAGMA synchronous=OFF")
        # The worker count this spool is homed for: the relay's recovery
        # then skips the re-homing pass over every row.
        conn.execute("INSERT OR REPLACE INTO meta VALUES ('workers', ?)", (str(workers),))
        for batch in batches:
            conn.execute("BEGIN")
            conn.executemany(
                # Columns named: later ones (with defaults) may be added to the schema.
                "INSERT INTO message (id, sender, received, smtputf8, size, state)"
                " VALUES (?, ?, ?, 0, ?, ?)",
                [(m.queue_id, m.sender, m.received, len(m.body), int(MessageState.ACTIVE))
                 for m in batch],
            )
            conn.executemany("INSERT INTO body (id, data) VALUES (?, ?)",
                             [(m.queue_id, m.body) for m in batch])
            conn.executemany(
                "INSERT INTO recipient (message_id, idx, address, domain, slot, state,"
                " attempts, next_attempt, last_reply) VALUES (?, 0, ?, ?, ?, ?, ?, ?, ?)",
                [(m.queue_id, m.address, m.domain, m.slot, int(RecipientState.DEFERRED),
                  m.attempts, m.next_attempt, m.last_reply) for m in batch],
            )
            conn.execute("COMMIT")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
