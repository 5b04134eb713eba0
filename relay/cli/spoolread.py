"""relayctl's read layer: the workers' spools, read-only, for queue, show,
grep and report.

Input: the settings (``relay.spool_dir``, ``relay.run_dir``) and the verb's
``--offline`` flag.  Output: one ``SpoolReader`` per ``worker-N.db`` that
runs short read-only queries, and pure functions that turn the rows those
queries return into the summaries the verbs print (``queue_shape``,
``message_view``, ``failure_report``), so the summaries are tested without
files.

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

import argparse
import bisect
import datetime
import os
import re
import sqlite3
import sys
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

from relay import config
from relay.cli import control
from relay.errors import ConfigError, SpoolError
from relay.intake.policy import BadDomain, routing_domain
from relay.spool import schema
from relay.spool.format import FORMAT_VERSION, MessageState, RecipientState
from relay.spool.recover import existing_spools

# Rows per statement in a table scan: a few milliseconds of work each.
CHUNK = 20_000
# How long a busy database is retried before the verb gives up.
BUSY_FOR = 2.0
BUSY_TIMEOUT_MS = 250

WAITING_STATES = (int(RecipientState.QUEUED), int(RecipientState.DEFERRED),
                  int(RecipientState.SENDING))
FINAL_STATES = (int(RecipientState.DELIVERED), int(RecipientState.BOUNCED))
# States with no next attempt to show.
UNSCHEDULED_STATES = FINAL_STATES + (int(RecipientState.QUARANTINED),)
QUARANTINED = int(RecipientState.QUARANTINED)
MAX_LISTED = 100  # quarantined messages named by `queue`
FAILURE_OUTCOMES = ("deferred", "bounced", "dropped")

EVENT_SELECT = (
    "SELECT time, queue_id, recipient, destination, mx, source_ip, tls, code, enhanced,"
    " text, outcome, class, latency FROM event"
)


class ReadError(Exception):
    """A verb cannot read the spool; ``status`` is its exit status."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


# -- records (what the queries return, what the pure functions take) ------


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

    @classmethod
    def from_row(cls, worker: int, row: tuple) -> Event:
        (when, queue_id, recipient, destination, mx, source_ip, tls, code, enhanced, text,
         outcome, failure_class, latency) = row
        return cls(worker, when, queue_id, recipient, destination, mx, source_ip, bool(tls),
                   code, enhanced, text, outcome, failure_class, latency)

    def as_json(self) -> dict:
        return {
            "time": self.time, "worker": self.worker, "queue_id": self.queue_id,
            "recipient": self.recipient, "destination": self.destination, "mx": self.mx,
            "source_ip": self.source_ip, "tls": self.tls, "code": self.code,
            "enhanced": self.enhanced, "text": self.text, "outcome": self.outcome,
            "class": self.failure_class, "latency": self.latency,
        }


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


# -- queue shape (pure) ---------------------------------------------------

# qshape's age buckets, in minutes: each doubles the one before.
BUCKET_EDGES = (5, 10, 20, 40, 80, 160, 320)
BUCKETS = tuple(
    [f"{lo}-{hi}m" for lo, hi in zip((0,) + BUCKET_EDGES, BUCKET_EDGES)] + [f"{BUCKET_EDGES[-1]}m+"]
)
_EDGE_SECONDS = tuple(60.0 * minutes for minutes in BUCKET_EDGES)


def age_bucket(age: float) -> int:
    """Index in ``BUCKETS`` of an age in seconds; each bucket is [low, high).
    A negative age (the clock went back) counts as new."""
    return bisect.bisect_right(_EDGE_SECONDS, age)


@dataclass(frozen=True, slots=True)
class ShapeRow:
    name: str
    total: int
    by_age: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class QueueShape:
    total: int  # waiting recipients in active messages
    by_age: tuple[int, ...]  # the TOTAL row
    held: int  # waiting recipients in held parts (not in total)
    rows: tuple[ShapeRow, ...]  # largest first


