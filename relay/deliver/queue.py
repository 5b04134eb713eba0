"""Jobs: what the scheduler (deliver.scheduler) queues and sends (pure).

Input: recipients claimed from the spool.  Output: one ``Job`` per
(message, domain) — one SMTP transaction — in claim order; the scheduler
merges a message's jobs for domains that share a site.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from relay.model import TRANSACTIONAL
from relay.spool.store import DueRecipient


@dataclass
class Job:
    """One message's recipients at one domain: one SMTP transaction."""

    queue_id: str
    sender: str
    smtputf8: bool
    received: float
    size: int
    domain: str
    recipients: list[DueRecipient]
    trace: bool = False  # log every step (the message or a recipient is traced)
    retried: bool = False  # already given a second connection after a dead pooled one
    queued: float = 0.0  # when it entered its site's queue (wall clock)
    claimed: float = field(default_factory=time.monotonic)
    destination: object = None  # deliver.resolve.Destination, once resolved
    site_key: tuple | None = None  # the scheduler's site
    hosts_tried: set | None = None  # MX hosts that answered 421 to it (next MX)
    lane: str = TRANSACTIONAL  # the message's class (deliver.lanes)
    campaign: str = ""
    body: object = None  # deliver.fresh.FreshBody: fresh mail's body, until its first transaction


def jobs_from(due: list[DueRecipient], traced: frozenset[str] = frozenset()) -> list[Job]:
    """Group claimed recipients by (message, domain), keeping claim order."""
    jobs: dict[tuple[str, str], Job] = {}
    for row in due:
        job = jobs.get((row.queue_id, row.domain))
        if job is None:
            job = jobs[(row.queue_id, row.domain)] = Job(
                row.queue_id, row.sender, row.smtputf8, row.received, row.size, row.domain, [],
                lane=row.lane, campaign=row.campaign,
            )
        job.recipients.append(row)
        job.trace = job.trace or row.trace or row.address.lower() in traced
    return list(jobs.values())
