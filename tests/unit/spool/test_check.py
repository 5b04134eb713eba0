"""relay.spool.check: SQLite's integrity check and the format version of a
spool file, read-only."""

from __future__ import annotations

import os
import sqlite3

from relay.spool.format import FORMAT_VERSION

from relay.spool.check import check_file
from relay.spool.store import connect


def spool(tmp_path, rows: int = 0) -> str:
    path = str(tmp_path / "worker-0.db")
    conn = connect(path)
    conn.executemany("INSERT INTO body VALUES (?, ?)", [(f"Q{i}", b"x" * 500) for i in range(rows)])
    conn.close()
    return path


def test_a_sound_spool_has_no_problems_and_is_not_written(tmp_path):
    path = spool(tmp_path, rows=10)
    before = os.stat(path).st_mtime_ns, open(path, "rb").read()
    assert check_file(path) == [] and check_file(path, quick=True) == []
    assert (os.stat(path).st_mtime_ns, open(path, "rb").read()) == before


def test_garbage_is_not_a_database(tmp_path):
    path = str(tmp_path / "worker-0.db")
    with open(path, "wb") as file:
        file.write(b"garbage " * 1000)
    assert check_file(path) == ["file is not a database"]


def test_a_truncated_spool_is_malformed(tmp_path):
    path = spool(tmp_path, rows=2000)
    os.truncate(path, os.path.getsize(path) // 2)
    assert check_file(path) == ["database disk image is malformed"]


def test_a_damaged_page_is_reported_by_the_integrity_check(tmp_path):
    path = spool(tmp_path, rows=2000)
    page = sqlite3.connect(path).execute("PRAGMA page_size").fetchone()[0]
    middle = os.path.getsize(path) // page // 2
    with open(path, "r+b") as file:  # scribble over a page in the middle of the body table
        file.seek(page * middle + 8)
        file.write(b"\xff" * 64)
    problems = check_file(path)
    assert problems and all(isinstance(p, str) for p in problems) and problems != ["ok"]


def test_a_newer_format_version_is_a_problem(tmp_path):
    path = spool(tmp_path)
    sqlite3.connect(path, isolation_level=None).execute(
        "UPDATE meta SET value = '7' WHERE key = 'version'")
    assert check_file(path) == [f"format version 7 is newer than this relay's ({FORMAT_VERSION})"]


def test_a_database_that_is_no_spool(tmp_path):
    path = str(tmp_path / "worker-0.db")
    sqlite3.connect(path, isolation_level=None).execute("CREATE TABLE t (x)")
    assert check_file(path) == ["not a spool: no meta table"]