def queue_shape(rows: Iterable[WaitingRow], now: float,
                group: Callable[[str], str] | None = None) -> QueueShape:
    """Count waiting recipients per domain (or per ``group(domain)``, e.g.
    its destination) and age bucket, largest total first, ties by name."""
    counts: dict[str, list[int]] = {}
    by_age = [0] * len(BUCKETS)
    held = 0
    for row in rows:
        if row.held:
            held += row.count
            continue
        name = group(row.domain) if group else row.domain
        bucket = age_bucket(now - row.received)
        counts.setdefault(name, [0] * len(BUCKETS))[bucket] += row.count
        by_age[bucket] += row.count
    shaped = sorted(
        (ShapeRow(name, sum(ages), tuple(ages)) for name, ages in counts.items()),
        key=lambda r: (-r.total, r.name),
    )
    return QueueShape(sum(by_age), tuple(by_age), held, tuple(shaped))


def latest_destinations(rows: Iterable[tuple[str, str, float]]) -> dict[str, str]:
    """domain -> the destination of its latest event, from
    (domain, destination, time) rows."""
    latest: dict[str, tuple[float, str]] = {}
    for domain, destination, when in rows:
        if domain not in latest or when > latest[domain][0]:
            latest[domain] = (when, destination)
    return {domain: destination for domain, (_, destination) in latest.items()}


# -- one message (pure) ---------------------------------------------------


def state_name(state: int) -> str:
    try:
        return RecipientState(state).name.lower()
    except ValueError:
        return f"unknown({state})"


def message_state_name(state: int) -> str:
    try:
        return MessageState(state).name.lower()
    except ValueError:
        return f"unknown({state})"


@dataclass(frozen=True)
class MessageView:
    """One queue id as every worker's spool knows it."""

    queue_id: str
    parts: tuple[MessagePart, ...]  # by worker; empty once the message left the queue
    recipients: tuple[RecipientRow, ...]  # by index in the transaction
    events: tuple[Event, ...]  # oldest first

    @property
    def in_queue(self) -> bool:
        return bool(self.parts)

    @property
    def deleted(self) -> float | None:
        """When ``relayctl delete`` removed it (None: it was not deleted)."""
        if self.in_queue:
            return None
        return next((e.time for e in reversed(self.events) if e.outcome == "deleted"), None)

    def as_json(self) -> dict:
        first = self.parts[0] if self.parts else None
        return {
            "queue_id": self.queue_id,
            "in_queue": self.in_queue,
            "deleted": self.deleted,
            "sender": first.sender if first else None,
            "received": first.received if first else None,
            "size": first.size if first else None,
            "smtputf8": first.smtputf8 if first else None,
            "parts": [
                {"worker": p.worker, "state": message_state_name(p.state),
                 "coordinator": p.coordinator}
                for p in self.parts
            ],
            "recipients": [
                {"index": r.index, "address": r.address, "domain": r.domain,
                 "worker": r.worker, "state": state_name(r.state), "attempts": r.attempts,
                 "next_attempt": None if r.state in UNSCHEDULED_STATES else r.next_attempt,
                 "last_reply": r.last_reply, "crashes": r.crashes, "error": r.error}
                for r in self.recipients
            ],
            "events": [e.as_json() for e in self.events],
        }


def message_view(queue_id: str, parts: Iterable[MessagePart],
                 recipients: Iterable[RecipientRow], events: Iterable[Event]) -> MessageView | None:
    """Merge the parts of one queue id (a transaction split between owners
    has one part per owner).  None when no spool knows the id at all."""
    view = MessageView(
        queue_id,
        tuple(sorted(parts, key=lambda p: p.worker)),
        tuple(sorted(recipients, key=lambda r: (r.index, r.worker))),
        tuple(sorted(events, key=lambda e: (e.time, e.worker))),
    )
    if not (view.parts or view.recipients or view.events):
        return None
    return view


# -- grep (pure) ----------------------------------------------------------


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


def newest_first(events: Iterable[Event], limit: int | None = None) -> list[Event]:
    ordered = sorted(events, key=lambda e: (e.time, e.worker), reverse=True)
    return ordered[:limit] if limit else ordered


# -- report (pure) --------------------------------------------------------


def address_domain(address: str) -> str:
    """The lower-cased A-label domain of an address (as written if it has none)."""
    domain = address.rpartition("@")[2]
    try:
        return routing_domain(domain)
    except BadDomain:
        return domain.lower()


