"""The spool's side of quarantine: crashes charged to recipients being
sent, the quarantined state that no claim takes, and the release."""

from __future__ import annotations

import sqlite3
import time

from relay.spool.format import RecipientState
from relay.spool.store import spool_path
from test_store_delivery import part, run, update

ERROR = "RuntimeError: boom"


def recipients(tmp_path) -> list[tuple]:
    conn = sqlite3.connect(spool_path(str(tmp_path), 0))
    return conn.execute("SELECT address, state, crashes, error FROM recipient ORDER BY idx").fetchall()


async def crash(spool, queue_id="A", indices=(0, 1), after=3):
    claimed = await spool.claim_due(time.time() + 1, 10)
    events = await spool.record_crash(queue_id, list(indices), ERROR, "x.example", after)
    return claimed, events


def test_a_crash_puts_the_recipients_back_with_its_count_and_error(tmp_path):
    async def scenario(spool):
        await spool.store(part("A", "a@x.example", "b@x.example"))
        claimed, events = await crash(spool)
        again = await spool.claim_due(time.time() + 1, 10)
        return claimed, events, again

    claimed, events, again = run(tmp_path, scenario)
    assert [e[10] for e in events] == ["crashed", "crashed"]
    assert [(e[2], e[7], e[9]) for e in events][0] == ("a@x.example", 0, ERROR)
    assert [r.address for r in again] == ["a@x.example", "b@x.example"]  # due again at once
    assert recipients(tmp_path) == [("a@x.example", int(RecipientState.SENDING), 1, ERROR),
                                    ("b@x.example", int(RecipientState.SENDING), 1, ERROR)]


def test_the_kth_crash_quarantines_and_no_claim_takes_it(tmp_path):
    async def scenario(spool):
        await spool.store(part("A", "a@x.example"))
        await spool.store(part("B", "b@y.example"))
        outcomes = []
        for _ in range(3):
            claimed, events = await crash(spool, indices=(0,), after=3)
            outcomes += [e[10] for e in events]
            if "B" in {r.queue_id for r in claimed}:  # B is fine: it completes
                b = next(r for r in claimed if r.queue_id == "B")
                await spool.complete([update(b, RecipientState.DEFERRED, time.time() - 1)], [])
        returned = await spool.unclaim_all()  # as at a restart
        claimed = await spool.claim_due(time.time() + 1, 10)
        return (outcomes, claimed, await spool.next_due(), returned,
                await spool.prune_bounced(time.time() + 1))

    outcomes, claimed, next_due, returned, pruned = run(tmp_path, scenario)
    assert outcomes == ["crashed", "crashed", "quarantined"]
    assert [r.queue_id for r in claimed] == ["B"]  # the rest goes on
    assert next_due is None  # A waits for nothing: it is not due ever
    assert returned == 0 and pruned == 0  # a restart leaves it quarantined; pruning keeps it
    assert recipients(tmp_path)[0] == ("a@x.example", int(RecipientState.QUARANTINED), 3, ERROR)


def test_only_recipients_still_being_sent_are_charged(tmp_path):
    async def scenario(spool):
        await spool.store(part("A", "a@x.example", "b@x.example"))
        claimed = await spool.claim_due(time.time() + 1, 10)
        await spool.complete([update(claimed[0], RecipientState.DELIVERED)], [])
        return await spool.record_crash("A", [0, 1], ERROR, "x.example", 1)

    events = run(tmp_path, scenario)
    assert [(e[2], e[10]) for e in events] == [("b@x.example", "quarantined")]
    assert recipients(tmp_path) == [("a@x.example", int(RecipientState.DELIVERED), 0, None),
                                    ("b@x.example", int(RecipientState.QUARANTINED), 1, ERROR)]


def test_release_queues_quarantined_recipients_with_no_crash_count(tmp_path):
    async def scenario(spool):
        await spool.store(part("A", "a@x.example"))
        await crash(spool, indices=(0,), after=1)
        released = await spool.release_quarantined(["A", "NOSUCH"], time.time())
        again = await spool.release_quarantined(["A"], time.time())
        return released, again, await spool.claim_due(time.time() + 1, 10)

    released, again, claimed = run(tmp_path, scenario)
    assert (released, again) == (1, 0)
    assert [r.address for r in claimed] == ["a@x.example"]
    assert recipients(tmp_path) == [("a@x.example", int(RecipientState.SENDING), 0, None)]
