"""Which AMQP messages are already spooled, across every worker's spool.

Input: a message key (intake.amqp_message.payload_key) or a queue id.
Output: the queue id it was spooled as, or its origin (queue and original
fields) for the failure feeds; None when no spool has it.

A redelivered message may reach any worker, while the worker that took it
recorded its key in its own spool (Spool.remember_intake) *before* handing
it to the owners.  A recorded key counts only if its message was
committed: a multi-owner transaction decided by its coordinator (the same
worker: the ``txn`` table beside the key), or a single part stored active,
or gone already with its delivery events.  A key whose message has
not committed is "in flight" while the worker process that recorded it
still runs (the consumer nacks the copy and sees it again shortly: a
redelivery after a connection cut, or the same message published twice
and consumed at once, must not race the first try); a try that fails
removes its record (Spool.forget_intake); a record left by a worker that
died is ignored, the redelivery is stored, and the held parts of the first
try are dropped by their owners' held-part check.  So a message whose
first try committed is never stored twice.

Lookups read every ``worker-N.db`` in the spool directory through read-only
connections (WAL: readers never block the writer), on a thread of its own.
Spools that do not exist yet are skipped.
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
    def __init__(self, spool_dir: str) -> None:
        self.spool_dir = spool_dir
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

    def _state(self, key: str) -> tuple[str, str] | None:
        """(COMMITTED or IN_FLIGHT, queue id) of the message recorded under
        ``key``; None if no try of it committed and none is under way."""
        for _, conn in self._connections():
            try:
                row = conn.execute("SELECT queue_id, pid, time FROM amqp_intake WHERE key = ?",
                                   (key,)).fetchone()
            except sqlite3.OperationalError as exc:
                if "no such table" in str(exc):
                    continue  # a spool made before AMQP intake existed, not opened since
                raise
            if row is None:
                continue
            queue_id, pid, recorded = row
            # Split across owners: committed once its coordinator (the worker
            # that recorded the key) decided.
            if conn.execute("SELECT 1 FROM txn WHERE id = ?", (queue_id,)).fetchone():
                return COMMITTED, queue_id
            # One owner: committed when its part was stored, active; or it
            # was delivered and left the queue, leaving its events.
            for _, other in self._connections():
                if other.execute("SELECT 1 FROM message WHERE id = ? AND state = ?",
                                 (queue_id, int(MessageState.ACTIVE))).fetchone() or \
                        other.execute("SELECT 1 FROM event WHERE queue_id = ? LIMIT 1",
                                      (queue_id,)).fetchone():
                    return COMMITTED, queue_id
            if _alive(pid) and recorded > time.time() - IN_FLIGHT_LIMIT:
                return IN_FLIGHT, queue_id  # its worker is still at it: wait for the outcome
            return None  # its worker died before the parts committed
        return None

    async def _run(self, fn, *args):
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        except sqlite3.Error as exc:
            raise SpoolError(f"spool read failed: {exc}") from None

    async def find(self, key: str) -> tuple[str, str] | None:
        """(COMMITTED | IN_FLIGHT, queue id) for a message with this key, or
        None: no try of it committed and none is under way."""
        return await self._run(self._state, key)

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
