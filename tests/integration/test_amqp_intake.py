"""AMQP intake end to end: the local RabbitMQ, the real relay processes,
the fake internet at the far end."""

from __future__ import annotations

import base64
import collections
import json
import os
import re
import signal
import time

import orjson
import pytest

from amqp_support import URL, Broker, leftovers, postmanq, sequence_numbers
from support import deliver_relay, free_port, inject, relayctl, wait_for

DOMAINS = [f"d{i}.example" for i in range(6)]


@pytest.fixture
def broker():
    broker = Broker()
    broker.declare()
    yield broker
    broker.cleanup()
    assert leftovers(broker.prefix) == []


@pytest.fixture
def relay_factory(broker, relay_factory):
    """The relays of a test stop before its broker fixture deletes the
    queues (set up after ``broker``, torn down before it): a relay still
    consuming would declare them again."""
    return relay_factory


def stats(relay) -> dict:
    result = relayctl(relay, "stats", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def body(seq: int) -> str:
    return (f"From: App <app@sender.example>\r\nTo: r{seq}@x\r\nSubject: n{seq}\r\n"
            f"Message-ID: <{seq}@sender.example>\r\nX-Test-Seq: {seq}\r\n\r\nHello {seq}.\r\n")


def messages(count: int, start: int = 0) -> list[bytes]:
    return [postmanq("app@sender.example", f"r{seq}@{DOMAINS[seq % len(DOMAINS)]}", body(seq))
            for seq in range(start, start + count)]


def amqp_relay(relay_factory, net, broker, workers=2, intake_limits=None, **consumer):
    for index, domain in enumerate(DOMAINS):
        net.add_domain(domain, [f"127.0.0.{10 + index}"])
    return deliver_relay(relay_factory, net, workers=workers,
                         intake={"min_free_space": 0, **(intake_limits or {})},
                         amqp={"consumer": [{"url": URL, "queue": broker.queue, **consumer}]})


def wait_delivered(net, expected: set[int], timeout: float) -> collections.Counter:
    wait_for(lambda: set(sequence_numbers(net.farm.received)) >= expected, timeout,
             f"{len(expected)} messages at the MX farm")
    return collections.Counter(sequence_numbers(net.farm.received))


QUEUE_ID = re.compile(rb"with AMQP id (\w+)")


def report_duplicates(net, label: str) -> int:
    """Print the duplicates, told apart: spooled twice (the intake took one
    published message twice: two queue ids) or sent twice (delivery is
    at-least-once: one queue id delivered twice after a kill).  Returns how
    many messages were spooled twice."""
    ids = collections.defaultdict(list)
    for received in net.farm.received:
        seq = sequence_numbers([received])
        if seq:
            ids[seq[0]].append(QUEUE_ID.search(received.data).group(1).decode())
    spooled_twice = sorted(seq for seq, found in ids.items() if len(set(found)) > 1)
    sent_twice = sorted(seq for seq, found in ids.items() if len(found) > len(set(found)))
    print(f"{label}: {len(ids)} distinct messages delivered, "
          f"{sum(map(len, ids.values()))} deliveries; spooled twice: {len(spooled_twice)} "
          f"{spooled_twice[:20]}; delivered twice from one spooled copy: {len(sent_twice)} "
          f"{sent_twice[:20]}")
    return len(spooled_twice)


def test_postmanq_messages_are_all_delivered_once(relay_factory, net, broker):
    started = time.monotonic()
    broker.publish(messages(500))
    relay = amqp_relay(relay_factory, net, broker)
    seen = wait_delivered(net, set(range(500)), timeout=90)
    print(f"500 messages consumed and delivered in {time.monotonic() - started:.1f}s")
    report_duplicates(net, "plain run")
    assert max(seen.values()) == 1  # no kill, no cut: no duplicate of any kind
    wait_for(lambda: broker.count(broker.queue) == 0, 10, "the queue drained (every message acked)")
    received = [r for r in net.farm.received if b"X-Test-Seq: 7\r\n" in r.data][0]
    assert received.mail_from == "app@sender.example" and received.rcpt_tos == ("r7@d1.example",)
    assert b"with AMQP id" in received.data and received.data.endswith(body(7).encode())
    relay.stop()


def test_malformed_messages_land_in_failure_technical_with_an_error(relay_factory, net, broker):
    bad = [
        b"{not json",
        postmanq("app@sender.example", "not an address", body(1)),
        b'{"envelope": "app@sender.example", "body": "x"}',
        postmanq("app@sender.example", "r2@d0.example", "Subject: x\n\nbare LF\n"),
        postmanq("app@sender.example", "r3@d0.example", "Subject: x\r\n\r\nNUL \x00\r\n"),
        postmanq("app@sender.example", "r4@d0.example", "Subject: x\r\n\r\n" + "y" * 3000),
    ]
    broker.publish(bad + messages(5, start=100))
    relay = amqp_relay(relay_factory, net, broker, workers=1, intake_limits={"max_message_size": 2048})
    wait_delivered(net, set(range(100, 105)), timeout=30)
    failure = f"{broker.queue}.failure.technical"
    wait_for(lambda: broker.count(failure) == len(bad), 15, "every bad message in failure.technical")
    found = broker.drain(failure)
    codes = sorted(f["error"]["code"] for f in found)
    assert codes == sorted([501, 553, 501, 550, 550, 552]), found
    assert all(f["error"]["message"].startswith(str(f["error"]["code"])) for f in found)
    by_code = {f["error"]["code"]: f for f in found}
    assert by_code[553]["recipient"] == "not an address"  # the original fields are kept
    assert [f["raw"] for f in found if "raw" in f] == ["{not json"]  # not JSON: kept as text
    assert broker.count(broker.queue) == 0  # acked, once the failure was confirmed
    assert sorted(sequence_numbers(net.farm.received)) == list(range(100, 105))
    relay.stop()


def test_sigkill_of_a_worker_while_consuming_loses_nothing(relay_factory, net, broker):
    broker.publish(messages(2000))
    relay = amqp_relay(relay_factory, net, broker, prefetch=16)
    wait_for(lambda: broker.count(broker.queue) <= 1200, 60, "consumption under way")
    left = broker.count(broker.queue)
    victim = relay.worker_pids()[0]
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: victim not in relay.worker_pids() and relay.worker_pids_count() == 2, 30,
             "the worker restarted")
    print(f"messages left in the queue at the kill: {left}")
    assert left > 0  # the kill landed mid-consumption
    wait_delivered(net, set(range(2000)), timeout=120)
    # Redeliveries of what the dead worker had committed are recognised;
    # delivery itself is at-least-once (a 250 whose completion the kill
    # prevented from being committed is sent again), so those are counted.
    assert report_duplicates(net, "SIGKILL of a worker") == 0
    wait_for(lambda: broker.count(broker.queue) == 0, 20, "the queue drained")
    relay.stop()


