"""The operator verbs, as JSON: what ``relayctl VERB --json`` prints and
``/api/admin/VERB`` answers (one implementation behind both).

Input: the configuration file (read verbs open the spools read-only,
``relay.cli.spoolread``) or a control request.  Output: the verb's JSON
object; ``spoolread.ReadError``, ``control.NotRunning`` or
``control.ControlError`` when it cannot be had.  Every call blocks (SQLite
reads, the control socket): the HTTP side runs them on a thread.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from relay.cli import control, spoolread
from relay.cli.spoolread import BUCKETS

# The state-changing verbs, as the control socket takes them.
COMMANDS = ("flush", "requeue", "delete", "suspend", "resume", "trace")


@dataclass
class QueueReport:
    json: dict
    shape: spoolread.QueueShape
    held_parts: int


class _Args:
    def __init__(self, config: str, offline: bool) -> None:
        self.config, self.offline = config, offline


def queue(config_path: str, by: str = "domain", top: int | None = None,
          offline: bool = False) -> QueueReport:
    """``relayctl queue --json``: waiting recipients per domain (or
    destination) and age, like qshape."""
    with spoolread.open_spools(_Args(config_path, offline)) as spools:
        now = time.time()
        waiting, destinations, held_parts = [], {}, 0
        for reader in spools.readers:
            waiting.extend(reader.waiting())
            held_parts += reader.held_parts()
            if by == "destination":
                destinations.update(spoolread.latest_destinations(reader.destinations()))
    # A domain lives in exactly one spool, so merging per-spool maps loses nothing.
    group = (lambda domain: destinations.get(domain, domain)) if by == "destination" else None
    shape = spoolread.queue_shape(waiting, now, group)
    rows = shape.rows[:top] if top else shape.rows
    plural = "domains" if by == "domain" else "destinations"
    answer = {
        "total": shape.total,
        "held": shape.held,
        "held_parts": held_parts,
        "by": by,
        "buckets": list(BUCKETS),
        "by_age": list(shape.by_age),
        plural: [{by: row.name, "total": row.total, "by_age": list(row.by_age)} for row in rows],
    }
    return QueueReport(answer, shape, held_parts)


def command(run_dir: str, request: dict) -> dict:
    """flush, requeue, delete, suspend, resume, trace: the supervisor's
    answer, which ``relayctl VERB --json`` prints as is."""
    if request.get("op") not in COMMANDS:
        raise control.ControlError(f"unknown command {request.get('op')!r}")
    return control.request(run_dir, request)