def failure_report(rows: Iterable[FailureRow]) -> list[FailureRow]:
    """Merge failure groups counted in different chunks or spools, largest
    count first (ties: domain, code); each keeps its latest reply text."""
    merged: dict[tuple, FailureRow] = {}
    for row in rows:
        seen = merged.get(row.key)
        if seen is None:
            merged[row.key] = row
            continue
        latest = row if row.last_time > seen.last_time else seen
        merged[row.key] = FailureRow(*row.key, seen.count + row.count, latest.last_time,
                                     latest.last_text)
    return sorted(merged.values(),
                  key=lambda r: (-r.count, r.domain, r.code, r.enhanced or "", r.outcome,
                                 r.failure_class or ""))


# -- human output (pure) --------------------------------------------------


def iso_local(when: float | None) -> str:
    """A time as local ISO 8601 with its UTC offset, to the second."""
    if when is None:
        return "-"
    return datetime.datetime.fromtimestamp(when).astimezone().isoformat(timespec="seconds")


def printable(text: str) -> str:
    """Reply texts come from remote servers: control characters (escape
    sequences that would drive the operator's terminal, newlines that would
    break the table) are shown escaped."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def table(headers: Iterable[str], rows: Iterable[Iterable[Any]], right: Iterable[int] = ()) -> str:
    """Columns padded to their widest cell (``right``: right-aligned, for
    numbers); the last column is never padded, so long texts just run on."""
    right = set(right)
    cells = [[printable(h) for h in headers]]
    cells += [["-" if c is None else printable(str(c)) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    lines = []
    for row in cells:
        out = []
        for i, cell in enumerate(row):
            if i == len(row) - 1 and i not in right:
                out.append(cell)
            else:
                out.append(cell.rjust(widths[i]) if i in right else cell.ljust(widths[i]))
        lines.append("  ".join(out).rstrip())
    return "\n".join(lines)


# -- the databases --------------------------------------------------------


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
                    "SELECT id, sender, received, smtputf8, size, state, coordinator"
                    " FROM message WHERE id = ?", (queue_id,))
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

    def failures(self, since: float) -> Iterator[FailureRow]:
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


# -- what every read verb shares ------------------------------------------


def queue_id(text: str) -> str:
    """Queue ids are upper-case hex; accept them as typed in lower case too."""
    return text.upper() if _HEX.fullmatch(text) else text


_HEX = re.compile(r"[0-9A-Fa-f]+")


def add_common_arguments(parser) -> None:
    parser.add_argument("--offline", action="store_true",
                        help="read the spool of a stopped relay (after a crash, say)")


@dataclass
class Spools:
    """Every worker spool of a relay, open for reading; a context manager."""

    readers: list[SpoolReader] = field(default_factory=list)

    def __enter__(self) -> Spools:
        return self

    def __exit__(self, *exc) -> None:
        for reader in self.readers:
            reader.close()


def open_spools(args) -> Spools:
    """Load the settings, insist that the relay runs (unless --offline) and
    open every ``worker-N.db`` in its spool directory.  Raises ReadError."""
    try:
        settings = config.load(args.config)
    except ConfigError as exc:
        raise ReadError(str(exc), status=2) from None
    if not args.offline:
        try:
            control.status(settings.relay.run_dir)
        except control.NotRunning as exc:
            reason = str(exc)
            if not reason.startswith("the relay is not running"):
                reason = f"the relay is not running: {reason}"
            raise ReadError(
                f"{reason}; use --offline to read the spool of a stopped relay") from None
        except control.ControlError:
            pass  # it answered, so it runs; the spool is read directly anyway
    spool_dir = settings.relay.spool_dir
    if not os.path.isdir(spool_dir):
        problem = "is not a directory" if os.path.exists(spool_dir) else "does not exist"
        raise ReadError(f"spool directory {spool_dir} {problem} (relay.spool_dir in {args.config})")
    spools = Spools()
    try:
        for worker, path in sorted(existing_spools(spool_dir).items()):
            spools.readers.append(SpoolReader(worker, path))
    except ReadError:
        spools.__exit__()
        raise
    return spools


def positive(text: str) -> int:
    """argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return value


def fail(message: str, status: int = 1) -> int:
    print(f"relayctl: {message}", file=sys.stderr)
    return status
