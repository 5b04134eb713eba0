"""The spool's schema: the tables of a worker's database, the format
version a file records, and the numbered migrations from older versions.

Input: a connection to a spool file.  Output: the file at
``FORMAT_VERSION`` (created, or upgraded in one transaction), or a
``SpoolError`` naming the file when it is damaged (not a database, or
malformed) or was written by a newer relay, which this one refuses rather
than misread.

Tables: ``message`` (envelope, state held|active), ``body`` (stored once
per part), ``recipient`` (per-recipient state, next attempt indexed by due
time, crash count and error), ``txn`` (this worker's decisions as the
coordinator of multi-owner transactions), ``event`` (delivery attempts),
``suppression`` (hard-bounced addresses), ``meta`` (format version, slot
count, worker count, operator settings kept across restarts),
``amqp_intake`` (the AMQP message keys this worker owns, route.shard.key_owner:
for each, the try that holds it — queue id, origin queue, original fields,
the pid of the worker process that consumed it; see spool.seen),
``campaign`` (campaigns seen, first and last activity), ``daily``
(outcomes per day, lane, campaign and domain: the roll-up that outlives
``event_retention``).

Migrations only ever append columns with defaults or add tables and
indexes: recovery copies rows between spools with ``SELECT *``, so every
file at one version has its columns in one order.
"""

from __future__ import annotations

import contextlib
import sqlite3
from typing import Iterator

