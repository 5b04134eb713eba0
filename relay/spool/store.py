"""One owner worker's spool: SQLite in WAL mode with group commit.

Input: parts handed over by intake (this worker's or another's), decisions
and releases for multi-owner transactions.  Output: durable rows, and an
acknowledgement only once the commit that holds them has been fsynced
(``synchronous=FULL``).

Theory of operation: every write is an operation queued to a single writer
thread that owns the database connection.  The writer takes everything that
queued up while the previous commit was running, applies the operations
and commits them all at once: many concurrent transactions share one fsync
(group commit).  One bad operation fails alone: the batch is then applied
again with each operation in its own SAVEPOINT.  If the commit itself fails
(disk full, I/O error) every operation in the batch fails and the
transaction is rolled back, so nothing is half written.

The tables are declared in relay.spool.schema.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import re
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from relay.errors import SpoolError, SpoolFull
from relay.model import BULK, EVENT_COLUMNS, LANES, TRANSACTIONAL, Event, Part
from relay.route.shard import SLOT_COUNT
from relay.spool import schema
from relay.spool.format import LANE_CODES, MessageState, RecipientState

log = logging.getLogger(__name__)

# Recipients that still wait for delivery (claimable once due).
PENDING_STATES = (int(RecipientState.QUEUED), int(RecipientState.DEFERRED))


@dataclass(frozen=True, slots=True)
class DueRecipient:
    queue_id: str
    index: int
    address: str
    domain: str
    attempts: int
    sender: str
    received: float
    smtputf8: bool
    size: int
    suppressed: str | None = None  # the hard bounce that put the address on the list
    trace: bool = False
    lane: str = TRANSACTIONAL  # the message's class
    campaign: str = ""


@dataclass(frozen=True, slots=True)
class RecipientUpdate:
    """The new state of one recipient after an attempt."""

    queue_id: str
    index: int
    state: RecipientState
    attempts: int
    next_attempt: float
    last_reply: str | None


DELETED_TEXT = "deleted by the operator (relayctl delete)"
CANCELLED_TEXT = "cancelled by the operator (relayctl campaign cancel)"
# Outcomes that end a recipient without delivery or bounce: "dropped" in a campaign's figures.
DROPPED_OUTCOMES = ("dropped", "deleted", "cancelled", "quarantined")

# A batch never grows past this many operations, so one commit stays short.
MAX_BATCH = 512


def spool_path(spool_dir: str, worker: int) -> str:
    return os.path.join(spool_dir, f"worker-{worker}.db")


def connect(path: str) -> sqlite3.Connection:
    """Open a spool database with the durability settings of the contract,
    at this relay's format version (relay.spool.schema).  Raises SpoolError,
    naming the file, for a damaged or newer file."""
    new = not os.path.exists(path)
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        with schema.reporting(path):
            conn.execute("PRAGMA busy_timeout=5000")
            version = schema.check_version(conn, path)  # before anything is written
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            schema.upgrade(conn, version)
            conn.execute("INSERT OR IGNORE INTO meta VALUES ('slot_count', ?)", (str(SLOT_COUNT),))
            slots = conn.execute("SELECT value FROM meta WHERE key = 'slot_count'").fetchone()[0]
        if int(slots) != SLOT_COUNT:
            raise SpoolError(f"spool file {path} was made with {slots} slots,"
                             f" this relay uses {SLOT_COUNT}")
    except BaseException:
        conn.close()
        raise
    if new:
        # The new file's directory entry must survive a crash too.
        fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return conn


def insert_part(conn: sqlite3.Connection, part: Part, next_attempt: float,
                sending: bool = False) -> dict[str, str]:
    """Write one part.  A queue id already in the spool is an error, never a
    silent no-op: a 250 must not stand for someone else's rows.  With
    ``sending`` its recipients are claimed at birth (Spool.fresh) and the
    suppressed ones among them are returned (address -> reply)."""
    state = MessageState.ACTIVE if part.coordinator is None else MessageState.HELD
    # Plain INSERT (not OR IGNORE): a repeated key or a NULL where none
    # belongs fails the operation instead of half-writing it.
    conn.execute(
        "INSERT INTO message (id, sender, received, smtputf8, size, state, coordinator, trace,"
        " lane, campaign, tenant) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            part.queue_id,
            part.sender,
            part.received_at,
            int(part.smtputf8),
            len(part.body),
            int(state),
            part.coordinator,
            int(part.trace),
            part.lane,
            part.campaign,
            part.tenant,
        ),
    )
    conn.execute("INSERT INTO body VALUES (?, ?)", (part.queue_id, part.body))
    lane = LANE_CODES[part.lane]
    state = int(RecipientState.SENDING if sending else RecipientState.QUEUED)
    conn.executemany(
        "INSERT INTO recipient (message_id, idx, address, domain, slot, state,"
        " next_attempt, lane) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        [
            (part.queue_id, r.index, r.address, r.domain, r.slot, state, next_attempt, lane)
            for r in part.recipients
        ],
    )
    if part.campaign:
        conn.execute(
            "INSERT INTO campaign VALUES (?, ?, ?, ?, ?)"
            " ON CONFLICT (name) DO UPDATE SET last = excluded.last",
            (part.campaign, part.tenant, part.lane, part.received_at, part.received_at),
        )
    return suppressed_of(conn, part) if sending else {}


def suppressed_of(conn: sqlite3.Connection, part: Part) -> dict[str, str]:
    """The part's recipients on the suppression list (address -> reply)."""
    addresses = [r.address for r in part.recipients]
    return dict(conn.execute(
        f"SELECT address, reply FROM suppression WHERE address IN ({', '.join('?' * len(addresses))})",
        addresses,
    ).fetchall())


