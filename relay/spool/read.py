"""The spool's read API: one worker's spool, read-only, for relayctl's read
verbs (queue, show, grep, report, mailq), the admin API, perf/ and the
tests; nobody outside relay.spool writes SQL against the spool's tables.

Input: the path of a ``worker-N.db`` (or a spool directory, for
``open_readers``).  Output: a ``SpoolReader`` whose queries return frozen
dataclasses (waiting recipients, held parts, quarantined recipients, the
destinations of waiting mail, one message with its recipients and events,
events by recipient or time, failure groups, counts), read at this
relay's format version only: an older or newer file is reported, never
misread.

These reads must never slow delivery down.  Every database is opened with
``mode=ro`` (this process cannot write to a spool, whatever it does).  In
WAL mode a reader never blocks the writer, but a read transaction pins the
WAL: the writer's checkpoints cannot pass it, so the WAL grows while it
lasts.  Hence no long transactions: scans of whole tables (recipients for
``queue``, events for ``grep`` and ``report``) go in rowid ranges of at
most ``CHUNK`` rows, each its own statement.  A scan is therefore not one
snapshot; like Postfix's qshape it is a picture of a moving queue.  A
database that is busy (a writer in the middle of recovery, say) is retried
for up to ``BUSY_FOR`` seconds, then reported.
"""

from __future__ import annotations

import os
import sqlite3
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from relay.errors import SpoolError
from relay.intake.policy import BadDomain, routing_domain
from relay.spool import schema
from relay.spool.format import FORMAT_VERSION, MessageState, RecipientState
from relay.spool.recover import existing_spools
from relay.spool.store import EVENT_COLUMNS

# Rows per statement in a table scan: a few milliseconds of work each.
CHUNK = 20_000
# How long a busy database is retried before a read gives up.
BUSY_FOR = 2.0
BUSY_TIMEOUT_MS = 250

WAITING_STATES = (int(RecipientState.QUEUED), int(RecipientState.DEFERRED),
                  int(RecipientState.SENDING), int(RecipientState.HELD))
FINAL_STATES = (int(RecipientState.DELIVERED), int(RecipientState.BOUNCED))
# States with no next attempt to show.
UNSCHEDULED_STATES = FINAL_STATES + (int(RecipientState.QUARANTINED), int(RecipientState.HELD))
QUARANTINED = int(RecipientState.QUARANTINED)
MAX_LISTED = 100  # quarantined messages named by `queue`
FAILURE_OUTCOMES = ("deferred", "bounced", "dropped")

EVENT_SELECT = "SELECT " + ", ".join(EVENT_COLUMNS) + " FROM event"


class ReadError(Exception):
    """A verb cannot read the spool; ``status`` is its exit status."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


# -- records (what the queries return) ------------------------------------


@dataclass(frozen=True, slots=True)
class WaitingRow:
    """``count`` recipients of one domain, still to be delivered, in messages
    received at ``received`` (seconds)."""

    domain: str
    held: bool  # in a part of a multi-owner transaction awaiting its decision
    received: float
    count: int = 1


@dataclass(frozen=True, slots=True)
class WaitingRecipient:
    """One recipient still to be delivered and its message's envelope."""

    worker: int
    queue_id: str
    sender: str
    received: float
    size: int
    message_state: int  # MessageState
    address: str
    state: int  # RecipientState
    last_reply: str | None


@dataclass(frozen=True, slots=True)
class MessagePart:
    worker: int
    queue_id: str
    sender: str
    received: float
    smtputf8: bool
    size: int
    state: int  # MessageState
    coordinator: int | None
    lane: str = "transactional"  # its class
    campaign: str = ""
    tenant: str = ""


@dataclass(frozen=True, slots=True)
class RecipientRow:
    worker: int
    queue_id: str
    index: int
    address: str
    domain: str
    state: int  # RecipientState
    attempts: int
    next_attempt: float
    last_reply: str | None
    crashes: int = 0  # deliveries of it that crashed the worker
    error: str | None = None  # the last such crash's exception


