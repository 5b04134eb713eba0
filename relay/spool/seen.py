"""Which AMQP messages are spooled or being spooled: the record of each
message key, kept by the key's owner worker, and the lookups around it.

Input: a message key (intake.amqp_message.payload_key) with the try that
wants to spool it, or a queue id.  Output: whether that try may go ahead,
or else the state of the try that holds the key; for the failure feeds, the
origin (queue and original fields) of a message spooled from AMQP.

Every key has one owner worker (route.shard.key_owner: a stable hash of the
key, as domains are sharded).  A try, in whichever worker consumed its copy,
asks the key's owner, over the peer socket (route.forward), to ``claim``
the key before handing the message to its owners.  In the owner's spool the
check and the record are one operation of its single writer (INSERT ... ON
CONFLICT DO NOTHING on the unique key, committed before the answer), so of
two copies consumed at once by two workers, after a connection cut or
because one message was published twice, exactly one gets the key.  The
other is told the state of the try that holds it:

* committed (a multi-owner transaction decided by its coordinator: a
  ``txn`` row; or a single part stored active; or gone already with its
  delivery events) -> the copy is acked without being stored;
* in flight (not committed, and the worker process that holds the key still
  runs, recorded less than ``IN_FLIGHT_LIMIT`` ago) -> the copy is nacked and
  seen again shortly;
* abandoned (its worker died before committing, or the record is older than
  any try can last) -> the record is taken over, atomically again (only if
  it is still the one found), and the copy is stored; the held parts of the
  dead try are dropped by their owners' held-part check.

A try that fails removes its record (``forget``).  So a message whose key
is recorded, committed or in flight, is never stored again.  Liveness is
looked at before commitment: a worker found dead cannot commit afterwards.

The commitment lookups read every ``worker-N.db`` in the spool directory
through read-only connections (WAL: readers never block the writer), on a
thread of their own; they run only when a key is already recorded.  Spools
that do not exist yet are skipped.  spool.recover moves records to their
key's owner when the worker count changes.
"""

from __future__ import annotations

import asyncio
import glob
import os
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor

from relay.errors import SpoolError
from relay.spool.format import MessageState


COMMITTED = "committed"
IN_FLIGHT = "in flight"
# A try cannot take much longer than this (route.forward gives an owner
# 30 s): an older record that never committed is a try whose failure went
# unrecorded, and its copies are stored rather than kept waiting.
IN_FLIGHT_LIMIT = 60.0
# Takeovers of abandoned records tried in a row before the copy is sent
# back (another copy took the key over meanwhile: it is in flight).
TAKEOVER_TRIES = 3


def _alive(pid: int) -> bool:
    """Whether a worker process (of this host: the spool is local) still runs."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class IntakeIndex:
    """One worker's side: the keys it owns (in its ``spool``), and the
    read-only lookups across every spool."""

    def __init__(self, spool_dir: str, spool=None) -> None:
        self.spool_dir = spool_dir
        self.spool = spool  # spool.store.Spool of this worker: claim_intake, forget_intake
        self._conns: dict[str, sqlite3.Connection] = {}
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spool-seen")

    def _connections(self) -> list[tuple[str, sqlite3.Connection]]:
        for path in glob.glob(os.path.join(self.spool_dir, "worker-*.db")):
            if path not in self._conns:
                conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
                conn.execute("PRAGMA busy_timeout=5000")
                self._conns[path] = conn
        return list(self._conns.items())

    def _lookup(self, sql: str, value: str):
        for _, conn in self._connections():
            try:
                row = conn.execute(sql, (value,)).fetchone()
            except sqlite3.OperationalError as exc:
                if "no such table" in str(exc):
                    continue  # a spool made before AMQP intake existed, not opened since
                raise
            if row is not None:
                return row
        return None

    def _committed(self, queue_id: str) -> bool:
        """Whether the try spooled as ``queue_id`` committed, in any spool
        (queue ids are unique across workers)."""
        for _, conn in self._connections():
            # Split across owners: committed once its coordinator decided.
            # One owner: committed when its part was stored, active; or it
            # was delivered and left the queue, leaving its events.
            if conn.execute("SELECT 1 FROM txn WHERE id = ?", (queue_id,)).fetchone() or \
                    conn.execute("SELECT 1 FROM message WHERE id = ? AND state = ?",
                                 (queue_id, int(MessageState.ACTIVE))).fetchone() or \
                    conn.execute("SELECT 1 FROM event WHERE queue_id = ? LIMIT 1",
                                 (queue_id,)).fetchone():
                return True
        return False

    async def _run(self, fn, *args):
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        except sqlite3.Error as exc:
            raise SpoolError(f"spool read failed: {exc}") from None

    async def claim(self, key: str, queue_id: str, queue: str, fields: bytes,
                    pid: int) -> tuple[str, str] | None:
        """As the key's owner: None when the try of worker process ``pid``
        (spooling it as ``queue_id``) holds the key now and may store the
        message; else (COMMITTED | IN_FLIGHT, queue id) of the try that
        holds it."""
        replacing = None
        for _ in range(TAKEOVER_TRIES):
            holder = await self.spool.claim_intake(key, queue_id, queue, fields, pid, replacing)
            if holder is None:
                return None
            held_as, held_by, recorded = holder
            # Alive first: a worker found dead commits nothing afterwards.
            running = _alive(held_by) and recorded > time.time() - IN_FLIGHT_LIMIT
            if await self._run(self._committed, held_as):
                return COMMITTED, held_as
            if running:
                return IN_FLIGHT, held_as  # its worker is still at it: wait for the outcome
            replacing = held_as  # its worker died before the parts committed
        return IN_FLIGHT, held_as

    async def forget(self, queue_id: str) -> None:
        """As the key's owner: a try that failed gives its key back."""
        await self.spool.forget_intake(queue_id)

    async def origin(self, queue_id: str) -> tuple[str, bytes] | None:
        """(queue, original fields as JSON) of a message that came over AMQP."""
        row = await self._run(self._lookup, "SELECT queue, fields FROM amqp_intake WHERE queue_id = ?",
                              queue_id)
        return (row[0], row[1]) if row else None

    def close(self) -> None:
        def close_all():
            for conn in self._conns.values():
                conn.close()
            self._conns.clear()

        self._executor.submit(close_all).result()
        self._executor.shutdown(wait=True)
