"""Jobs from claimed recipients: one per (message, domain), in claim order."""

from __future__ import annotations

from relay.deliver.queue import jobs_from
from relay.spool.store import DueRecipient


def row(queue_id, index, address, trace=False):
    return DueRecipient(queue_id, index, address, address.split("@")[1], 0, "s@x.example", 0.0,
                        False, 10, trace=trace)


def test_recipients_group_by_message_and_domain_in_claim_order():
    jobs = jobs_from([row("A", 0, "a@one.example"), row("B", 0, "b@one.example"),
                      row("A", 1, "c@one.example"), row("A", 2, "d@two.example")])
    assert [(j.queue_id, j.domain, [r.address for r in j.recipients]) for j in jobs] == [
        ("A", "one.example", ["a@one.example", "c@one.example"]),
        ("B", "one.example", ["b@one.example"]),
        ("A", "two.example", ["d@two.example"]),
    ]


def test_a_traced_recipient_traces_its_job():
    (job,) = jobs_from([row("A", 0, "a@one.example"), row("A", 1, "Who@one.example")],
                       traced=frozenset({"who@one.example"}))
    assert job.trace