from relay.errors import SpoolError
from relay.spool.format import FORMAT_VERSION

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS message (
    id TEXT PRIMARY KEY,
    sender TEXT NOT NULL,
    received REAL NOT NULL,
    smtputf8 INTEGER NOT NULL,
    size INTEGER NOT NULL,
    state INTEGER NOT NULL,
    coordinator INTEGER,
    trace INTEGER NOT NULL DEFAULT 0,
    lane TEXT NOT NULL DEFAULT 'transactional',  -- the message's class (relay.model.LANES)
    campaign TEXT NOT NULL DEFAULT '',
    tenant TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS body (id TEXT PRIMARY KEY, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS recipient (
    message_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    address TEXT NOT NULL,
    domain TEXT NOT NULL,
    slot INTEGER NOT NULL,
    state INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL NOT NULL,
    last_reply TEXT,
    crashes INTEGER NOT NULL DEFAULT 0,  -- deliveries of it that raised (a bug)
    error TEXT,  -- the exception of the last such crash: "Type: message"
    lane INTEGER NOT NULL DEFAULT 0,  -- its message's class: 0 transactional, 1 bulk (LANE_CODES)
    PRIMARY KEY (message_id, idx)
);
-- Claims take each lane's due recipients on their own (room per lane).
CREATE INDEX IF NOT EXISTS recipient_lane_due ON recipient (state, lane, next_attempt);
CREATE INDEX IF NOT EXISTS message_campaign ON message (campaign) WHERE campaign != '';
CREATE INDEX IF NOT EXISTS message_held ON message (state) WHERE state = 0;
CREATE TABLE IF NOT EXISTS txn (id TEXT PRIMARY KEY, decided REAL NOT NULL);
CREATE TABLE IF NOT EXISTS event (
    id INTEGER PRIMARY KEY,
    time REAL NOT NULL,
    queue_id TEXT NOT NULL,
    recipient TEXT NOT NULL,
    destination TEXT,
    mx TEXT,
    source_ip TEXT,
    tls INTEGER NOT NULL,
    code INTEGER NOT NULL,
    enhanced TEXT,
    text TEXT NOT NULL,
    outcome TEXT NOT NULL,
    class TEXT,  -- the failure class (outcome.classify), not the lane
    latency REAL NOT NULL,
    lane TEXT,  -- the message's class
    campaign TEXT
);
CREATE INDEX IF NOT EXISTS event_recipient ON event (recipient, time);
CREATE TABLE IF NOT EXISTS suppression (
    address TEXT PRIMARY KEY,
    time REAL NOT NULL,
    reply TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS event_queue_id ON event (queue_id);
CREATE INDEX IF NOT EXISTS event_time ON event (time);
-- AMQP intake: the try that holds each message key this worker owns
-- (redeliveries are recognised by key) and what it carried, for the feeds.
CREATE TABLE IF NOT EXISTS amqp_intake (
    queue_id TEXT PRIMARY KEY,
    key TEXT NOT NULL UNIQUE,
    time REAL NOT NULL,
    queue TEXT NOT NULL,
    fields BLOB NOT NULL,
    pid INTEGER NOT NULL
);
-- Campaigns this worker has mail of: when it came first and last.
CREATE TABLE IF NOT EXISTS campaign (
    name TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    lane TEXT NOT NULL,
    first REAL NOT NULL,
    last REAL NOT NULL
);
-- Outcomes per UTC day, rolled up as events are committed (same
-- transaction); kept when the events are pruned (relayctl report --daily).
CREATE TABLE IF NOT EXISTS daily (
    day TEXT NOT NULL,
    lane TEXT NOT NULL,
    campaign TEXT NOT NULL,
    domain TEXT NOT NULL,
    outcome TEXT NOT NULL,
    count INTEGER NOT NULL,
    PRIMARY KEY (day, lane, campaign, domain, outcome)
) WITHOUT ROWID;
"""

# MIGRATIONS[n] takes a file from version n - 1 to version n.
MIGRATIONS: dict[int, tuple[str, ...]] = {
    2: (  # quarantine: crashes charged to a recipient's delivery
        "ALTER TABLE recipient ADD COLUMN crashes INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE recipient ADD COLUMN error TEXT",
    ),
    3: (  # AMQP intake: consumed messages by key (redeliveries) and their fields (feeds)
        """CREATE TABLE IF NOT EXISTS amqp_intake (
            queue_id TEXT PRIMARY KEY, key TEXT NOT NULL UNIQUE, time REAL NOT NULL,
            queue TEXT NOT NULL, fields BLOB NOT NULL, pid INTEGER NOT NULL)""",
    ),
    # Recipient state 6, held by the operator (relayctl suspend): no new
    # column, but a release that does not know the state must not open it.
    4: (),
    5: (  # lanes and campaigns: the class per message and recipient, campaigns, daily roll-up
        "ALTER TABLE message ADD COLUMN lane TEXT NOT NULL DEFAULT 'transactional'",
        "ALTER TABLE message ADD COLUMN campaign TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE message ADD COLUMN tenant TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE recipient ADD COLUMN lane INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE event ADD COLUMN lane TEXT",
        "ALTER TABLE event ADD COLUMN campaign TEXT",
        "DROP INDEX IF EXISTS recipient_due",  # recipient_lane_due replaces it
        """CREATE TABLE IF NOT EXISTS campaign (name TEXT PRIMARY KEY, tenant TEXT NOT NULL,
            lane TEXT NOT NULL, first REAL NOT NULL, last REAL NOT NULL)""",
        """CREATE TABLE IF NOT EXISTS daily (day TEXT NOT NULL, lane TEXT NOT NULL,
            campaign TEXT NOT NULL, domain TEXT NOT NULL, outcome TEXT NOT NULL,
            count INTEGER NOT NULL, PRIMARY KEY (day, lane, campaign, domain, outcome))
            WITHOUT ROWID""",
    ),
}

# SQLite's codes for a file that is not a database or is malformed.
DAMAGED_CODES = (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)


def spool_error(path: str, exc: sqlite3.Error) -> SpoolError:
    """One line for the operator: which file, and what is wrong with it."""
    if getattr(exc, "sqlite_errorcode", None) in DAMAGED_CODES:
        return SpoolError(f"spool file {path} is damaged: {exc}"
                          " (`relayctl spool check` lists the problems)")
    return SpoolError(f"spool file {path} cannot be used: {exc}")


@contextlib.contextmanager
def reporting(path: str) -> Iterator[None]:
    """SQLite errors inside become ``spool_error(path, ...)``."""
    try:
        yield
    except sqlite3.DatabaseError as exc:
        raise spool_error(path, exc) from None


def recorded_version(conn: sqlite3.Connection, path: str) -> int | None:
    """The format version the file records; None for a new (empty) file."""
    if conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'"
                    ).fetchone() is None:
        return None
    row = conn.execute("SELECT value FROM meta WHERE key = 'version'").fetchone()
    if row is None:
        raise SpoolError(f"spool file {path} is damaged: it records no format version")
    try:
        return int(row[0])
    except ValueError:
        raise SpoolError(f"spool file {path} is damaged: format version {row[0]!r}") from None


def check_version(conn: sqlite3.Connection, path: str) -> int | None:
    """``recorded_version``, refusing a file newer than this relay."""
    version = recorded_version(conn, path)
    if version is not None and version > FORMAT_VERSION:
        raise SpoolError(
            f"spool file {path} has format version {version}, newer than this relay's"
            f" ({FORMAT_VERSION}): run the relay that wrote it"
        )
    return version


def upgrade(conn: sqlite3.Connection, version: int | None) -> None:
    """Create a new file at ``FORMAT_VERSION``, or migrate an older one to
    it; each in one transaction, so a crash leaves the old version whole."""
    if version is None:
        conn.executescript(
            "BEGIN IMMEDIATE;" + SCHEMA
            + f"INSERT OR IGNORE INTO meta VALUES ('version', '{FORMAT_VERSION}'); COMMIT;"
        )
        return
    if version < FORMAT_VERSION:
        conn.execute("BEGIN IMMEDIATE")
        try:
            tables = {row[0] for row in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'")}
            for step in range(version + 1, FORMAT_VERSION + 1):
                for statement in MIGRATIONS[step]:
                    altered = statement.split()[2] if statement.startswith("ALTER TABLE") else None
                    if altered is None or altered in tables:  # a missing table: SCHEMA makes it whole
                        conn.execute(statement)
            conn.execute("UPDATE meta SET value = ? WHERE key = 'version'", (str(FORMAT_VERSION),))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
    conn.executescript(SCHEMA)  # indexes added since (IF NOT EXISTS: cheap)
