"""relay.dispatch: a bug raised in one job's step is charged to that job's
message in the spool, then raised again (it still kills the worker)."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest

from relay import config
from relay.deliver.queue import jobs_from
from relay.dispatch import Dispatcher
from relay.model import Part, QueueIds, Recipient
from relay.route.shard import slot_of
from relay.spool import read
from relay.spool.format import RecipientState
from relay.spool.store import RecipientUpdate, Spool, spool_path


def part(queue_id: str, *addresses: str) -> Part:
    return Part(queue_id, "app@s.example",
                tuple(Recipient(a, "x.example", slot_of("x.example"), i)
                      for i, a in enumerate(addresses)),
                b"Subject: x\r\n\r\nbody\r\n", time.time())


def run(tmp_path, scenario, quarantine_after=2):
    settings = config.defaults()
    settings = dataclasses.replace(settings, deliver=dataclasses.replace(
        settings.deliver, event_log_dir=str(tmp_path / "log"), quarantine_after=quarantine_after))

    async def main():
        spool = Spool(str(tmp_path), 0)
        await spool.open()
        dispatcher = Dispatcher(settings, 0, 1, spool, None, QueueIds(0))
        try:
            return await scenario(spool, dispatcher)
        finally:
            await dispatcher.close()
            await spool.close()

    return asyncio.run(main())


def rows(tmp_path) -> list[tuple]:
    reader = read.SpoolReader(0, spool_path(str(tmp_path), 0))
    try:
        found = sorted(reader.recipients(), key=lambda r: (r.queue_id, r.index))
    finally:
        reader.close()
    return [(r.queue_id, r.address, r.state, r.crashes, r.error) for r in found]


async def bug():
    raise KeyError("no such\nthing")


def test_a_bug_in_a_job_is_charged_to_its_message_only_and_raised_again(tmp_path):
    async def scenario(spool, dispatcher):
        await spool.store(part("A", "a@x.example"))
        await spool.store(part("B", "b@x.example"))
        jobs = {job.queue_id: job for job in jobs_from(await spool.claim_due(time.time() + 1, 10))}
        raised = []
        for _ in range(2):  # quarantine_after = 2
            with pytest.raises(KeyError) as info:
                await dispatcher._charged(jobs["A"], bug())
            raised.append(info.type)
            await spool.claim_due(time.time() + 1, 10)  # claimed again, as after a restart
        return raised

    assert run(tmp_path, scenario) == [KeyError, KeyError]
    assert rows(tmp_path) == [
        ("A", "a@x.example", int(RecipientState.QUARANTINED), 2, "KeyError: 'no such\\nthing'"),
        ("B", "b@x.example", int(RecipientState.SENDING), 0, None),  # in flight: not charged
    ]
    log = (tmp_path / "log" / "delivery-0.jsonl").read_text()
    assert log.count('"outcome":"crashed"') == 1 and log.count('"outcome":"quarantined"') == 1


def test_a_bug_after_the_outcome_was_committed_charges_nothing(tmp_path):
    async def scenario(spool, dispatcher):
        await spool.store(part("A", "a@x.example", "b@x.example"))
        [job] = jobs_from(await spool.claim_due(time.time() + 1, 10))

        async def deliver_then_fail():
            await spool.complete([RecipientUpdate("A", 0, RecipientState.DELIVERED, 1, 0.0, "250"),
                                  RecipientUpdate("A", 1, RecipientState.DEFERRED, 1, 0.0, "451")],
                                 [])
            raise RuntimeError("after the fact")

        with pytest.raises(RuntimeError):
            await dispatcher._charged(job, deliver_then_fail())

    run(tmp_path, scenario, quarantine_after=1)
    assert rows(tmp_path) == [("A", "a@x.example", int(RecipientState.DELIVERED), 0, None),
                              ("A", "b@x.example", int(RecipientState.DEFERRED), 0, None)]


def test_claims_keep_room_for_transactional_mail_and_refill_when_bulk_frees_some(tmp_path):
    settings = config.defaults()
    settings = dataclasses.replace(settings, deliver=dataclasses.replace(
        settings.deliver, event_log_dir=str(tmp_path / "log"), max_loaded=40,
        bulk_loaded_share=0.5))

    async def main():
        spool = Spool(str(tmp_path), 0)
        await spool.open()
        dispatcher = Dispatcher(settings, 0, 1, spool, None, QueueIds(0))
        routed = []

        async def route(job):  # stands in for resolving and scheduling
            routed.append(job)

        dispatcher._route = route
        try:
            await spool.store(dataclasses.replace(part("B", *[f"b{i}@x.example" for i in range(30)]),
                                                  lane="bulk", campaign="c"))
            await spool.store(part("T", "t0@x.example", "t1@x.example", "t2@x.example"))
            await dispatcher._once()  # claims, and finds the bulk share full
            await asyncio.sleep(0)
            loaded = (dispatcher.loaded, dispatcher.loaded_bulk)
            dispatcher._wakeup.clear()
            dispatcher._unload(routed[-1].recipients[:1])  # 19 of 20 bulk: not yet a tenth free
            early = dispatcher._wakeup.is_set()
            dispatcher._unload(routed[-1].recipients[1:2])
            return loaded, [(j.queue_id, j.lane, len(j.recipients)) for j in routed], early, \
                dispatcher._wakeup.is_set()
        finally:
            await dispatcher.close()
            await spool.close()

    loaded, routed, early, woken = asyncio.run(main())
    assert loaded == (23, 20)
    assert routed == [("T", "transactional", 3), ("B", "bulk", 20)]
    assert not early and woken


def test_the_reply_to_a_bdat_stands_where_the_reply_after_the_dot_would():
    from types import SimpleNamespace

    from relay.deliver.session import TransactionResult
    from relay.model import Reply, Stage

    job = SimpleNamespace(recipients=["a@x.example", "b@x.example"])
    ok, refused = Reply(250, "2.1.5", "ok", "mx"), Reply(550, "5.1.1", "no such user", "mx")
    spam = Reply(554, "5.7.1", "spam", "mx")
    chunked = TransactionResult(mail=ok, rcpt=[ok, refused], dot=spam, chunked=True)
    assert Dispatcher._per_recipient(job, chunked) == [
        ("b@x.example", refused, Stage.RCPT), ("a@x.example", spam, Stage.DOT)]
    # The same replies without chunked: no 354 came, so DATA is where it failed.
    plain = TransactionResult(mail=ok, rcpt=[ok, refused], dot=spam)
    [_, (address, reply, stage)] = Dispatcher._per_recipient(job, plain)
    assert (address, reply.text, stage) == ("a@x.example", "no reply to DATA", Stage.DATA)
