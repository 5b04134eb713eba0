"""The spool's delivery side: claims, completions, pruning, operator commands."""

from __future__ import annotations

import asyncio
import time

from relay.model import Part, Recipient
from relay.route.shard import slot_of
from relay.spool.format import RecipientState
from relay.spool.store import RecipientUpdate, Spool


def part(queue_id: str, *addresses: str, sender: str = "app@s.example") -> Part:
    recipients = tuple(
        Recipient(a, a.split("@")[1], slot_of(a.split("@")[1]), i) for i, a in enumerate(addresses)
    )
    return Part(queue_id, sender, recipients, b"Subject: x\r\n\r\nbody\r\n", time.time())


def run(tmp_path, scenario):
    async def main():
        spool = Spool(str(tmp_path), 0)
        await spool.open()
        try:
            return await scenario(spool)
        finally:
            await spool.close()

    return asyncio.run(main())


def update(row, state, next_attempt=0.0, attempts=1):
    return RecipientUpdate(row.queue_id, row.index, state, attempts, next_attempt, "reply")


def test_claims_are_taken_once_and_only_when_due(tmp_path):
    async def scenario(spool):
        await spool.store(part("A", "a@x.example", "b@y.example"))
        first = await spool.claim_due(time.time() + 1, 10)
        again = await spool.claim_due(time.time() + 1, 10)
        await spool.complete([update(first[0], RecipientState.DEFERRED, time.time() + 3600)], [])
        not_due = await spool.claim_due(time.time() + 1, 10)
        returned = await spool.unclaim_all()  # as at a restart: b is claimed still
        return first, again, not_due, returned, await spool.next_due()

    first, again, not_due, returned, next_due = run(tmp_path, scenario)
    assert [r.address for r in first] == ["a@x.example", "b@y.example"]
    assert again == [] and not_due == [] and returned == 1
    assert next_due <= time.time()  # b is queued again and due


def test_held_recipients_are_never_claimed_until_their_domain_is_resumed(tmp_path):
    async def scenario(spool):
        await spool.store(part("A", "a@x.example", "b@y.example", "c@x.example"))
        claimed = await spool.claim_due(time.time() + 1, 10)
        await spool.complete([update(r, RecipientState.HELD, time.time(), attempts=2)
                              for r in claimed if r.domain == "x.example"], [])
        while_held = await spool.claim_due(time.time() + 3600, 10), await spool.next_due()
        other = await spool.release_suspended("y.example", time.time())
        released = await spool.release_suspended("x.example", time.time())
        again = await spool.claim_due(time.time() + 1, 10)
        return while_held, other, released, again

    (held_claims, held_due), other, released, again = run(tmp_path, scenario)
    assert held_claims == [] and held_due is None  # b is still being sent; a and c held
    assert other == 0 and released == 2
    assert sorted(r.address for r in again) == ["a@x.example", "c@x.example"]
    assert {r.attempts for r in again} == {2}  # being held used no attempt


def test_delivered_mail_leaves_bounced_mail_stays_until_pruned(tmp_path):
    async def scenario(spool):
        await spool.store(part("D", "a@x.example"))
        await spool.store(part("B", "b@y.example"))
        claimed = {r.queue_id: r for r in await spool.claim_due(time.time() + 1, 10)}
        await spool.complete([update(claimed["D"], RecipientState.DELIVERED),
                              update(claimed["B"], RecipientState.BOUNCED, time.time() - 10)],
                             [], suppress=[("b@y.example", "550 5.1.1 no")])
        kept = await spool.body("B"), await spool.body("D")
        requeued = await spool.requeue(code=None, sender=None, recipient="^b@", now=time.time())
        reclaimed = await spool.claim_due(time.time() + 1, 10)
        await spool.complete([update(reclaimed[0], RecipientState.BOUNCED, time.time() - 10)], [])
        pruned = await spool.prune_bounced(time.time())
        return kept, requeued, reclaimed, pruned, await spool.body("B")

    (bounced_body, delivered_body), requeued, reclaimed, pruned, after = run(tmp_path, scenario)
    assert bounced_body is not None and delivered_body is None
    assert requeued == 1 and reclaimed[0].suppressed is None  # off the suppression list
    assert pruned == 1 and after is None


def test_flush_makes_deferred_mail_due(tmp_path):
    async def scenario(spool):
        await spool.store(part("A", "a@x.example", "b@y.example"))
        rows = await spool.claim_due(time.time() + 1, 10)
        later = time.time() + 3600
        await spool.complete([update(r, RecipientState.DEFERRED, later) for r in rows], [])
        flushed = await spool.flush("x.example", time.time())
        return flushed, [r.address for r in await spool.claim_due(time.time() + 1, 10)]

    assert run(tmp_path, scenario) == (1, ["a@x.example"])