@dataclass(frozen=True, slots=True)
class Event:
    worker: int
    time: float
    queue_id: str
    recipient: str
    destination: str | None
    mx: str | None
    source_ip: str | None
    tls: bool
    code: int
    enhanced: str | None
    text: str
    outcome: str
    failure_class: str | None  # the ``class`` column
    latency: float
    lane: str | None = None  # the message's class (None: an event from before lanes)
    campaign: str | None = None

    @classmethod
    def from_row(cls, worker: int, row: tuple) -> Event:
        (when, queue_id, recipient, destination, mx, source_ip, tls, code, enhanced, text,
         outcome, failure_class, latency, lane, campaign) = row
        return cls(worker, when, queue_id, recipient, destination, mx, source_ip, bool(tls),
                   code, enhanced, text, outcome, failure_class, latency, lane, campaign)

    def as_json(self) -> dict:
        return {
            "time": self.time, "worker": self.worker, "queue_id": self.queue_id,
            "recipient": self.recipient, "destination": self.destination, "mx": self.mx,
            "source_ip": self.source_ip, "tls": self.tls, "code": self.code,
            "enhanced": self.enhanced, "text": self.text, "outcome": self.outcome,
            "class": self.failure_class, "latency": self.latency,
            "lane": self.lane, "campaign": self.campaign,
        }


@dataclass(frozen=True, slots=True)
class StoredPart:
    """One part as its owner's spool holds it: envelope, body (None if its
    row is missing) and recipients as (address, slot), by index."""

    worker: int
    queue_id: str
    sender: str
    state: int  # MessageState
    body: bytes | None
    recipients: tuple[tuple[str, int], ...]


@dataclass(frozen=True, slots=True)
class Counts:
    """What one spool holds: parts, held parts, recipients per state."""

    messages: int
    held: int
    recipients: dict[RecipientState, int]

    def __getitem__(self, state: RecipientState) -> int:
        return self.recipients.get(state, 0)


@dataclass(frozen=True, slots=True)
class FailureRow:
    """``count`` failures sharing outcome, class, code, enhanced code and
    recipient domain; the latest one's time and reply text."""

    outcome: str
    failure_class: str | None
    code: int
    enhanced: str | None
    domain: str
    count: int
    last_time: float
    last_text: str

    @property
    def key(self) -> tuple:
        return (self.outcome, self.failure_class, self.code, self.enhanced, self.domain)

    def as_json(self) -> dict:
        return {
            "outcome": self.outcome, "class": self.failure_class, "code": self.code,
            "enhanced": self.enhanced, "domain": self.domain, "count": self.count,
            "last_time": self.last_time, "last_text": self.last_text,
        }



# -- what grep looks for (pure) ------------------------------------------


@dataclass(frozen=True, slots=True)
class AddressPattern:
    """What ``grep`` looks for: one address, or every address at a domain
    (``@example.com``).  ``forms`` are the spellings to compare with,
    case-insensitively: as typed, and with the domain in its A-label form
    (the event holds the address as the client wrote it)."""

    domain_only: bool
    forms: tuple[str, ...]

    def sql(self) -> tuple[str, tuple]:
        """A WHERE condition on ``event.recipient`` and its parameters.
        NOCASE and LIKE fold ASCII letters only, as SMTP does for domains."""
        if self.domain_only:
            likes = [_like_escape(form) for form in self.forms]
            return ("(" + " OR ".join(["recipient LIKE ? ESCAPE '\\'"] * len(likes)) + ")",
                    tuple("%" + like for like in likes))
        marks = ", ".join("?" * len(self.forms))
        return f"recipient COLLATE NOCASE IN ({marks})", self.forms


def _like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def address_pattern(text: str) -> AddressPattern:
    """Parse grep's ADDRESS: ``user@example.com``, ``<user@example.com>`` or
    ``@example.com``.  Raises ValueError for anything else."""
    text = text.strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1]
    local, at, domain = text.rpartition("@")
    if not at or not domain:
        raise ValueError(f"expected user@domain or @domain, got {text!r}")
    forms = [text]
    try:
        a_label = routing_domain(domain)
    except BadDomain:
        a_label = domain
    if a_label != domain.lower():
        forms.append(f"{local}@{a_label}")
    return AddressPattern(domain_only=not local, forms=tuple(forms))



