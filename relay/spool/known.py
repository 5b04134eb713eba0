"""Whether a message (by queue id) is already committed on this host.

Input: a queue id.  Output: True when some worker's spool holds it as
committed mail: a multi-owner transaction its coordinator decided (the
``txn`` table), a part stored active, or mail delivered and gone that
left its events; False otherwise — never stored, or only held parts of a
try whose coordinator did not decide (those are dropped by their owners'
held-part check).

The cluster's shard consumer asks this before storing a part again
(route.cluster): a redelivered part whose first try committed is acked,
not stored twice.  Lookups read every ``worker-N.db`` through read-only
connections (WAL: readers never block the writer), on a thread of their
own.
"""

from __future__ import annotations

import asyncio
import glob
import os
import sqlite3
from concurrent.futures import ThreadPoolExecutor

from relay.errors import SpoolError
from relay.spool.format import MessageState


class Parts:
    def __init__(self, spool_dir: str) -> None:
        self.spool_dir = spool_dir
        self._conns: dict[str, sqlite3.Connection] = {}
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spool-known")

    def _connections(self) -> list[sqlite3.Connection]:
        for path in glob.glob(os.path.join(self.spool_dir, "worker-*.db")):
            if path not in self._conns:
                conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
                conn.execute("PRAGMA busy_timeout=5000")
                self._conns[path] = conn
        return list(self._conns.values())

    def _committed(self, queue_id: str) -> bool:
        for conn in self._connections():
            if (conn.execute("SELECT 1 FROM txn WHERE id = ?", (queue_id,)).fetchone()
                    or conn.execute("SELECT 1 FROM message WHERE id = ? AND state = ?",
                                    (queue_id, int(MessageState.ACTIVE))).fetchone()
                    or conn.execute("SELECT 1 FROM event WHERE queue_id = ? LIMIT 1",
                                    (queue_id,)).fetchone()):
                return True
        return False

    async def committed(self, queue_id: str) -> bool:
        try:
            return await asyncio.get_running_loop().run_in_executor(
                self._executor, self._committed, queue_id)
        except sqlite3.Error as exc:
            raise SpoolError(f"spool read failed: {exc}") from None

    def close(self) -> None:
        def close_all():
            for conn in self._conns.values():
                conn.close()
            self._conns.clear()

        self._executor.submit(close_all).result()
        self._executor.shutdown(wait=True)
