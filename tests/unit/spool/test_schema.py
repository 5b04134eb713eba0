"""relay.spool.schema: a spool file's format version is checked at open;
older files are migrated, newer and damaged ones refused with one line
naming the file."""

from __future__ import annotations

import os
import sqlite3

import pytest

from relay.errors import SpoolError
from relay.spool import schema
from relay.spool.format import FORMAT_VERSION
from relay.spool.recover import recover
from relay.spool.store import connect, spool_path

# The recipient table as version 1 wrote it (before the crash columns).
V1_RECIPIENT = """
CREATE TABLE recipient (
    message_id TEXT NOT NULL, idx INTEGER NOT NULL, address TEXT NOT NULL,
    domain TEXT NOT NULL, slot INTEGER NOT NULL, state INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0, next_attempt REAL NOT NULL, last_reply TEXT,
    PRIMARY KEY (message_id, idx)
);
"""


def columns(conn: sqlite3.Connection, table: str) -> list[str]:
    return [row[1] for row in conn.execute(f"PRAGMA table_info({table})")]


def version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT value FROM meta WHERE key = 'version'").fetchone()[0])


def write_v1(path: str) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.executescript(V1_RECIPIENT)
    conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    conn.execute("INSERT INTO meta VALUES ('version', '1'), ('slot_count', '1024')")
    conn.execute("INSERT INTO recipient VALUES ('Q1', 0, 'a@x.example', 'x.example', 7, 1, 2,"
                 " 100.0, '451 later')")
    conn.close()


def test_a_new_spool_records_this_format_version(tmp_path):
    conn = connect(str(tmp_path / "worker-0.db"))
    assert version(conn) == FORMAT_VERSION == 5
    assert columns(conn, "recipient")[-3:] == ["crashes", "error", "lane"]
    assert columns(conn, "message")[-3:] == ["lane", "campaign", "tenant"]
    assert columns(conn, "event")[-2:] == ["lane", "campaign"]


def test_a_version_1_spool_is_upgraded_and_keeps_its_rows(tmp_path):
    path = str(tmp_path / "worker-0.db")
    write_v1(path)
    conn = connect(path)
    assert version(conn) == FORMAT_VERSION
    # Same columns, in the same order, as a new file: recovery copies rows with SELECT *.
    assert columns(conn, "recipient") == columns(connect(str(tmp_path / "new.db")), "recipient")
    assert conn.execute("SELECT address, state, attempts, last_reply, crashes, error"
                        " FROM recipient").fetchall() == [("a@x.example", 1, 2, "451 later", 0, None)]
    conn.close()
    assert version(connect(path)) == FORMAT_VERSION  # opening again changes nothing


def test_a_failed_migration_leaves_the_old_version_whole(tmp_path, monkeypatch):
    path = str(tmp_path / "worker-0.db")
    write_v1(path)
    monkeypatch.setitem(schema.MIGRATIONS, 2, schema.MIGRATIONS[2] + ("NOT SQL",))
    with pytest.raises(SpoolError):
        connect(path)
    conn = sqlite3.connect(path)
    assert version(conn) == 1 and "crashes" not in columns(conn, "recipient")


def test_a_newer_spool_is_refused_untouched(tmp_path):
    path = str(tmp_path / "worker-0.db")
    connect(path).execute("UPDATE meta SET value = '99' WHERE key = 'version'")
    before = open(path, "rb").read()
    with pytest.raises(SpoolError) as raised:
        connect(path)
    message = str(raised.value)
    assert path in message and "version 99" in message and "newer" in message
    assert "\n" not in message
    assert version(sqlite3.connect(path)) == 99
    assert open(path, "rb").read() == before


def test_a_file_of_garbage_is_a_damaged_spool(tmp_path):
    path = str(tmp_path / "worker-0.db")
    with open(path, "wb") as file:
        file.write(b"this is no database " * 400)
    with pytest.raises(SpoolError) as raised:
        connect(path)
    assert str(raised.value).startswith(f"spool file {path} is damaged: file is not a database")


def fill(path: str, rows: int = 2000) -> None:
    conn = connect(path)
    conn.execute("BEGIN")
    conn.executemany("INSERT INTO body VALUES (?, ?)",
                     [(f"Q{i}", b"x" * 500) for i in range(rows)])
    conn.execute("COMMIT")
    conn.close()  # the last connection: the WAL is checkpointed and removed


def test_a_truncated_spool_is_damaged(tmp_path):
    path = str(tmp_path / "worker-0.db")
    fill(path)
    assert not os.path.exists(path + "-wal")
    os.truncate(path, os.path.getsize(path) // 2)
    with pytest.raises(SpoolError) as raised:
        connect(path)
    assert f"spool file {path} is damaged" in str(raised.value)


def test_recovery_names_the_damaged_file(tmp_path):
    spool_dir = str(tmp_path)
    fill(spool_path(spool_dir, 0), rows=10)
    with open(spool_path(spool_dir, 1), "wb") as file:
        file.write(os.urandom(8192))
    with pytest.raises(SpoolError) as raised:
        recover(spool_dir, 2)
    assert spool_path(spool_dir, 1) in str(raised.value)
