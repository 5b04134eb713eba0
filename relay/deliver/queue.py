"""Per-destination ready queues and their connection bookkeeping (pure).

Input: jobs (one message's recipients for one domain) routed to a
destination.  Output: decisions — whether another sender should start,
which idle connection to reuse — with no I/O: the dispatcher acts on them.

A destination is the set of MX hosts of a domain (plus the TLS mode), so
domains sharing MX hosts share one queue and one pool.  The limits that
shape traffic (connections per destination, messages per connection) are
enforced here; per-destination rate limits, adaptive backoff, suspension
and priority lanes are meant to plug in at ``next_job`` and ``may_open``.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field

from relay.deliver.resolve import Destination
from relay.spool.store import DueRecipient


# Recipients merged into one transaction at most (RFC 5321 4.5.3.1.8 asks
# servers to take at least 100; a server that takes fewer answers 452 and
# the rest go in the next transaction).
MAX_RECIPIENTS_PER_TRANSACTION = 100


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
    queued: float = 0.0  # when it entered its destination queue (monotonic)
    claimed: float = field(default_factory=time.monotonic)


def jobs_from(due: list[DueRecipient], traced: frozenset[str] = frozenset()) -> list[Job]:
    """Group claimed recipients by (message, domain), keeping claim order."""
    jobs: dict[tuple[str, str], Job] = {}
    for row in due:
        job = jobs.get((row.queue_id, row.domain))
        if job is None:
            job = jobs[(row.queue_id, row.domain)] = Job(
                row.queue_id, row.sender, row.smtputf8, row.received, row.size, row.domain, []
            )
        job.recipients.append(row)
        job.trace = job.trace or row.trace or row.address.lower() in traced
    return list(jobs.values())


@dataclass
class DestinationQueue:
    destination: Destination
    tls_mode: str
    max_connections: int
    messages_per_connection: int
    # A job waiting this long behind busy connections asks for one more:
    # fast receivers are served by few reused connections, slow ones by many.
    spawn_after: float = 0.25
    jobs: collections.deque = field(default_factory=collections.deque)
    # Jobs not started yet, by queue id: a message's recipients at several
    # domains that share this destination go in one transaction.
    waiting: dict = field(default_factory=dict)
    idle: list = field(default_factory=list)  # parked sessions, oldest first
    senders: int = 0  # sender tasks running (each holds or is opening a connection)

    @property
    def connections(self) -> int:
        return self.senders + len(self.idle)

    def push(self, job: Job, front: bool = False) -> None:
        job.queued = job.queued or time.monotonic()
        same = self.waiting.get(job.queue_id)
        if (same is not None and not front
                and len(same.recipients) + len(job.recipients) <= MAX_RECIPIENTS_PER_TRANSACTION):
            same.recipients.extend(job.recipients)
            same.trace = same.trace or job.trace
            return
        if front:
            self.jobs.appendleft(job)
        else:
            self.jobs.append(job)
        self.waiting.setdefault(job.queue_id, job)

    def next_job(self) -> Job | None:
        if not self.jobs:
            return None
        job = self.jobs.popleft()
        if self.waiting.get(job.queue_id) is job:
            del self.waiting[job.queue_id]
        return job

    def take_all(self) -> list[Job]:
        """Every job not started (the site failed, or the worker stops)."""
        jobs = list(self.jobs)
        self.jobs.clear()
        self.waiting.clear()
        return jobs

    def wants_sender(self, now: float) -> bool:
        """Start another sender?  For work the running ones cannot carry
        (each carries up to messages_per_connection jobs), or when the
        oldest job has waited longer than spawn_after (a slow receiver: one
        connection is not enough; at most one sender per waiting job) —
        within the connection limit, idle connections counting (and reused
        first).  Each start raises ``senders``, so asking again in a loop
        always comes to a no."""
        if not self.jobs or self.senders >= self.max_connections:
            return False
        if not self.idle and self.connections >= self.max_connections:
            return False
        if self.senders * self.messages_per_connection < len(self.jobs):
            return True
        return now - self.jobs[0].queued > self.spawn_after and self.senders < len(self.jobs)

    def take_idle(self):
        return self.idle.pop() if self.idle else None
