"""The operator verbs, as JSON: what ``relayctl VERB --json`` prints and
``/api/admin/VERB`` answers (one implementation behind both).

Input: the configuration file (read verbs open the spools read-only,
``relay.cli.spoolread``) or a control request.  Output: the verb's JSON
object; ``spoolread.ReadError``, ``control.NotRunning`` or
``control.ControlError`` when it cannot be had.  Every call blocks (SQLite
reads, the control socket): the HTTP side runs them on a thread.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

from relay.cli import control, spoolread
from relay.cli.spoolread import BUCKETS

_HEX = re.compile(r"[0-9A-Fa-f]+")

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
        waiting, attempts, held_parts = [], [], 0
        quarantined, quarantined_ids = 0, []
        for reader in spools.readers:
            waiting.extend(reader.waiting())
            held_parts += reader.held_parts()
            count, ids = reader.quarantined()
            quarantined += count
            quarantined_ids += ids
            if by == "destination":
                attempts.extend(reader.destinations())
    # Every spool's attempts at once: a spread domain ([relay] spread_domains)
    # has mail in several, and its latest attempt wins wherever it is.
    destinations = spoolread.latest_destinations(attempts)
    group = (lambda domain: destinations.get(domain, domain)) if by == "destination" else None
    shape = spoolread.queue_shape(waiting, now, group)
    rows = shape.rows[:top] if top else shape.rows
    plural = "domains" if by == "domain" else "destinations"
    answer = {
        "total": shape.total,
        "held": shape.held,
        "held_parts": held_parts,
        "quarantined": quarantined,
        "quarantined_ids": sorted(set(quarantined_ids))[:spoolread.MAX_LISTED],
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


def shaping(run_dir: str) -> dict:
    """``relayctl shaping --json``: effects in force and each site's limits,
    from every worker."""
    return control.request(run_dir, {"op": "shaping"})


def shaping_cancel(run_dir: str, effect_id: int) -> dict:
    """``relayctl shaping cancel ID --json``; ControlError for an unknown id."""
    return control.request(run_dir, {"op": "shaping_cancel", "id": effect_id})


def campaign(run_dir: str, action: str, name: str | None = None) -> dict:
    """``relayctl campaign ACTION [NAME] --json``: every worker's figures
    summed; pause/resume/cancel applied in every worker.  ControlError for
    an unknown campaign (show) or a bad name."""
    request = {"op": "campaign", "action": action}
    if name:
        request["name"] = name
    return control.request(run_dir, request)


class NotFound(Exception):
    """``show`` of a queue id no spool knows, or whose body is gone."""


@dataclass
class Shown:
    view: spoolread.MessageView
    body: bytes | None

    def json(self, with_body: bool) -> dict:
        out = self.view.as_json()
        if with_body:
            out["body"] = self.body.decode("utf-8", errors="replace")
        return out


def canonical_id(queue_id: str) -> str:
    """Queue ids are upper-case hex; accept them typed in lower case too."""
    return queue_id.upper() if _HEX.fullmatch(queue_id) else queue_id


def show(config_path: str, queue_id: str, with_body: bool = False,
         offline: bool = False) -> Shown:
    """``relayctl show ID --json``: envelope, recipients and events of one
    message, merged across the spools.  Raises NotFound."""
    queue_id = canonical_id(queue_id)
    with spoolread.open_spools(_Args(config_path, offline)) as spools:
        parts, recipients, events = [], [], []
        for reader in spools.readers:
            found = reader.message(queue_id)
            parts += found[0]
            recipients += found[1]
            events += found[2]
        view = spoolread.message_view(queue_id, parts, recipients, events)
        body = None
        if view is not None and with_body:
            for reader in spools.readers:
                if any(p.worker == reader.worker for p in view.parts):
                    body = reader.body(queue_id)
                    if body is not None:
                        break
    if view is None:
        raise NotFound(f"{queue_id}: no such message in any spool")
    if with_body and body is None:
        raise NotFound(f"{queue_id}: the message has left the queue; its body is no longer stored")
    return Shown(view, body)


@dataclass
class Grepped:
    address: str
    pattern: spoolread.AddressPattern
    matched: int
    events: list  # of spoolread.Event, newest first, at most ``limit``

    def json(self) -> dict:
        return {"address": self.address, "matched": self.matched,
                "events": [e.as_json() for e in self.events]}


def grep(config_path: str, address: str, limit: int | None = None,
         offline: bool = False) -> Grepped:
    """``relayctl grep ADDRESS --json``.  Raises ValueError for a bad
    address pattern (before any spool is opened)."""
    pattern = spoolread.address_pattern(address)
    with spoolread.open_spools(_Args(config_path, offline)) as spools:
        found = []
        for reader in spools.readers:
            found.extend(reader.events_for(pattern))
    return Grepped(address, pattern, len(found), spoolread.newest_first(found, limit))


@dataclass
class Report:
    since: float
    start: float
    until: float
    delivered: int
    failures: list  # of spoolread.FailureRow, largest first

    @property
    def failed(self) -> int:
        return sum(r.count for r in self.failures)

    def json(self) -> dict:
        return {"since": self.since, "from": self.start, "until": self.until,
                "delivered": self.delivered, "failed": self.failed,
                "failures": [r.as_json() for r in self.failures]}


def report(config_path: str, since: float, offline: bool = False) -> Report:
    """``relayctl report --since S --json``: the failures of the window."""
    until = time.time()
    start = until - since
    with spoolread.open_spools(_Args(config_path, offline)) as spools:
        rows, delivered = [], 0
        for reader in spools.readers:
            rows.extend(reader.failures(start))
            delivered += reader.delivered(start)
    return Report(since, start, until, delivered, spoolread.failure_report(rows))


DAILY_BY = {"domain": 3, "campaign": 2, "class": 1}  # column of the roll-up row
# Outcomes as the daily report counts them: sent, soft bounce, hard bounce, dropped.
DAILY_OUTCOMES = {"delivered": "sent", "deferred": "soft_bounce", "bounced": "hard_bounce",
                  "dropped": "dropped", "deleted": "dropped", "cancelled": "dropped",
                  "quarantined": "dropped"}


@dataclass
class Daily:
    days: int
    by: str
    rows: list  # of dict: day, <by>, sent, soft_bounce, hard_bounce, dropped

    def json(self) -> dict:
        return {"days": self.days, "by": self.by, "rows": self.rows}


def daily(config_path: str, days: int, by: str, offline: bool = False) -> Daily:
    """``relayctl report --daily``: outcomes per UTC day and domain, campaign
    or class over the last ``days`` days, from every spool's roll-up."""
    since = time.strftime("%Y-%m-%d", time.gmtime(time.time() - (days - 1) * 86400))
    column = DAILY_BY[by]
    totals: dict[tuple, dict] = {}
    with spoolread.open_spools(_Args(config_path, offline)) as spools:
        for reader in spools.readers:
            for row in reader.daily(since):
                kind = DAILY_OUTCOMES.get(row[4])
                if kind is None:  # requeued, crashed: not an end of the day's mail
                    continue
                key = (row[0], row[column])
                into = totals.setdefault(key, {"day": row[0], by: row[column], "sent": 0,
                                               "soft_bounce": 0, "hard_bounce": 0, "dropped": 0})
                into[kind] += row[5]
    return Daily(days, by, [totals[key] for key in sorted(totals)])
