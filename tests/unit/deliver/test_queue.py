"""Destination queues: when another connection is opened (pure)."""

from __future__ import annotations

import pytest

from relay.deliver.queue import DestinationQueue, Job
from relay.deliver.resolve import Destination


def queue(jobs: int, *, senders=0, idle=0, max_connections=20, per_connection=10, spawn_after=0.25,
          queued_at=100.0) -> DestinationQueue:
    q = DestinationQueue(Destination(("mx.example",), ()), "none", max_connections, per_connection,
                         spawn_after)
    for i in range(jobs):
        job = Job(f"Q{i}", "a@s.example", False, 0.0, 10, "r.example", [])
        job.queued = queued_at
        q.push(job)
    q.senders = senders
    q.idle = [object()] * idle
    return q


def spawned(q: DestinationQueue, now: float) -> int:
    """What the dispatcher's pump does: start senders while asked to."""
    count = 0
    while q.wants_sender(now):
        q.senders += 1
        count += 1
        assert count < 1000, "the pump would never stop"
    return count


@pytest.mark.parametrize(
    "jobs, senders, expected",
    [(0, 0, 0), (1, 0, 1), (10, 0, 1), (11, 0, 2), (25, 0, 3), (25, 3, 0)],
)
def test_one_connection_per_messages_per_connection_jobs(jobs, senders, expected):
    assert spawned(queue(jobs, senders=senders), now=100.1) == expected


def test_jobs_waiting_behind_busy_connections_get_more_of_them():
    # One sender carries all 5 jobs, but the head job has waited 1 s.
    assert spawned(queue(5, senders=1), now=101.0) == 4


def test_the_pump_stops_with_idle_connections_and_waiting_jobs():
    # The bug this guards against: idle connections plus a waiting job made
    # the pump start senders forever.
    assert spawned(queue(3, senders=1, idle=2), now=101.0) == 2


def test_never_more_than_the_connection_limit():
    assert spawned(queue(500, max_connections=4, per_connection=1), now=101.0) == 4
    assert spawned(queue(500, senders=2, idle=2, max_connections=4, per_connection=1), now=101.0) == 2


def test_a_messages_recipients_at_domains_sharing_the_destination_merge():
    from relay.spool.store import DueRecipient

    def job(queue_id, domain, *addresses):
        rows = [DueRecipient(queue_id, i, a, domain, 0, "s@x.example", 0.0, False, 10)
                for i, a in enumerate(addresses)]
        return Job(queue_id, "s@x.example", False, 0.0, 10, domain, rows)

    q = queue(0)
    q.push(job("A", "one.example", "a@one.example"))
    q.push(job("B", "one.example", "b@one.example"))
    q.push(job("A", "two.example", "c@two.example"))
    first = q.next_job()
    assert [r.address for r in first.recipients] == ["a@one.example", "c@two.example"]
    # Started jobs take no more recipients: a later part goes on its own.
    q.push(job("A", "three.example", "d@three.example"))
    assert [j.queue_id for j in q.take_all()] == ["B", "A"] and q.waiting == {}
