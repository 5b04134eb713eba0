"""Spools made by hand, for tests: the writes the relay makes only through
its writer thread (a recipient's state, a message's state, an event), and
files that are wrong on purpose (another format version, holes in the
rowids).

Input: a connection from ``store.connect`` (or a path).  Output: the rows
changed, committed.  Nothing in the relay calls this module; it is here so
that the SQL against the spool's tables stays in relay.spool (a test
checks that tests/ and perf/ hold none).
"""

from __future__ import annotations

import sqlite3

from relay.spool.format import MessageState, RecipientState
from relay.spool.store import EVENT_COLUMNS


def set_version(path: str, version: str) -> None:
    """Record ``version`` as the file's format version (an older or a newer
    one, to test what refuses or upgrades it)."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("UPDATE meta SET value = ? WHERE key = 'version'", (version,))
    finally:
        conn.close()


def set_message_state(conn: sqlite3.Connection, queue_id: str, state: MessageState) -> None:
    conn.execute("UPDATE message SET state = ? WHERE id = ?", (int(state), queue_id))


def set_recipient(conn: sqlite3.Connection, queue_id: str, address: str, state: RecipientState,
                  attempts: int, next_attempt: float, last_reply: str | None) -> None:
    conn.execute(
        "UPDATE recipient SET state = ?, attempts = ?, next_attempt = ?, last_reply = ?"
        " WHERE message_id = ? AND address = ?",
        (int(state), attempts, next_attempt, last_reply, queue_id, address))


def insert_recipient(conn: sqlite3.Connection, queue_id: str, index: int, address: str,
                     domain: str, slot: int, state: RecipientState,
                     next_attempt: float = 0) -> None:
    """A recipient row alone (no message, no body): what a reader counts."""
    conn.execute("INSERT INTO recipient (message_id, idx, address, domain, slot, state,"
                 " next_attempt) VALUES (?, ?, ?, ?, ?, ?, ?)",
                 (queue_id, index, address, domain, slot, int(state), next_attempt))


def insert_event(conn: sqlite3.Connection, row: tuple) -> None:
    """One event; ``row`` holds ``store.EVENT_COLUMNS`` in order (the lane
    and campaign may be left out: transactional, none)."""
    row = (tuple(row) + ("transactional", ""))[:len(EVENT_COLUMNS)]
    conn.execute(f"INSERT INTO event ({', '.join(EVENT_COLUMNS)})"
                 f" VALUES ({', '.join('?' * len(EVENT_COLUMNS))})", row)


def delete_events(conn: sqlite3.Connection) -> None:
    conn.execute("DELETE FROM event")


def leave_recipient_holes(conn: sqlite3.Connection) -> None:
    """Write a delivered copy of every recipient and delete the copies
    again: rowids used and freed, as delivered mail leaves them."""
    conn.execute("INSERT INTO recipient (message_id, idx, address, domain, slot, state,"
                 " next_attempt, attempts, last_reply) SELECT message_id, idx + 100, address,"
                 " domain, slot, 2, next_attempt, 0, NULL FROM recipient")
    conn.execute("DELETE FROM recipient WHERE idx >= 100")
    conn.commit()
