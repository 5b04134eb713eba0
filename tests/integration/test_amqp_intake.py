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
from relay.testing.fakenet import Behaviour
from support import deliver_relay, free_port, inject, relayctl, wait_for

DOMAINS = [f"d{i}.example" for i in range(6)]


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


def test_copies_published_together_are_stored_once_by_two_workers(relay_factory, net, broker):
    # Each message published twice in a row, with its message_id (what makes
    # two publications one message): the broker hands the two copies to the
    # two workers' consumers at about the same time.
    def relay_format(seq):
        return orjson.dumps({"sender": "app@sender.example",
                             "recipients": [f"r{seq}@{DOMAINS[seq % len(DOMAINS)]}"],
                             "body": body(seq), "message_id": f"m{seq}"})

    broker.publish([relay_format(seq) for seq in range(300) for _ in range(2)])
    relay = amqp_relay(relay_factory, net, broker, workers=2, prefetch=16, format="relay")
    wait_delivered(net, set(range(300)), timeout=90)
    # A copy nacked while its twin was being spooled comes back ~1 s later.
    wait_for(lambda: stats(relay)["counters"]["amqp_acked"] == 600, 30, "every copy acked")
    counters = stats(relay)["counters"]
    print(f"copies taken while their twin was being spooled: {counters['amqp_nacked']}")
    assert counters["accepted_messages"] == 300 and counters["amqp_duplicates"] == 300
    time.sleep(1)  # a second copy stored would be delivered by now
    assert report_duplicates(net, "every message published twice") == 0
    assert max(collections.Counter(sequence_numbers(net.farm.received)).values()) == 1
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
    broker.publish(messages(1000))
    relay = amqp_relay(relay_factory, net, broker, prefetch=16)
    wait_for(lambda: broker.count(broker.queue) <= 600, 60, "consumption under way")
    left = broker.count(broker.queue)
    victim = relay.worker_pids()[0]
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: victim not in relay.worker_pids() and relay.worker_pids_count() == 2, 30,
             "the worker restarted")
    print(f"messages left in the queue at the kill: {left}")
    assert left > 0  # the kill landed mid-consumption
    wait_delivered(net, set(range(1000)), timeout=120)
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
    # Nothing was killed: every redelivery after the cut is recognised by
    # its key, even one that reached the other worker while the first try
    # was still under way (the key's owner records one try only).
    assert report_duplicates(net, "connections closed by the broker") == 0
    relay.wait_log("reconnected, consuming again", count=2)
    # rabbitmqctl takes a second or two per call: the queue is long enough
    # for the cut to land mid-consumption (checked above).
    # Still consuming after the cut: new messages get through.
    broker.publish(messages(20, start=5000))
    wait_delivered(net, set(range(5000, 5020)), timeout=30)
    wait_for(lambda: broker.count(broker.queue) == 0, 20, "the queue drained")
    relay.stop()


def test_a_broker_restart_mid_run_loses_nothing_and_consumers_and_feeds_resume(
        relay_factory, net, broker):
    """``rabbitmqctl stop_app`` / ``start_app`` while both workers consume
    and both feeds publish.  This stops the broker of the whole machine:
    kept to a few seconds."""
    count = 6000
    events = f"{broker.prefix}.events"
    broker.declare_exchange(events, "topic")
    broker.bind_queue(f"{events}.all", events, "#")  # durable, like every queue here
    net.add_domain(DOMAINS[0], ["127.0.0.10"],
                   behaviour=Behaviour(rules={r"^nobody": "550 5.1.1 No such user"}))
    for index, domain in enumerate(DOMAINS[1:], start=1):
        net.add_domain(domain, [f"127.0.0.{10 + index}"])

    def bounced(n: int) -> bytes:
        return postmanq("app@sender.example", f"nobody{n}@{DOMAINS[0]}", body(90000 + n))

    broker.publish([bounced(0)] + messages(count))
    relay = deliver_relay(relay_factory, net, workers=2, intake={"min_free_space": 0}, amqp={
        "consumer": [{"url": URL, "queue": broker.queue, "prefetch": 16}],
        "events": {"url": URL, "exchange": events},
    })
    failures = f"{broker.queue}.failure.recipient"
    # Both feeds are connected (a feed connects when it first has something
    # to publish) and consumption is under way.
    wait_for(lambda: broker.count(failures) == 1, 30, "the first bounce in failure.recipient")
    wait_for(lambda: broker.count(f"{events}.all") >= 30, 30, "events flowing")
    wait_for(lambda: broker.count(broker.queue) <= count - 1000, 60, "consumption under way")
    before = stats(relay)["counters"]
    down = broker.restart(down_for=2.0)
    left = broker.count(broker.queue)
    print(f"broker not serving for {down:.1f}s; messages in the queue after the restart: {left}")
    assert left > 0  # the restart landed mid-consumption: consumers must come back for these
    assert down < 30
    # Consumers come back within a bounded wait (robust connection, every 2 s).
    relay.wait_log("reconnected, consuming again", count=2, timeout=60)
    wait_for(lambda: stats(relay)["gauges"]["amqp_connected"] == 2, 30, "both consumers back")
    wait_delivered(net, set(range(count)), timeout=180)  # nothing lost
    # Nothing was killed: every redelivery is recognised by its key.
    assert report_duplicates(net, "broker stopped and started") == 0
    counters = stats(relay)["counters"]
    print(f"consumed {counters['amqp_consumed'] - before['amqp_consumed']} after the stop, "
          f"{counters['amqp_duplicates']} redeliveries acked as already spooled")
    wait_for(lambda: broker.count(broker.queue) == 0, 30, "the queue drained")
    # The failure feed resumes: a bounce after the restart is published.
    broker.publish([bounced(1)])
    wait_for(lambda: broker.count(failures) == 2, 60, "the second bounce in failure.recipient")
    assert sorted(f["recipient"] for f in broker.drain(failures)) == [
        f"nobody0@{DOMAINS[0]}", f"nobody1@{DOMAINS[0]}"]
    # The events feed resumes and loses nothing (at-least-once: a publish
    # confirmed but cut before its cursor moved goes out again).
    wait_for(lambda: stats(relay)["gauges"]["feed_lag_events"] == 0, 60, "the events feed caught up")
    records = [r for r in broker.drain(f"{events}.all") if r["outcome"] == "delivered"]
    recipients = collections.Counter(r["recipient"] for r in records)
    expected = {f"r{seq}@{DOMAINS[seq % len(DOMAINS)]}" for seq in range(count)}
    assert set(recipients) >= expected  # none lost
    print(f"events feed across the restart: {len(records)} records for {len(recipients)} "
          f"deliveries, {sum(n - 1 for n in recipients.values())} published twice")
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
        # Two workers: the two copies of message 3 may be taken at once, one
        # by each; the key's owner lets one of them only be stored.
        relay = amqp_relay(relay_factory, net, broker, workers=2, queue_type="quorum",
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
    count = 2000  # the figure: 2,000 messages, four kills while they are consumed
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
    consumed_down_to(1700)
    kill_a_worker(0)
    consumed_down_to(1300)
    kill_a_worker(1)
    consumed_down_to(900)
    relay.kill()  # SIGKILL of the supervisor, and of its workers with it
    relay.start()
    consumed_down_to(500)
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
    # A worker publishes its counters every 250 ms: the deliveries can be
    # seen before the publication that counts their acceptance.
    wait_for(lambda: stats(relay)["counters"]["accepted_bulk"] == 3, 5, "three accepted as bulk")