def test_consumers_resume_after_the_broker_cut_their_connections(relay_factory, net, broker):
    broker.publish(messages(6000))
    relay = amqp_relay(relay_factory, net, broker, prefetch=16)
    wait_for(lambda: broker.count(broker.queue) <= 5000, 60, "consumption under way")
    assert broker.close_relay_connections() == 2  # one per worker
    left = broker.count(broker.queue)
    print(f"messages left in the queue at the cut: {left}")
    assert left > 0  # the cut landed mid-consumption
    wait_delivered(net, set(range(6000)), timeout=120)  # nothing lost
    # Nothing was killed, so every redelivery after the cut should be
    # recognised.  Known race, not fixed yet: a copy redelivered to the other
    # worker while the first try is still looking its key up is stored too
    # (each worker records keys in its own spool; the fix is one key owner
    # per key, through the peer sockets).  Only the messages unacked at the
    # cut can be redelivered: prefetch 16 per worker bounds the copies.
    twice = report_duplicates(net, "connections closed by the broker")
    assert twice <= 2 * 16
    relay.wait_log("reconnected, consuming again", count=2)
    # rabbitmqctl takes a second or two per call: the queue is long enough
    # for the cut to land mid-consumption (checked above).
    # Still consuming after the cut: new messages get through.
    broker.publish(messages(20, start=5000))
    wait_delivered(net, set(range(5000, 5020)), timeout=30)
    wait_for(lambda: broker.count(broker.queue) == 0, 20, "the queue drained")
    relay.stop()


def test_mail_that_cannot_be_stored_is_nacked_never_acked(relay_factory, net, broker):
    broker.publish(messages(20))
    # No room on the spool's disk (as the relay sees it): nothing may be acked.
    relay = amqp_relay(relay_factory, net, broker, workers=2,
                       intake_limits={"min_free_space": "1000000G"})
    relay.wait_log("consuming", count=2)
    wait_for(lambda: stats(relay)["counters"]["amqp_nacked"] >= 20, 20, "nacks")
    counters = stats(relay)["counters"]
    assert counters["amqp_acked"] == 0 and counters["accepted_messages"] == 0
    assert net.farm.received == []
    # The disk has room again (SIGHUP reloads the limit): every one goes through.
    relay.overrides["intake"]["min_free_space"] = 0
    relay.write_config()
    relay.signal(signal.SIGHUP)
    wait_delivered(net, set(range(20)), timeout=30)
    wait_for(lambda: broker.count(broker.queue) == 0, 10, "the queue drained")
    assert report_duplicates(net, "after nacks") == 0
    relay.stop()


