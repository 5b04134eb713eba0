"""relayctl's read layer: the workers' spools for queue, show, grep,
report and mailq.

Input: the settings (``relay.spool_dir``, ``relay.run_dir``) and the verb's
``--offline`` flag.  Output: one ``relay.spool.read.SpoolReader`` per
``worker-N.db`` (the spool's read API: read-only, chunked, never holding
up the writer), and pure functions that turn the records those readers
return into the summaries the verbs print (``queue_shape``,
``message_view``, ``failure_report``), so the summaries are tested without
files.  The records and the reader are re-exported here for the verbs.
"""

from __future__ import annotations

import argparse
import bisect
import datetime
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from relay import config
from relay.cli import control
from relay.errors import ConfigError
from relay.spool.format import MessageState, RecipientState
from relay.spool.read import (  # noqa: F401 (re-exported for the verbs)
    FAILURE_OUTCOMES,
    FINAL_STATES,
    MAX_LISTED,
    QUARANTINED,
    UNSCHEDULED_STATES,
    WAITING_STATES,
    AddressPattern,
    Event,
    FailureRow,
    MessagePart,
    ReadError,
    RecipientRow,
    SpoolReader,
    WaitingRecipient,
    WaitingRow,
    address_domain,
    address_pattern,
    open_readers,
)

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
            # Out of the queue, its events still say (older events: null).
            "class": first.lane if first else next((e.lane for e in self.events if e.lane), None),
            "campaign": first.campaign if first else next(
                (e.campaign for e in self.events if e.lane), None),
            "tenant": first.tenant if first else None,
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



def newest_first(events: Iterable[Event], limit: int | None = None) -> list[Event]:
    ordered = sorted(events, key=lambda e: (e.time, e.worker), reverse=True)
    return ordered[:limit] if limit else ordered


# -- report (pure) --------------------------------------------------------



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
    return Spools(open_readers(spool_dir))


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