def due_of(part: Part, suppressed: dict[str, str]) -> list[DueRecipient]:
    """A part's recipients as a claim returns them (first attempt)."""
    return [DueRecipient(part.queue_id, r.index, r.address, r.domain, 0, part.sender,
                         part.received_at, part.smtputf8, len(part.body),
                         suppressed.get(r.address), part.trace, part.lane, part.campaign)
            for r in part.recipients]


_INSERT_EVENT = (f"INSERT INTO event ({', '.join(EVENT_COLUMNS)})"
                 f" VALUES ({', '.join('?' * len(EVENT_COLUMNS))})")
_ROLL_UP = ("INSERT INTO daily VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT"
            " (day, lane, campaign, domain, outcome) DO UPDATE SET count = count + excluded.count")


def labels_of(conn: sqlite3.Connection, queue_id: str) -> tuple[str, str]:
    """A message's (lane, campaign)."""
    row = conn.execute("SELECT lane, campaign FROM message WHERE id = ?", (queue_id,)).fetchone()
    return (row[0], row[1]) if row else (TRANSACTIONAL, "")


def day_of(when: float) -> str:
    """The UTC day of a time, as the daily roll-up keys it."""
    return _day_named(int(when // 86400))


@functools.lru_cache(maxsize=64)  # an event per recipient, nearly all of them today's
def _day_named(day: int) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(day * 86400))


def insert_events(conn: sqlite3.Connection, events: list) -> None:
    """Store events and add them to the daily roll-up, in the caller's
    transaction: the roll-up is incremental, never a scan of the events."""
    conn.executemany(_INSERT_EVENT, events)
    counts: dict[tuple, int] = {}
    for event in events:
        domain = event.recipient.rpartition("@")[2].lower()
        key = (day_of(event.time), event.lane or "transactional", event.campaign or "", domain,
               event.outcome)
        counts[key] = counts.get(key, 0) + 1
    conn.executemany(_ROLL_UP, [(*key, count) for key, count in counts.items()])
    campaigns: dict[str, float] = {}
    for event in events:
        if event.campaign:
            campaigns[event.campaign] = max(campaigns.get(event.campaign, 0.0), event.time)
    if campaigns:
        conn.executemany("UPDATE campaign SET last = max(last, ?) WHERE name = ?",
                         [(when, name) for name, when in campaigns.items()])


def delete_message(conn: sqlite3.Connection, queue_id: str) -> None:
    conn.execute("DELETE FROM recipient WHERE message_id = ?", (queue_id,))
    conn.execute("DELETE FROM body WHERE id = ?", (queue_id,))
    conn.execute("DELETE FROM message WHERE id = ?", (queue_id,))


class _Op:
    __slots__ = ("apply", "future", "wakes")

    def __init__(self, apply: Callable[[sqlite3.Connection], Any], future: asyncio.Future,
                 wakes: bool):
        self.apply = apply
        self.future = future
        self.wakes = wakes  # commits mail that may be delivered now


async def _query_on(executor: ThreadPoolExecutor, conn: sqlite3.Connection,
                    query: Callable[[sqlite3.Connection], Any]) -> Any:
    try:
        return await asyncio.get_running_loop().run_in_executor(executor, query, conn)
    except sqlite3.Error as exc:
        raise SpoolError(f"spool read failed: {exc}") from None


def _regexp(pattern: str, value: str) -> bool:
    return value is not None and re.search(pattern, value) is not None


def _is_disk_full(exc: BaseException) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    return code == sqlite3.SQLITE_FULL or "disk is full" in str(exc)


HELD_KEPT = 10_000  # held parts kept in memory for a fresh release; beyond, they are claimed
HELD_PREFIX = "held: "  # the last reply of a recipient a shaping suspension handed back


class FreshMail(Protocol):
    """Who takes new mail straight from ``Spool.store`` (the worker's
    dispatcher): its recipients are claimed in the transaction that stores
    them, so no claim has to find them and no body is read back."""

    def take_fresh(self, part: Part) -> bool:
        """Room for this part now?  True reserves it."""

    def fresh_failed(self, part: Part) -> None:
        """The reserved part was not stored: give the room back."""

    def fresh_stored(self, due: list[DueRecipient], body: bytes) -> None:
        """The part is durable, its recipients claimed: deliver them."""


class Spool:
    """A worker's spool.  Every method is called from the worker's event loop."""

    def __init__(self, spool_dir: str, worker: int) -> None:
        self.path = spool_path(spool_dir, worker)
        self.worker = worker
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"spool-{worker}")
        self._conn: sqlite3.Connection | None = None
        self._pending: list[_Op] = []
        self._wakeup: asyncio.Event | None = None
        self._writer: asyncio.Task | None = None
        self.commits = 0  # how many group commits ran (for stats and tests)
        self.on_ready: Callable[[], None] | None = None  # new deliverable mail committed
        self.fresh: FreshMail | None = None  # takes new mail at once (see store)
        self._held: dict[str, Part] = {}  # parts stored held, until their decision (release)
        self._closing = False
        self._read_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"spool-read-{worker}")
        self._read_conn: sqlite3.Connection | None = None

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        self._conn = await loop.run_in_executor(self._executor, connect, self.path)
        self._read_conn = await loop.run_in_executor(self._read_executor, self._open_reader)
        self._wakeup = asyncio.Event()
        self._writer = asyncio.create_task(self._write_loop(), name=f"spool-writer-{self.worker}")

    def _open_reader(self) -> sqlite3.Connection:
        # WAL readers never block the writer: bodies are read here while
        # the writer commits.
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA query_only=1")
        return conn

    async def close(self) -> None:
        """Commit what is queued, answer every caller, then close the database."""
        if self._writer is not None:
            self._closing = True
            self._wakeup.set()
            await self._writer  # it returns once nothing is queued or committing
            self._writer = None
        loop = asyncio.get_running_loop()
        if self._read_conn is not None:
            await loop.run_in_executor(self._read_executor, self._read_conn.close)
            self._read_conn = None
        if self._conn is not None:
            await loop.run_in_executor(self._executor, self._conn.close)
            self._conn = None
        self._executor.shutdown(wait=True)
        self._read_executor.shutdown(wait=True)

    # -- writes (group committed) -----------------------------------------

    async def store(self, part: Part) -> None:
        """Store a part durably; held if it belongs to a multi-owner
        transaction.  A part ready at once goes to ``fresh`` when it has
        room: claimed as it is written, handed over with its body once
        committed (recovery's unclaim_all returns it if the worker dies)."""
        now = time.time()
        fresh = self.fresh if part.coordinator is None else None
        if fresh is not None and not fresh.take_fresh(part):
            fresh = None
        if fresh is not None:
            await self._submit_fresh(
                lambda conn: insert_part(conn, part, now, sending=True), fresh, part)
            return
        await self._submit(lambda conn: insert_part(conn, part, now),
                           wakes=part.coordinator is None)
        if part.coordinator is not None and self.fresh is not None and len(self._held) < HELD_KEPT:
            self._held[part.queue_id] = part  # for release, which may hand it over

    async def decide(self, queue_id: str) -> None:
        """As coordinator: record that every part of a transaction is durable."""
        now = time.time()
        await self._submit(
            lambda conn: conn.execute("INSERT OR IGNORE INTO txn VALUES (?, ?)", (queue_id, now))
        )

    async def release(self, queue_id: str) -> None:
        """Make a held part ready for delivery (its transaction was decided);
        to ``fresh``, claimed in the same commit, when it has room and the
        part stored here is still in memory."""
        part = self._held.pop(queue_id, None)
        fresh = self.fresh if part is not None else None
        if fresh is not None and not fresh.take_fresh(part):
            fresh = None

        def apply(conn: sqlite3.Connection) -> dict[str, str] | None:
            released = conn.execute(
                "UPDATE message SET state = ? WHERE id = ? AND state = ?",
                (int(MessageState.ACTIVE), queue_id, int(MessageState.HELD)),
            ).rowcount
            if not released or fresh is None:
                return None
            conn.execute("UPDATE recipient SET state = ? WHERE message_id = ? AND state = ?",
                         (int(RecipientState.SENDING), queue_id, int(RecipientState.QUEUED)))
            return suppressed_of(conn, part)

        if fresh is None:
            await self._submit(apply, wakes=True)
        else:
            await self._submit_fresh(apply, fresh, part)

    async def abort(self, queue_id: str) -> None:
        """Withdraw a held part whose transaction failed."""
        self._held.pop(queue_id, None)

        def apply(conn: sqlite3.Connection) -> None:
            row = conn.execute("SELECT state FROM message WHERE id = ?", (queue_id,)).fetchone()
            if row is not None and row[0] == MessageState.HELD:
                delete_message(conn, queue_id)

        await self._submit(apply)

    async def prune_decisions(self, older_than: float) -> None:
        await self._submit(
            lambda conn: conn.execute("DELETE FROM txn WHERE decided < ?", (older_than,))
        )

    # -- delivery -----------------------------------------------------------

    async def unclaim_all(self) -> int:
        """At start: recipients claimed by a previous run go back in the queue
        (delivery is at-least-once: one may have been sent already)."""
        def apply(conn):
            return conn.execute(
                "UPDATE recipient SET state = ? WHERE state = ?",
                (int(RecipientState.QUEUED), int(RecipientState.SENDING)),
            ).rowcount
        return await self._submit(apply)

    async def claim_due(self, now: float, limit: int,
                        bulk_limit: int | None = None) -> list[DueRecipient]:
        """Take up to ``limit`` recipients that are due, transactional ones
        (oldest first) before bulk ones (at most ``bulk_limit``: half the
        oldest, half the newest), and mark them as being sent so no later
        claim returns them again.  Each lane is read from its own stretch of
        the due index."""
        bulk_limit = limit if bulk_limit is None else min(bulk_limit, limit)

        def apply(conn: sqlite3.Connection) -> list[DueRecipient]:
            def due(state: int, lane: str, order: str, want: int) -> list:
                return conn.execute(
                    "SELECT r.message_id, r.idx, r.address, r.domain, r.attempts, m.sender,"
                    " m.received, m.smtputf8, m.size, s.reply, m.trace, m.lane, m.campaign"
                    " FROM recipient r JOIN message m ON m.id = r.message_id"
                    " LEFT JOIN suppression s ON s.address = r.address"
                    " WHERE r.state = ? AND r.lane = ? AND r.next_attempt <= ? AND m.state = ?"
                    f" ORDER BY r.next_attempt {order} LIMIT ?",
                    (state, LANE_CODES[lane], now, int(MessageState.ACTIVE), want),
                ).fetchall()

            rows = []
            for lane, room in ((TRANSACTIONAL, limit), (BULK, bulk_limit)):
                taken = 0
                for state in PENDING_STATES:
                    want = min(room - taken, limit - len(rows))
                    if want <= 0:
                        break
                    if lane == TRANSACTIONAL:
                        found = due(state, lane, "ASC", want)
                    else:
                        # Bulk: half the oldest, half the newest, so a campaign
                        # that comes behind a backlog larger than the room starts
                        # at once (the sites serve campaigns in turn) while the
                        # oldest still go first.  Both ends of the index: cheap.
                        oldest = due(state, lane, "ASC", (want + 1) // 2)
                        seen = {(row[0], row[1]) for row in oldest}
                        found = oldest + [row for row in due(state, lane, "DESC", want - len(oldest))
                                          if (row[0], row[1]) not in seen]
                    rows += found
                    taken += len(found)
            conn.executemany(
                "UPDATE recipient SET state = ? WHERE message_id = ? AND idx = ?",
                [(int(RecipientState.SENDING), row[0], row[1]) for row in rows],
            )
            return [DueRecipient(r[0], r[1], r[2], r[3], r[4], r[5], r[6], bool(r[7]), r[8], r[9],
                                 bool(r[10]), r[11], r[12]) for r in rows]

        return await self._submit(apply)

    async def next_due(self, lanes: tuple[str, ...] = LANES) -> float | None:
        """When the earliest waiting recipient of these lanes becomes due
        (None: none waits)."""

        def query(conn: sqlite3.Connection) -> float | None:
            times = []
            for state in PENDING_STATES:
                for lane in lanes:
                    row = conn.execute(
                        "SELECT r.next_attempt FROM recipient r JOIN message m ON m.id = r.message_id"
                        " WHERE r.state = ? AND r.lane = ? AND m.state = ?"
                        " ORDER BY r.next_attempt LIMIT 1",
                        (state, LANE_CODES[lane], int(MessageState.ACTIVE)),
                    ).fetchone()
                    if row:
                        times.append(row[0])
            return min(times) if times else None

        return await self._read(query)

    async def body(self, queue_id: str) -> bytes | None:
        row = await self._read(
            lambda conn: conn.execute("SELECT data FROM body WHERE id = ?", (queue_id,)).fetchone()
        )
        return row[0] if row else None

    async def complete(self, updates: list[RecipientUpdate], events: list[Event],
                       suppress: list[tuple[str, str]] = ()) -> None:
        """Record the outcome of attempts and their events in one transaction;
        a message whose recipients are all final leaves the queue.  Addresses
        in ``suppress`` (address, reply) hard-bounced: they are not tried
        again until removed from the suppression list."""
        now = time.time()

        def apply(conn: sqlite3.Connection) -> None:
            if suppress:  # an empty executemany is still a statement
                conn.executemany(
                    "INSERT OR REPLACE INTO suppression VALUES (?, ?, ?)",
                    [(address, now, reply) for address, reply in suppress],
                )
            conn.executemany(
                "UPDATE recipient SET state = ?, attempts = ?, next_attempt = ?, last_reply = ?"
                " WHERE message_id = ? AND idx = ?",
                [(int(u.state), u.attempts, u.next_attempt, u.last_reply, u.queue_id, u.index)
                 for u in updates],
            )
            insert_events(conn, events)
            for queue_id in {u.queue_id for u in updates}:
                # Gone once every recipient is delivered; a message with a
                # bounced recipient stays (for `relayctl requeue`) until
                # deliver.keep_bounced has passed.
                left = conn.execute(
                    "SELECT 1 FROM recipient WHERE message_id = ? AND state != ? LIMIT 1",
                    (queue_id, int(RecipientState.DELIVERED)),
                ).fetchone()
                if left is None:
                    delete_message(conn, queue_id)

        # A recipient still waiting may be due before the loop's next look.
        await self._submit(apply, wakes=any(u.state in PENDING_STATES for u in updates))

    async def record_crash(self, queue_id: str, indices: list[int], error: str, destination: str,
                           quarantine_after: int) -> list[Event]:
        """Charge a crash (a bug raised while delivering them) to recipients
        of one message still being sent: one more crash and the error, and
        back in the queue; those that reached ``quarantine_after`` crashes
        are quarantined instead, never claimed until released.  An event per
        recipient (outcome crashed or quarantined) is committed with the
        change; the events are returned."""
        now = time.time()

        def apply(conn: sqlite3.Connection) -> list[Event]:
            marks = ",".join("?" * len(indices))
            rows = conn.execute(
                "SELECT idx, address, crashes FROM recipient"
                f" WHERE message_id = ? AND state = ? AND idx IN ({marks})",
                (queue_id, int(RecipientState.SENDING), *indices),
            ).fetchall()
            lane, campaign = labels_of(conn, queue_id)
            updates, events = [], []
            for index, address, crashes in rows:
                quarantined = crashes + 1 >= quarantine_after
                state = RecipientState.QUARANTINED if quarantined else RecipientState.QUEUED
                updates.append((int(state), crashes + 1, error, now, queue_id, index))
                events.append(Event.local(now, queue_id, address, destination, error,
                                          "quarantined" if quarantined else "crashed", "technical",
                                          lane, campaign))
            conn.executemany(
                "UPDATE recipient SET state = ?, crashes = ?, error = ?, next_attempt = ?"
                " WHERE message_id = ? AND idx = ?",
                updates,
            )
            insert_events(conn, events)
            return events

        return await self._submit(apply)

    async def prune_events(self, older_than: float) -> None:
        await self._submit(
            lambda conn: conn.execute("DELETE FROM event WHERE time < ?", (older_than,))
        )

    async def prune_bounced(self, older_than: float) -> int:
        """Drop messages whose recipients are all final, the last of them
        bounced before ``older_than``."""

        def apply(conn: sqlite3.Connection) -> int:
            # Walk only bounced recipients (the state index), not the queue.
            candidates = {row[0] for row in conn.execute(
                "SELECT message_id FROM recipient WHERE state = ? AND next_attempt < ?",
                (int(RecipientState.BOUNCED), older_than),
            )}
            pruned = 0
            for queue_id in candidates:
                waiting = conn.execute(
                    "SELECT 1 FROM recipient WHERE message_id = ? AND state NOT IN (?, ?)"
                    " LIMIT 1",
                    (queue_id, int(RecipientState.DELIVERED), int(RecipientState.BOUNCED)),
                ).fetchone()
                if waiting is None:
                    delete_message(conn, queue_id)
                    pruned += 1
            return pruned

        return await self._submit(apply)

    # -- operator commands (relayctl) -------------------------------------

    async def flush(self, domain: str | None, now: float) -> int:
        """Deferred recipients (of one domain) become due now."""
        query = "UPDATE recipient SET next_attempt = ? WHERE state = ?"
        params: tuple = (now, int(RecipientState.DEFERRED))
        if domain:
            query += " AND domain = ?"
            params += (domain,)
        return await self._submit(lambda conn: conn.execute(query, params).rowcount, wakes=True)

    async def release_held(self, domains: list[str], now: float) -> int:
        """Recipients a shaping suspension handed back (last reply ``held:``)
        at these domains become due now: the suspension ended early."""
        marks = ",".join("?" * len(domains))
        query = (f"UPDATE recipient SET next_attempt = ? WHERE state = ? AND domain IN ({marks})"
                 f" AND last_reply LIKE '{HELD_PREFIX}%'")
        params = (now, int(RecipientState.DEFERRED), *domains)
        return await self._submit(lambda conn: conn.execute(query, params).rowcount, wakes=True)

    # -- campaigns (relayctl campaign) -------------------------------------------

    async def release_campaign(self, campaign: str, now: float) -> int:
        """Recipients of a paused campaign (held) are due now, attempts
        unchanged.  Only held rows of the campaign's messages are read."""
        query = ("UPDATE recipient SET state = ?, next_attempt = ? WHERE state = ? AND message_id"
                 " IN (SELECT id FROM message WHERE campaign = ?)")
        params = (int(RecipientState.DEFERRED), now, int(RecipientState.HELD), campaign)
        return await self._submit(lambda conn: conn.execute(query, params).rowcount, wakes=True)

    async def cancel_campaign(self, campaign: str, now: float) -> list[Event]:
        """Recipients of a campaign still waiting (queued, deferred, held; not
        those being sent) end without delivery and without a DSN: state
        bounced, a ``cancelled`` event each, in one transaction.  Returns
        the events (none when it was cancelled already)."""

        def apply(conn: sqlite3.Connection) -> list[Event]:
            waiting = (*PENDING_STATES, int(RecipientState.HELD))
            rows = conn.execute(
                "SELECT r.message_id, r.idx, r.address, r.domain, m.lane FROM recipient r"
                " JOIN message m ON m.id = r.message_id"
                f" WHERE m.campaign = ? AND r.state IN ({','.join('?' * len(waiting))})",
                (campaign, *waiting),
            ).fetchall()
            conn.executemany(
                "UPDATE recipient SET state = ?, next_attempt = ?, last_reply = ?"
                " WHERE message_id = ? AND idx = ?",
                [(int(RecipientState.BOUNCED), now, CANCELLED_TEXT, qid, idx)
                 for qid, idx, *_ in rows],
            )
            events = [Event.local(now, qid, address, domain, CANCELLED_TEXT, "cancelled", None,
                                  lane, campaign) for qid, idx, address, domain, lane in rows]
            insert_events(conn, events)
            return events

        return await self._submit(apply)

    async def campaign_figures(self, name: str | None = None) -> list[dict]:
        """Each campaign (or one): tenant, class, first and last activity,
        recipients waiting (queued, held) and outcomes so far (from the
        daily roll-up: they outlive the events)."""

        def query(conn: sqlite3.Connection) -> list[dict]:
            where, params = ("WHERE name = ?", (name,)) if name else ("", ())
            figures = {
                row[0]: {"name": row[0], "tenant": row[1], "class": row[2], "first": row[3],
                         "last": row[4], "queued": 0, "held": 0, "delivered": 0, "deferred": 0,
                         "bounced": 0, "dropped": 0}
                for row in conn.execute(
                    f"SELECT name, tenant, lane, first, last FROM campaign {where}", params)
            }
            if not figures:
                return []
            marks = ",".join("?" * len(figures))
            for campaign, state, count in conn.execute(
                "SELECT m.campaign, r.state, count(*) FROM message m"
                " JOIN recipient r ON r.message_id = m.id"
                f" WHERE m.campaign IN ({marks}) AND r.state IN (?, ?, ?, ?)"
                " GROUP BY m.campaign, r.state",
                (*figures, *PENDING_STATES, int(RecipientState.SENDING), int(RecipientState.HELD)),
            ):
                key = "held" if state == RecipientState.HELD else "queued"
                figures[campaign][key] += count
            for campaign, outcome, count in conn.execute(
                f"SELECT campaign, outcome, sum(count) FROM daily WHERE campaign IN ({marks})"
                " GROUP BY campaign, outcome", tuple(figures),
            ):
                key = "dropped" if outcome in DROPPED_OUTCOMES else outcome
                if key in ("delivered", "deferred", "bounced", "dropped"):
                    figures[campaign][key] += count
            return list(figures.values())

        return await self._read(query)

    async def release_suspended(self, domain: str, now: float) -> int:
        """Recipients the operator held at ``domain`` (relayctl resume) are
        due now, their attempts unchanged.  Found by state: only held rows
        are read, never the backlog."""
        query = ("UPDATE recipient SET state = ?, next_attempt = ? WHERE state = ? AND domain = ?")
        params = (int(RecipientState.DEFERRED), now, int(RecipientState.HELD), domain)
        return await self._submit(lambda conn: conn.execute(query, params).rowcount, wakes=True)

    async def requeue(self, *, code: str | None, sender: str | None, recipient: str | None,
                      now: float, dry_run: bool = False) -> int:
        """Bounced recipients matching every filter go back in the queue,
        off the suppression list (pmq-publish); ``dry_run`` only counts them.
        A cancelled campaign's recipients (stored as bounced, with the
        cancel as their last reply) stay cancelled."""

        def apply(conn: sqlite3.Connection) -> int:
            conn.create_function("regexp", 2, _regexp, deterministic=True)
            where = ["r.state = ?", "r.last_reply IS NOT ?"]
            params: list = [int(RecipientState.BOUNCED), CANCELLED_TEXT]
            if code:
                where.append("r.last_reply LIKE ?")
                params.append(code + "%")
            if sender:
                where.append("regexp(?, m.sender)")
                params.append(sender)
            if recipient:
                where.append("regexp(?, r.address)")
                params.append(recipient)
            rows = conn.execute(
                "SELECT r.message_id, r.idx, r.address FROM recipient r"
                " JOIN message m ON m.id = r.message_id WHERE " + " AND ".join(where),
                params,
            ).fetchall()
            if dry_run:
                return len(rows)
            conn.executemany(
                "UPDATE recipient SET state = ?, attempts = 0, next_attempt = ?"
                " WHERE message_id = ? AND idx = ?",
                [(int(RecipientState.QUEUED), now, qid, idx) for qid, idx, _ in rows],
            )
            conn.executemany("DELETE FROM suppression WHERE address = ?",
                             [(address,) for _, _, address in rows])
            return len(rows)

        if dry_run:
            return await self.read(apply)
        return await self._submit(apply, wakes=True)

    async def release_quarantined(self, queue_ids: list[str], now: float) -> int:
        """Quarantined recipients of these messages go back in the queue,
        their crash count reset."""

        def apply(conn: sqlite3.Connection) -> int:
            return sum(
                conn.execute(
                    "UPDATE recipient SET state = ?, crashes = 0, error = NULL, next_attempt = ?"
                    " WHERE message_id = ? AND state = ?",
                    (int(RecipientState.QUEUED), now, queue_id, int(RecipientState.QUARANTINED)),
                ).rowcount
                for queue_id in queue_ids
            )

        return await self._submit(apply, wakes=True)

    async def delete(self, queue_ids: list[str], now: float) -> dict[str, list[tuple]]:
        """Remove messages (this worker's parts of them) from the queue, with
        a ``deleted`` event for each recipient not yet delivered, in the
        same transaction.  Returns the ids found, each with its events."""

        def apply(conn: sqlite3.Connection) -> dict[str, list[Event]]:
            found = {}
            for queue_id in queue_ids:
                if not conn.execute("SELECT 1 FROM message WHERE id = ?", (queue_id,)).fetchone():
                    continue
                lane, campaign = labels_of(conn, queue_id)
                found[queue_id] = [
                    Event.local(now, queue_id, address, domain, DELETED_TEXT, "deleted", None,
                                lane, campaign)
                    for address, domain in conn.execute(
                        "SELECT address, domain FROM recipient WHERE message_id = ? AND state != ?"
                        " ORDER BY idx", (queue_id, int(RecipientState.DELIVERED)))
                ]
                insert_events(conn, found[queue_id])
                delete_message(conn, queue_id)
            return found

        return await self._submit(apply)

    # -- AMQP intake ----------------------------------------------------------

    async def claim_intake(self, key: str, queue_id: str, queue: str, fields: bytes, pid: int,
                           replacing: str | None = None) -> tuple[str, int, float] | None:
        """As the owner of AMQP message ``key`` (route.shard.key_owner):
        record that the worker process ``pid`` is spooling it as
        ``queue_id`` (from ``queue``, with these original fields as JSON),
        unless another try holds the key.  Returns None when this try holds
        it now, else (queue id, pid, time) of the record that does.  The
        check and the record are one operation of this spool's only writer,
        so two tries never both get None.  ``replacing``: the queue id of a
        record spool.seen found abandoned, taken over only if still there."""
        now = time.time()

        def apply(conn: sqlite3.Connection) -> tuple[str, int, float] | None:
            if conn.execute(
                "INSERT INTO amqp_intake VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (key) DO NOTHING",
                (queue_id, key, now, queue, fields, pid),
            ).rowcount:
                return None
            holder = conn.execute("SELECT queue_id, pid, time FROM amqp_intake WHERE key = ?",
                                  (key,)).fetchone()
            if replacing is None or holder[0] != replacing:
                return holder
            conn.execute(
                "UPDATE amqp_intake SET queue_id = ?, time = ?, queue = ?, fields = ?, pid = ?"
                " WHERE key = ?", (queue_id, now, queue, fields, pid, key))
            return None

        return await self._submit(apply)

    async def forget_intake(self, queue_id: str) -> None:
        """A try that failed (nothing of it will be delivered): its record goes."""
        await self._submit(lambda conn: conn.execute(
            "DELETE FROM amqp_intake WHERE queue_id = ?", (queue_id,)))

    async def prune_intake(self, older_than: float) -> int:
        return await self._submit(lambda conn: conn.execute(
            "DELETE FROM amqp_intake WHERE time < ?", (older_than,)).rowcount)

    # -- the outbox: committed events, in order, for the feeds -----------------

    async def events_after(self, cursor: int, limit: int) -> list[dict]:
        """Up to ``limit`` events with an id above ``cursor``, in commit order
        (ids grow with each commit: one writer), with the message's sender
        and the recipient's attempts while they are still in the spool."""

        def query(conn: sqlite3.Connection) -> list[dict]:
            rows = conn.execute(
                f"SELECT e.id, {', '.join('e.' + c for c in EVENT_COLUMNS)}, m.sender, m.size,"
                " (SELECT r.attempts FROM recipient r WHERE r.message_id = e.queue_id"
                "  AND r.address = e.recipient LIMIT 1)"
                " FROM event e LEFT JOIN message m ON m.id = e.queue_id"
                " WHERE e.id > ? ORDER BY e.id LIMIT ?",
                (cursor, limit),
            ).fetchall()
            names = ("id", *EVENT_COLUMNS, "sender", "size", "attempts")
            return [dict(zip(names, row)) for row in rows]

        return await self._read(query)

    async def last_event_id(self) -> int:
        """The id of the newest event (0: none)."""
        row = await self._read(lambda conn: conn.execute("SELECT MAX(id) FROM event").fetchone())
        return row[0] or 0

    async def set_meta(self, key: str, value: str) -> None:
        await self._submit(
            lambda conn: conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))
        )

    async def get_meta(self, key: str) -> str | None:
        row = await self._read(
            lambda conn: conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        )
        return row[0] if row else None

    async def counts(self) -> dict[str, int]:
        """Deferred recipients and held parts, for the stats gauges."""

        def query(conn: sqlite3.Connection) -> dict[str, int]:
            deferred = conn.execute(
                "SELECT COUNT(*) FROM recipient WHERE state = ?", (int(RecipientState.DEFERRED),)
            ).fetchone()[0]
            held = conn.execute("SELECT COUNT(*) FROM message WHERE state = 0").fetchone()[0]
            return {"deferred_queue": deferred, "held": held}

        return await self._read(query)

    # -- reads --------------------------------------------------------------

    async def _read(self, query: Callable[[sqlite3.Connection], Any]) -> Any:
        """A read on the reader connection (concurrent with the writer)."""
        return await _query_on(self._read_executor, self._read_conn, query)

    async def read(self, query: Callable[[sqlite3.Connection], Any]) -> Any:
        """Run a read on the writer thread (serialised with the writes)."""
        return await _query_on(self._executor, self._conn, query)

    async def held_parts(self, received_before: float) -> list[tuple[str, int]]:
        """(queue id, coordinator) of held parts received before a time."""
        return await self.read(
            lambda conn: conn.execute(
                # A literal 0 (MessageState.HELD), so the partial index is used.
                "SELECT id, coordinator FROM message WHERE state = 0 AND received < ?",
                (received_before,),
            ).fetchall()
        )

    async def is_decided(self, queue_id: str) -> bool:
        return await self.read(
            lambda conn: conn.execute("SELECT 1 FROM txn WHERE id = ?", (queue_id,)).fetchone()
            is not None
        )

    # -- the writer ---------------------------------------------------------

    async def _submit_fresh(self, apply: Callable[[sqlite3.Connection], dict[str, str] | None],
                            fresh: FreshMail, part: Part) -> None:
        """Commit ``apply``, which claims ``part``'s recipients and returns
        their suppressions (None: nothing claimed), and tell ``fresh``.
        The outcome reaches it even if the caller is cancelled meanwhile
        (a client gone): a commit that happens anyway must not leave
        recipients claimed that nobody delivers until the next start."""

        def settle(done: asyncio.Future) -> None:
            suppressed = None if done.cancelled() or done.exception() else done.result()
            if suppressed is None:
                fresh.fresh_failed(part)
            else:
                fresh.fresh_stored(due_of(part, suppressed), part.body)

        try:
            committed = self._enqueue(apply)
        except SpoolError:
            fresh.fresh_failed(part)
            raise
        committed.add_done_callback(settle)
        await asyncio.shield(committed)

    async def _submit(self, apply: Callable[[sqlite3.Connection], Any], wakes: bool = False) -> Any:
        return await self._enqueue(apply, wakes)

    def _enqueue(self, apply: Callable[[sqlite3.Connection], Any], wakes: bool = False) -> asyncio.Future:
        """Queue ``apply`` for the next commit; the future is its outcome."""
        if self._writer is None or self._closing:
            raise SpoolError("spool is not open")
        future = asyncio.get_running_loop().create_future()
        self._pending.append(_Op(apply, future, wakes))
        self._wakeup.set()
        return future

    async def _write_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while not (self._closing and not self._pending):
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._pending:
                batch = self._pending[:MAX_BATCH]
                del self._pending[:MAX_BATCH]
                try:
                    results = await loop.run_in_executor(self._executor, self._commit, batch)
                except Exception as exc:  # the commit failed: the whole batch did
                    log.error("spool commit failed: %s", exc)
                    error = SpoolFull("spool disk is full") if _is_disk_full(exc) else SpoolError(
                        "spool write failed"
                    )
                    for op in batch:
                        if not op.future.done():
                            op.future.set_exception(error)
                    continue
                self.commits += 1
                if self.on_ready is not None and any(op.wakes for op in batch):
                    self.on_ready()
                for op, (ok, value) in zip(batch, results):
                    if op.future.done():
                        continue
                    if ok:
                        op.future.set_result(value)
                    else:
                        op.future.set_exception(value)

    def _commit(self, batch: list[_Op]) -> list[tuple[bool, Any]]:
        """Writer thread: apply a batch in one transaction and commit it.

        The operations run bare first: a SAVEPOINT each, there only so
        that one can fail alone, costs two more statements per operation.
        When one fails, the transaction is rolled back and the batch is
        applied again with a savepoint per operation.  Operations only
        write the database and return values, so running one again after
        a rollback is the same as running it once."""
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            results = []
            for op in batch:
                try:
                    value = op.apply(conn)
                except sqlite3.Error as exc:
                    if _is_disk_full(exc) or not conn.in_transaction:
                        raise
                    conn.execute("ROLLBACK")
                    return self._commit_each(batch)
                results.append(_succeeded(value))
            conn.execute("COMMIT")
        except BaseException:
            self._roll_back()
            raise
        return results

    def _commit_each(self, batch: list[_Op]) -> list[tuple[bool, Any]]:
        """``_commit``'s second try: each operation in its own savepoint."""
        conn = self._conn
        results: list[tuple[bool, Any]] = []
        conn.execute("BEGIN IMMEDIATE")
        try:
            for op in batch:
                conn.execute("SAVEPOINT op")
                try:
                    value = op.apply(conn)
                except sqlite3.Error as exc:
                    # On SQLITE_FULL (and I/O errors) SQLite has already
                    # rolled the whole transaction back: the batch failed.
                    if _is_disk_full(exc) or not conn.in_transaction:
                        raise
                    conn.execute("ROLLBACK TO op")
                    conn.execute("RELEASE op")
                    log.error("spool operation failed: %s", exc)
                    results.append((False, SpoolError("spool write failed")))
                else:
                    conn.execute("RELEASE op")
                    results.append(_succeeded(value))
            conn.execute("COMMIT")
        except BaseException:
            self._roll_back()
            raise
        return results

    def _roll_back(self) -> None:
        conn = self._conn
        if conn.in_transaction:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error as exc:  # the commit's own failure is what matters
                log.error("spool rollback failed: %s", exc)


def _succeeded(value: Any) -> tuple[bool, Any]:
    """An operation's result: what it returned (a cursor is not a value)."""
    return True, None if isinstance(value, sqlite3.Cursor) else value
