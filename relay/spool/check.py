"""Checking a spool file (``relayctl spool check``): SQLite's integrity
check, and the format version, without writing anything.

Input: the path of a ``worker-N.db``.  Output: the problems found, one
line each; none when the file is sound.  The file is opened read-only
(``mode=ro``), so a check works on the spool of a stopped relay as well as
on a running one; on a running relay the check is one long read
transaction, which keeps the writer's checkpoints from passing it (the WAL
grows while it lasts), so it is for an operator's occasional use.
"""

from __future__ import annotations

import os
import sqlite3
import urllib.parse

from relay.errors import SpoolError
from relay.spool.format import FORMAT_VERSION
from relay.spool.schema import recorded_version

BUSY_TIMEOUT = 5.0
MAX_PROBLEMS = 100  # integrity_check stops after this many


def check_file(path: str, quick: bool = False) -> list[str]:
    """SQLite's ``integrity_check`` (``quick_check`` with ``quick``: no
    index contents compared, O(N) instead of O(N log N)), then the format
    version this relay can use."""
    uri = "file:" + urllib.parse.quote(os.path.abspath(path)) + "?mode=ro"
    try:
        conn = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=BUSY_TIMEOUT)
    except sqlite3.Error as exc:
        return [f"cannot open: {exc}"]
    try:
        pragma = "quick_check" if quick else "integrity_check"
        problems = [row[0] for row in conn.execute(f"PRAGMA {pragma}({MAX_PROBLEMS})")]
        if problems == ["ok"]:
            problems = []
        try:
            version = recorded_version(conn, path)
        except SpoolError as exc:
            problems.append(str(exc).removeprefix(f"spool file {path} is damaged: "))
        else:
            if version is None:
                problems.append("not a spool: no meta table")
            elif version > FORMAT_VERSION:
                problems.append(f"format version {version} is newer than this relay's"
                                f" ({FORMAT_VERSION})")
        return problems
    except sqlite3.DatabaseError as exc:
        return [str(exc)]
    finally:
        conn.close()