def address_domain(address: str) -> str:
    """The lower-cased A-label domain of an address (as written if it has none)."""
    domain = address.rpartition("@")[2]
    try:
        return routing_domain(domain)
    except BadDomain:
        return domain.lower()



# -- one spool, read-only -------------------------------------------------


class SpoolReader:
    """One worker's spool, opened read-only."""

    def __init__(self, worker: int, path: str) -> None:
        self.worker = worker
        self.path = path
        uri = "file:" + urllib.parse.quote(os.path.abspath(path)) + "?mode=ro"
        try:
            self.conn = sqlite3.connect(uri, uri=True, isolation_level=None,
                                        timeout=BUSY_TIMEOUT_MS / 1000, check_same_thread=False)
        except sqlite3.Error as exc:
            raise ReadError(f"{path}: cannot open: {exc}") from None
        self.conn.create_function("address_domain", 1, address_domain, deterministic=True)
        self._version_checked = False

    def close(self) -> None:
        self.conn.close()

    def _check_version(self) -> None:
        """Before the first read: the queries below know this format only."""
        try:
            version = self._read(lambda conn: schema.recorded_version(conn, self.path))
        except SpoolError as exc:
            raise ReadError(str(exc)) from None
        if version is not None and version != FORMAT_VERSION:
            newer = "newer" if version > FORMAT_VERSION else "older"
            raise ReadError(f"{self.path}: format version {version} is {newer} than this"
                            f" relayctl's ({FORMAT_VERSION})"
                            + ("" if version > FORMAT_VERSION else ": starting the relay upgrades it"))
        self._version_checked = True

    def read(self, work: Callable[[sqlite3.Connection], Any]) -> Any:
        """Run ``work(conn)`` in one short read transaction (one snapshot),
        retrying while the database is busy."""
        if not self._version_checked:
            self._check_version()
        return self._read(work)

    def _read(self, work: Callable[[sqlite3.Connection], Any]) -> Any:
        deadline = time.monotonic() + BUSY_FOR
        while True:
            try:
                self.conn.execute("BEGIN")
                try:
                    return work(self.conn)
                finally:
                    self.conn.execute("COMMIT")
            except sqlite3.OperationalError as exc:
                if self.conn.in_transaction:
                    self.conn.execute("ROLLBACK")
                busy = "locked" in str(exc) or "busy" in str(exc)
                if not busy:
                    raise ReadError(f"{self.path}: {exc}") from None
                if time.monotonic() >= deadline:
                    raise ReadError(f"{self.path}: busy for {BUSY_FOR:g}s, try again") from None
                time.sleep(0.05)
            except sqlite3.Error as exc:  # not a spool, or a damaged one
                if self.conn.in_transaction:
                    self.conn.execute("ROLLBACK")
                raise ReadError(f"{self.path}: {exc}") from None

    def query(self, sql: str, params: tuple = ()) -> list[tuple]:
        return self.read(lambda conn: conn.execute(sql, params).fetchall())

    def chunks(self, table_name: str) -> Iterator[tuple[int, int]]:
        """Inclusive rowid ranges that cover ``table_name``, each holding at
        most ``CHUNK`` rows and starting at a row that exists (so the holes
        left by deleted mail are skipped, not walked)."""
        start = self.query(f"SELECT min(rowid) FROM {table_name}")[0][0]
        while start is not None:
            end = start + CHUNK - 1
            yield start, end
            start = self.query(f"SELECT min(rowid) FROM {table_name} WHERE rowid > ?", (end,))[0][0]

    # -- the verbs' queries --

    def waiting(self) -> Iterator[WaitingRow]:
        """Waiting recipients, grouped per domain, message state and second
        of arrival (a campaign collapses into few rows)."""
        marks = ", ".join("?" * len(WAITING_STATES))
        sql = (
            "SELECT r.domain, m.state, CAST(m.received AS INTEGER), count(*) FROM recipient r"
            " JOIN message m ON m.id = r.message_id"
            f" WHERE r.rowid BETWEEN ? AND ? AND r.state IN ({marks}) GROUP BY 1, 2, 3"
        )
        for lo, hi in self.chunks("recipient"):
            for domain, state, received, count in self.query(sql, (lo, hi, *WAITING_STATES)):
                yield WaitingRow(domain, state == MessageState.HELD, float(received), count)

    def quarantined(self) -> tuple[int, list[str]]:
        """Quarantined recipients, and the ids of (at most MAX_LISTED of)
        their messages."""
        count = self.query("SELECT count(*) FROM recipient WHERE state = ?", (QUARANTINED,))[0][0]
        ids = self.query("SELECT DISTINCT message_id FROM recipient WHERE state = ? LIMIT ?",
                         (QUARANTINED, MAX_LISTED)) if count else []
        return count, [row[0] for row in ids]

    def waiting_recipients(self) -> Iterator[WaitingRecipient]:
        """Every recipient still to be delivered, with its message's
        envelope (for ``mailq``), in rowid chunks."""
        marks = ", ".join("?" * len(WAITING_STATES))
        sql = (
            "SELECT m.id, m.sender, m.received, m.size, m.state, r.address, r.state,"
            " r.last_reply FROM recipient r JOIN message m ON m.id = r.message_id"
            f" WHERE r.rowid BETWEEN ? AND ? AND r.state IN ({marks}) ORDER BY r.rowid"
        )
        for lo, hi in self.chunks("recipient"):
            for row in self.query(sql, (lo, hi, *WAITING_STATES)):
                yield WaitingRecipient(self.worker, *row)

    def held_parts(self) -> int:
        # A literal 0 (MessageState.HELD), so the partial index is used.
        return self.query("SELECT count(*) FROM message WHERE state = 0")[0][0]

    def destinations(self) -> Iterator[tuple[str, str, float]]:
        """(domain, destination, time) of the latest attempts at waiting
        recipients: where each domain's mail was last sent."""
        marks = ", ".join("?" * len(WAITING_STATES))
        sql = (
            "SELECT r.domain, e.destination, max(e.time) FROM recipient r"
            " JOIN event e ON e.queue_id = r.message_id AND e.recipient = r.address"
            f" WHERE r.rowid BETWEEN ? AND ? AND r.state IN ({marks})"
            " AND e.destination IS NOT NULL GROUP BY 1, 2"
        )
        for lo, hi in self.chunks("recipient"):
            yield from self.query(sql, (lo, hi, *WAITING_STATES))

    def message(self, queue_id: str) -> tuple[list[MessagePart], list[RecipientRow], list[Event]]:
        def work(conn):
            parts = [
                MessagePart(self.worker, *row[:3], bool(row[3]), *row[4:])
                for row in conn.execute(
                    "SELECT id, sender, received, smtputf8, size, state, coordinator, lane,"
                    " campaign, tenant FROM message WHERE id = ?", (queue_id,))
            ]
            recipients = [
                RecipientRow(self.worker, queue_id, *row)
                for row in conn.execute(
                    "SELECT idx, address, domain, state, attempts, next_attempt, last_reply,"
                    " crashes, error FROM recipient WHERE message_id = ? ORDER BY idx",
                    (queue_id,))
            ]
            events = [
                Event.from_row(self.worker, row)
                for row in conn.execute(EVENT_SELECT + " WHERE queue_id = ?", (queue_id,))
            ]
            return parts, recipients, events

        return self.read(work)

    def body(self, queue_id: str) -> bytes | None:
        rows = self.query("SELECT data FROM body WHERE id = ?", (queue_id,))
        return bytes(rows[0][0]) if rows else None

    def events_for(self, pattern: AddressPattern) -> Iterator[Event]:
        condition, params = pattern.sql()
        sql = EVENT_SELECT + f" WHERE id BETWEEN ? AND ? AND {condition}"
        for lo, hi in self.chunks("event"):
            for row in self.query(sql, (lo, hi, *params)):
                yield Event.from_row(self.worker, row)

    def daily(self, since_day: str) -> list[tuple]:
        """The daily roll-up from ``since_day`` (YYYY-MM-DD, UTC) on:
        (day, lane, campaign, domain, outcome, count) rows (a small table:
        one row per day and combination, never the events)."""
        return self.query("SELECT day, lane, campaign, domain, outcome, count FROM daily"
                          " WHERE day >= ?", (since_day,))

    def failures(self, since: float) -> Iterator[FailureRow]:
        """Failures since ``since`` grouped per chunk of events: a group may
        come once per chunk (relay.cli.spoolread.failure_report merges them)."""
        marks = ", ".join("?" * len(FAILURE_OUTCOMES))
        # SQLite gives the bare column ``text`` from the row holding max(time).
        sql = (
            "SELECT outcome, class, code, enhanced, address_domain(recipient), count(*),"
            " max(time), text FROM event"
            f" WHERE id BETWEEN ? AND ? AND time >= ? AND outcome IN ({marks})"
            " GROUP BY 1, 2, 3, 4, 5"
        )
        for lo, hi in self.chunks("event"):
            for row in self.query(sql, (lo, hi, since, *FAILURE_OUTCOMES)):
                yield FailureRow(*row)

    def delivered(self, since: float) -> int:
        sql = ("SELECT count(*) FROM event WHERE id BETWEEN ? AND ? AND time >= ?"
               " AND outcome = 'delivered'")
        return sum(self.query(sql, (lo, hi, since))[0][0] for lo, hi in self.chunks("event"))


    def recipients(self) -> Iterator[RecipientRow]:
        """Every recipient in any state, in rowid order."""
        sql = ("SELECT message_id, idx, address, domain, state, attempts, next_attempt,"
               " last_reply, crashes, error FROM recipient WHERE rowid BETWEEN ? AND ?"
               " ORDER BY rowid")
        for lo, hi in self.chunks("recipient"):
            for row in self.query(sql, (lo, hi)):
                yield RecipientRow(self.worker, *row)

    def parts(self) -> Iterator[StoredPart]:
        """Every part in the spool, with its body and recipients, in rowid
        chunks of messages (each chunk one snapshot)."""
        def work(lo: int, hi: int) -> list[StoredPart]:
            def read_chunk(conn):
                found = []
                for queue_id, sender, state in conn.execute(
                        "SELECT id, sender, state FROM message WHERE rowid BETWEEN ? AND ?"
                        " ORDER BY rowid", (lo, hi)):
                    body = conn.execute("SELECT data FROM body WHERE id = ?",
                                        (queue_id,)).fetchone()
                    recipients = conn.execute(
                        "SELECT address, slot FROM recipient WHERE message_id = ? ORDER BY idx",
                        (queue_id,)).fetchall()
                    found.append(StoredPart(self.worker, queue_id, sender, state,
                                            None if body is None else bytes(body[0]),
                                            tuple(recipients)))
                return found
            return self.read(read_chunk)

        for lo, hi in self.chunks("message"):
            yield from work(lo, hi)

    def counts(self) -> Counts:
        """Parts, held parts and recipients per state, in one snapshot."""
        def work(conn):
            messages = conn.execute("SELECT count(*) FROM message").fetchone()[0]
            held = conn.execute("SELECT count(*) FROM message WHERE state = 0").fetchone()[0]
            by_state = {}
            for state, count in conn.execute(
                    "SELECT state, count(*) FROM recipient GROUP BY state"):
                try:
                    by_state[RecipientState(state)] = count
                except ValueError:
                    pass  # not a state this relay knows: not counted
            return Counts(messages, held, by_state)

        return self.read(work)

    def events_since(self, since: float, until: float | None = None) -> Iterator[Event]:
        """Events with ``since <= time`` (and ``time < until``), in id order."""
        sql = EVENT_SELECT + " WHERE id BETWEEN ? AND ? AND time >= ?"
        params: tuple = (since,)
        if until is not None:
            sql += " AND time < ?"
            params += (until,)
        for lo, hi in self.chunks("event"):
            for row in self.query(sql + " ORDER BY id", (lo, hi, *params)):
                yield Event.from_row(self.worker, row)


def open_readers(spool_dir: str) -> list[SpoolReader]:
    """A reader for every ``worker-N.db`` in ``spool_dir``, by worker.
    Raises ReadError (and closes those already open)."""
    readers: list[SpoolReader] = []
    try:
        for worker, path in sorted(existing_spools(spool_dir).items()):
            readers.append(SpoolReader(worker, path))
    except ReadError:
        for reader in readers:
            reader.close()
        raise
    return readers
