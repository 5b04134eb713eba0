"""relay.intake.amqp.Consumer: copies of one message taken by two workers
at once are stored once.

Two workers in one event loop: each a real spool (spool.store), its share
of the message keys (spool.seen) and a Router serving the other over a Unix
socket in a temporary directory; the broker is a fake message with ack and
nack.  No processes, no network.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import types

import orjson
import pytest

from relay import config
from relay.errors import OwnerUnavailable
from relay.intake import amqp
from relay.intake.handler import IntakeState
from relay.route.forward import Router
from relay.route.shard import key_owner
from relay.spool import read
from relay.spool.seen import IntakeIndex
from relay.spool.store import Spool


class FakeMessage:
    """What Consumer uses of aio-pika's IncomingMessage."""

    def __init__(self, body: bytes, message_id: str | None = None) -> None:
        self.body = body
        self.message_id = message_id
        self.settled: list[str] = []

    async def ack(self) -> None:
        self.settled.append("ack")

    async def nack(self, requeue: bool) -> None:
        assert requeue
        self.settled.append("nack")


@pytest.fixture
def directory():
    # Short path: a Unix socket path must fit in 108 bytes.
    path = tempfile.mkdtemp(prefix="amq", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def payload(seq: int) -> bytes:
    return orjson.dumps({"envelope": "app@sender.example", "recipient": f"r{seq}@d{seq}.example",
                         "body": f"Subject: n{seq}\r\n\r\nHello {seq}.\r\n"})


def stored(directory: str, workers: int) -> list[str]:
    """The queue ids of every part in every spool (through the spool's read API)."""
    found = []
    for reader in read.open_readers(directory):
        try:
            found += [part.queue_id for part in reader.parts()]
        finally:
            reader.close()
    return found


def run_workers(directory: str, body, workers: int = 2, overlap: bool = False):
    """Run ``await body(consumers)``: one Consumer per worker, wired as
    relay.worker wires them.  ``overlap``: no try stores its message before
    two tries have claimed their key (the window of the race, held open)."""
    settings = config.from_dict({"relay": {"spool_dir": directory, "run_dir": directory},
                                 "intake": {"min_free_space": 0}})
    table = types.SimpleNamespace(queue="outbox", format="postmanq", class_="")

    async def main():
        spools, indexes, routers, consumers = [], [], [], []
        claimed = []
        both_claimed = asyncio.Event()

        def counting(claim):
            async def claim_key(*args):
                holder = await claim(*args)
                claimed.append(holder)
                if len(claimed) == 2:
                    both_claimed.set()
                return holder
            return claim_key

        def after_both_claimed(submit):
            async def accept(txn):
                await asyncio.wait_for(both_claimed.wait(), 5)
                await submit(txn)
            return accept

        for worker in range(workers):
            spool = Spool(directory, worker)
            await spool.open()
            index = IntakeIndex(directory, spool)
            router = Router(worker, workers, spool, directory, keys=index)
            await router.serve()
            claim, accept = router.claim_key, router.submit
            if overlap:
                claim, accept = counting(claim), after_both_claimed(accept)
            state = IntakeState(settings, worker, accept)
            spools.append(spool)
            indexes.append(index)
            routers.append(router)
            consumers.append(amqp.Consumer(table, state, claim, router.forget_key))
        try:
            return await body(consumers)
        finally:
            for router, index, spool in zip(routers, indexes, spools):
                await router.close()
                index.close()
                await spool.close()

    return asyncio.run(main())


@pytest.mark.parametrize("owner", [0, 1])
def test_two_workers_taking_one_message_at_once_store_it_once(directory, monkeypatch, owner):
    monkeypatch.setattr(amqp, "NACK_DELAY", 0.0)
    # A message whose key one worker owns: the other asks it over the socket.
    seq = next(n for n in range(100)
               if key_owner(amqp.amqp_message.payload_key(payload(n)), 2) == owner)
    copies = [FakeMessage(payload(seq)), FakeMessage(payload(seq))]

    async def body(consumers):
        # The broker cut the connection: the copy is redelivered to the
        # other worker while the first try is still under way.
        await asyncio.gather(*(c._settle(m) for c, m in zip(consumers, copies)))
        first = [m.settled for m in copies]
        # The nacked copy comes back, to either worker: now a duplicate.
        again = FakeMessage(payload(seq))
        await consumers[owner]._settle(again)
        counts = [dict(c.counts) for c in consumers]
        return first, again.settled, counts

    first, again, counts = run_workers(directory, body, overlap=True)
    assert sorted(first) == [["ack"], ["nack"]]  # one stored it, the other waits for it
    assert again == ["ack"]
    assert len(stored(directory, 2)) == 1
    assert sum(c.get("duplicates", 0) for c in counts) == 1


def test_many_messages_each_taken_twice_at_once_are_each_stored_once(directory, monkeypatch):
    monkeypatch.setattr(amqp, "NACK_DELAY", 0.0)
    published = [payload(seq) for seq in range(40)]

    async def body(consumers):
        pending = [(seq, copy) for seq in range(40) for copy in range(2)]
        rounds = 0
        while pending and rounds < 10:
            # Both copies of every message in hand at once, one per worker.
            messages = [(seq, FakeMessage(published[seq])) for seq, _ in pending]
            await asyncio.gather(*(consumers[n % 2]._settle(m)
                                   for n, (_, m) in enumerate(messages)))
            pending = [(seq, 0) for seq, m in messages if m.settled == ["nack"]]
            rounds += 1
        return pending, [dict(c.counts) for c in consumers]

    pending, counts = run_workers(directory, body)
    assert pending == []  # every copy was acked in the end
    assert len(stored(directory, 2)) == 40
    assert sum(c.get("duplicates", 0) for c in counts) == 40


def test_a_claim_whose_answer_was_lost_gives_the_key_back_once_the_owner_answers(
        directory, monkeypatch):
    # The key's owner recorded the claim, then died before answering: the
    # record names a live worker, so without being given back every copy
    # would wait for spool.seen.IN_FLIGHT_LIMIT (60 s) before being stored.
    monkeypatch.setattr(amqp, "NACK_DELAY", 0.0)
    monkeypatch.setattr(amqp, "FORGET_RETRY", 0.05)

    async def body(consumers):
        consumer = consumers[0]
        real_claim, real_forget = consumer.claim, consumer.forget
        owner_down_for = [2]  # forgets refused while the owner restarts

        async def claim_then_lose_the_answer(*args):
            await real_claim(*args)
            raise OwnerUnavailable("worker 1 went away")

        async def forget_while_the_owner_restarts(*args):
            if owner_down_for[0]:
                owner_down_for[0] -= 1
                raise OwnerUnavailable("worker 1 is not reachable")
            await real_forget(*args)

        consumer.claim, consumer.forget = claim_then_lose_the_answer, forget_while_the_owner_restarts
        first = FakeMessage(payload(7))
        await consumer._settle(first)
        consumer.claim = real_claim
        for _ in range(200):  # the key given back in the background: bounded wait
            if not consumer._forgetting:
                break
            await asyncio.sleep(0.01)
        again = FakeMessage(payload(7))  # the broker's redelivery
        await consumer._settle(again)
        return first.settled, again.settled, owner_down_for[0]

    first, again, refused_left = run_workers(directory, body)
    assert first == ["nack"]
    assert refused_left == 0  # given back only after two refusals
    assert again == ["ack"]  # stored at once, not after 60 s
    assert len(stored(directory, 2)) == 1
