"""The delivery log: every event, one JSON line each, in ``delivery-N.jsonl``.

Input: events (model.Event) as they are committed, and shaping effects as
they start and end.  Output: lines in ``event_log_dir/delivery-N.jsonl``
with the spool's column names (``class`` for the failure class) — the
record operators grep and log shippers follow — and one log line per
recipient outcome.  The file is reopened after logrotate (SIGUSR1) or a
reload that moves it.

Lines written in one turn of the event loop reach the file in one write at
its end (a group commit completes many deliveries at once); without a
running loop, at once.  The spool, not this file, is what survives a crash.
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
        self._flush_due = False
        self.reopen(directory)

    def reopen(self, directory: str | None = None) -> None:
        """(Re)open the file: at start, after a reload that moves it, and
        on SIGUSR1 once logrotate has renamed the old one."""
        self.directory = directory or self.directory
        os.makedirs(self.directory, exist_ok=True)
        new = open(os.path.join(self.directory, f"delivery-{self.worker}.jsonl"), "ab")
        old, self._file = self._file, new
        if old is not None:
            old.close()  # flushes what the old file still buffers

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
        self._file.write(lines)
        if self._flush_due:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._file.flush()
            return
        self._flush_due = True
        loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_due = False
        if not self._file.closed:
            self._file.flush()

    def close(self) -> None:
        self._file.close()
