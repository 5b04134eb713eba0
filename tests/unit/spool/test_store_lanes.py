"""The spool's lanes and campaigns: claims with room per lane, the daily
roll-up written with the events, campaign figures, pause and cancel."""

from __future__ import annotations

import dataclasses
import time

from relay.model import Event
from relay.spool.format import RecipientState
from relay.spool.store import CANCELLED_TEXT, day_of
from tests.unit.spool.test_store_delivery import part, run, update


def bulk(queue_id, *addresses, campaign="spring"):
    return dataclasses.replace(part(queue_id, *addresses), lane="bulk", campaign=campaign,
                               tenant="acme")


def test_transactional_mail_is_claimed_before_older_bulk_and_bulk_has_a_cap(tmp_path):
    async def scenario(spool):
        await spool.store(bulk("B", *[f"b{i}@x.example" for i in range(5)]))
        await spool.store(part("T", "t@x.example"))  # newer, transactional
        first = await spool.claim_due(time.time() + 1, 3, bulk_limit=2)
        rest = await spool.claim_due(time.time() + 1, 10, bulk_limit=0)
        last = await spool.claim_due(time.time() + 1, 10)
        return first, rest, last

    first, rest, last = run(tmp_path, scenario)
    assert [(r.queue_id, r.lane) for r in first] == [("T", "transactional"), ("B", "bulk"),
                                                       ("B", "bulk")]
    assert first[1].campaign == "spring"
    assert rest == []  # only bulk waits and it has no room
    assert len(last) == 3


def test_events_roll_up_by_day_lane_campaign_and_domain(tmp_path):
    now = time.time()

    async def scenario(spool):
        await spool.store(bulk("B", "a@x.example", "b@X.example", "c@y.example"))
        claimed = await spool.claim_due(now + 1, 10)
        events = [Event(now, r.queue_id, r.address, r.domain, None, None, 0, 250, None, "ok",
                        "delivered", None, 0.1, r.lane, r.campaign) for r in claimed]
        await spool.complete([update(r, RecipientState.DELIVERED) for r in claimed], events)
        await spool.prune_events(now + 10)  # the events go; the roll-up stays
        return await spool.read(lambda c: c.execute(
            "SELECT day, lane, campaign, domain, outcome, count FROM daily ORDER BY domain"
        ).fetchall()), await spool.campaign_figures()

    rows, figures = run(tmp_path, scenario)
    assert rows == [(day_of(now), "bulk", "spring", "x.example", "delivered", 2),
                    (day_of(now), "bulk", "spring", "y.example", "delivered", 1)]
    assert figures[0]["delivered"] == 3 and figures[0]["queued"] == 0
    assert figures[0]["tenant"] == "acme" and figures[0]["class"] == "bulk"


def test_paused_campaign_is_held_then_released_and_cancel_is_idempotent(tmp_path):
    now = time.time()

    async def scenario(spool):
        await spool.store(bulk("B", "a@x.example", "b@x.example"))
        await spool.store(bulk("O", "o@x.example", campaign="other"))
        claimed = await spool.claim_due(now + 1, 10)
        held = [r for r in claimed if r.campaign == "spring"]
        await spool.complete([update(r, RecipientState.HELD, now, attempts=0) for r in held], [])
        figures = {f["name"]: f for f in await spool.campaign_figures()}
        released = await spool.release_campaign("spring", now)
        cancelled = await spool.cancel_campaign("spring", now)
        again = await spool.cancel_campaign("spring", now)
        # Cancelled is stored as bounced: a requeue of every bounce leaves it cancelled.
        requeued = await spool.requeue(code=None, sender=None, recipient=None, now=now)
        after = (await spool.campaign_figures("spring"))[0]
        return figures, released, cancelled, again, after, requeued

    figures, released, cancelled, again, after, requeued = run(tmp_path, scenario)
    assert requeued == 0
    assert figures["spring"]["held"] == 2 and figures["other"]["queued"] == 1
    assert released == 2
    assert {e.recipient for e in cancelled} == {"a@x.example", "b@x.example"}
    assert {(e.outcome, e.text, e.campaign) for e in cancelled} == {("cancelled", CANCELLED_TEXT,
                                                                     "spring")}
    assert again == []
    assert after["dropped"] == 2 and after["queued"] == 0 and after["held"] == 0


def test_a_campaign_behind_a_bulk_backlog_is_claimed_at_once_with_the_oldest(tmp_path):
    async def scenario(spool):
        await spool.store(bulk("BIG", *[f"b{i}@x.example" for i in range(10)], campaign="big"))
        await spool.store(bulk("SMALL", "s0@x.example", "s1@x.example", campaign="small"))
        return await spool.claim_due(time.time() + 1, 100, bulk_limit=4)

    claimed = run(tmp_path, scenario)
    assert sorted(r.address for r in claimed) == ["b0@x.example", "b1@x.example",
                                                   "s0@x.example", "s1@x.example"]
