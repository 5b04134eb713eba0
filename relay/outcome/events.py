"""The delivery log: every event, one JSON line each, in ``delivery-N.jsonl``.

Input: events (model.Event) as they are committed, and shaping effects as
they start and end.  Output: lines in ``event_log_dir/delivery-N.jsonl``
with the spool's column names (``class`` for the failure class) — the
record operators grep and log shippers follow — and one log line per
recipient outcome.  The file is reopened after logrotate (SIGUSR1) or a
reload that moves it.

The lines of one turn of the event loop reach the file in one write, early
in the next turn (a group commit completes many deliveries at once), so a
log shipper never sees half a line; without a running loop, at once.  A
worker that dies of a bug writes them first (``flush``).  The spool, not
this file, is what survives a crash; a file that cannot be written (a full
disk) costs its lines and an error in the log, never a delivery.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time

import orjson

from relay.model import EVENT_COLUMNS, Event

log = logging.getLogger("relay.deliver")


class EventLog:
    def __init__(self, directory: str, worker: int) -> None:
        self.worker = worker
        self.directory = directory
        self._file = None
        self._pending: list[bytes] = []  # this turn's lines, not written yet
        self._flush_on: asyncio.AbstractEventLoop | None = None  # the loop a flush is due on
        self.reopen(directory)

    def reopen(self, directory: str | None = None) -> None:
        """(Re)open the file: at start, after a reload that moves it, and
        on SIGUSR1 once logrotate has renamed the old one."""
        self.flush()  # what is pending belongs to the old file
        self.directory = directory or self.directory
        os.makedirs(self.directory, exist_ok=True)
        # Unbuffered: the one write of a turn's lines is all the buffering.
        new = open(os.path.join(self.directory, f"delivery-{self.worker}.jsonl"), "ab", buffering=0)
        old, self._file = self._file, new
        if old is not None:
            old.close()

    def write(self, events: list[Event]) -> None:
        self._write(b"".join(orjson.dumps(dict(zip(EVENT_COLUMNS, event))) + b"\n"
                             for event in events))
        for event in events:
            log.info("%s: to=<%s> relay=%s code=%s %s", event.queue_id, event.recipient, event.mx,
                     event.code, event.outcome)

    def write_effects(self, changes: list[tuple[object, str]], now: float) -> None:
        """Shaping effects (deliver.shaping.Effect) that ``started`` or
        ``ended``: a record each, its outcome ``effect_started|ended``."""
        records = []
        for effect, what in changes:
            log.warning("shaping: %s %d %s %s until %s: %s", effect.kind, effect.id, what,
                        effect.site, time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(effect.expires)),
                        effect.reason)
            record = dict.fromkeys(EVENT_COLUMNS)
            record.update(time=now, destination=effect.site, outcome=f"effect_{what}",
                          text=effect.reason, effect=effect.to_json())
            records.append(orjson.dumps(record) + b"\n")
        self._write(b"".join(records))

    def _write(self, lines: bytes) -> None:
        self._pending.append(lines)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        if self._flush_on is not loop:  # none due on this loop (one that stopped never ran)
            self._flush_on = loop
            loop.call_soon(self._flush_due)

    def _flush_due(self) -> None:
        self._flush_on = None
        self.flush()

    def flush(self) -> None:
        """Write the pending lines now."""
        if not self._pending:
            return
        data, self._pending = b"".join(self._pending), []
        view = memoryview(data)
        try:
            while view:
                view = view[self._file.write(view):]
        except (OSError, ValueError) as exc:  # ValueError: written after close()
            log.error("delivery log %s: %d bytes of events not written: %s", self._file.name,
                      len(view), exc)

    def close(self) -> None:
        self.flush()
        self._file.close()