def test_quorum_queues_and_the_relay_format(relay_factory, net):
    broker = Broker()
    relay = None
    try:
        broker.declare(queue_type="quorum")
        relay_format = [orjson.dumps({
            "sender": "app@sender.example", "recipients": [f"a{seq}@d0.example", f"b{seq}@d1.example"],
            "body_base64": base64.b64encode(body(seq).encode()).decode(), "message_id": f"m{seq}",
        }) for seq in range(10)]
        broker.publish(relay_format + [relay_format[3], b'{"sender": "a@x.example"}'])
        # One worker: two copies consumed at once by two workers may both be
        # stored (see intake.amqp); redeliveries are what the key is for.
        relay = amqp_relay(relay_factory, net, broker, workers=1, queue_type="quorum",
                           format="relay")
        wait_delivered(net, set(range(10)), timeout=30)
        failure = f"{broker.queue}.failure.technical"
        wait_for(lambda: broker.count(failure) == 1, 15, "the bad one in failure.technical")
        assert broker.drain(failure)[0]["error"]["code"] == 501
        wait_for(lambda: broker.count(broker.queue) == 0, 10, "the queue drained")
        # Each message went to both domains; the one published twice (same
        # message_id) was spooled once.
        time.sleep(1)
        assert sorted(sequence_numbers(net.farm.received)) == sorted(list(range(10)) * 2)
        assert stats(relay)["counters"]["amqp_duplicates"] == 1
        relay.stop()
    finally:
        if relay is not None:
            relay.kill()  # before its queues go: a consuming relay declares them again
        broker.cleanup()
    assert leftovers(broker.prefix) == []


def test_four_kills_of_workers_and_the_supervisor_lose_nothing(relay_factory, net, broker):
    count = 4000
    broker.publish(messages(count))
    relay = amqp_relay(relay_factory, net, broker, prefetch=16)
    remaining = []

    def consumed_down_to(left):
        wait_for(lambda: broker.count(broker.queue) <= left, 60, f"the queue down to {left}")
        remaining.append(broker.count(broker.queue))

    def kill_a_worker(index):
        victim = relay.worker_pids()[index]
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: victim not in relay.worker_pids() and relay.worker_pids_count() == 2,
                 30, "the worker restarted")

    # Every kill lands while the queue still holds messages: mid-consumption.
    consumed_down_to(3400)
    kill_a_worker(0)
    consumed_down_to(2600)
    kill_a_worker(1)
    consumed_down_to(1800)
    relay.kill()  # SIGKILL of the supervisor, and of its workers with it
    relay.start()
    consumed_down_to(1000)
    kill_a_worker(0)
    print(f"messages left in the queue at each kill: {remaining}")
    assert all(left > 0 for left in remaining)
    wait_delivered(net, set(range(count)), timeout=240)
    assert report_duplicates(net, "4 kills (2 workers, supervisor, worker)") == 0
    wait_for(lambda: broker.count(broker.queue) == 0, 20, "the queue drained")
    relay.stop()


def test_smtp_is_served_while_the_broker_is_unreachable(relay_factory, net):
    net.add_domain("d1.example", ["127.0.0.11"])
    dead = f"amqp://guest:guest@127.0.0.1:{free_port()}/"
    relay = deliver_relay(relay_factory, net, workers=2,
                          amqp={"consumer": [{"url": dead, "queue": "unreachable.outbox"}]})
    relay.wait_log("cannot consume", count=2)
    inject(relay, "app@sender.example", ["someone@d1.example"], body(1).encode())
    net.farm.wait_received(1, timeout=15)
    assert stats(relay)["gauges"]["amqp_connected"] == 0
    relay.stop()


def test_declare_false_uses_the_queues_that_exist(relay_factory, net, broker):
    for name in broker.names(broker.queue)[1:]:
        broker.declare(name)  # the failure.* and not.send pairs, made by the operator
    broker.publish(messages(5) + [b"{bad"])
    relay = amqp_relay(relay_factory, net, broker, declare=False)
    wait_delivered(net, set(range(5)), timeout=20)
    wait_for(lambda: broker.count(f"{broker.queue}.failure.technical") == 1, 10, "the bad one")
    wait_for(lambda: stats(relay)["gauges"]["amqp_connected"] == 2, 10, "both workers consuming")
    relay.stop()
    # A queue that does not exist is not created: the consumer waits for it.
    missing = f"{broker.prefix}.missing"
    waiting = deliver_relay(relay_factory, net, workers=1,
                            amqp={"consumer": [{"url": URL, "queue": missing, "declare": False}]})
    waiting.wait_log("cannot consume")
    assert leftovers(missing) == []
    waiting.stop()


def test_the_consumer_class_and_a_bad_class_header(relay_factory, net, broker):
    from support import events

    bad = postmanq("app@sender.example", "r99@d0.example",
                   "X-Relay-Class: urgent\r\n" + body(99))
    broker.publish(messages(3) + [bad])
    relay = amqp_relay(relay_factory, net, broker, workers=1, **{"class": "bulk"})
    wait_delivered(net, {0, 1, 2}, timeout=30)
    failure = f"{broker.queue}.failure.technical"
    wait_for(lambda: broker.count(failure) == 1, 15, "the bad class in failure.technical")
    assert broker.drain(failure)[0]["error"]["code"] == 550
    delivered = wait_for(lambda: len(found := [e for e in events(relay)
                                               if e["outcome"] == "delivered"]) == 3 and found,
                         15, "three delivered events")
    assert {e["lane"] for e in delivered} == {"bulk"}
    assert stats(relay)["counters"]["accepted_bulk"] == 3
