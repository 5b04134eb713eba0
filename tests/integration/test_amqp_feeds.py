"""Feeds end to end: delivery events of the real relay out to the local
RabbitMQ, through the outbox (PostmanQ failure queues, the events exchange)."""

from __future__ import annotations

import collections
import json

import pytest

from amqp_support import URL, postmanq
from relay.testing.fakenet import Behaviour
from support import deliver_relay, free_port, relayctl, wait_for
from support import events as log_events


@pytest.fixture
def relay_factory(broker, relay_factory):
    """The relays of a test stop before its broker fixture deletes the
    queues (set up after ``broker``, torn down before it): a relay still
    consuming would declare them again."""
    return relay_factory


def body(n: int) -> str:
    return f"From: app@sender.example\r\nSubject: n{n}\r\nMessage-ID: <{n}@sender.example>\r\n\r\nHi {n}\r\n"


def stats(relay) -> dict:
    result = relayctl(relay, "stats", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_bounces_reach_failure_recipient_and_every_outcome_the_events_exchange(
        relay_factory, net, broker):
    events = f"{broker.prefix}.events"
    broker.declare_exchange(events, "topic")
    broker.bind_queue(f"{events}.all", events, "#")
    net.add_domain("d0.example", ["127.0.0.10"],
                   behaviour=Behaviour(rules={r"^nobody": "550 5.1.1 No such user"}))
    net.add_domain("d1.example", ["127.0.0.11"])
    [sender_mx] = net.add_domain("sender.example", ["127.0.0.20"])  # gets the DSN
    good = [f"r{n}@d{n % 2}.example" for n in range(6)]
    published = [postmanq("app@sender.example", rcpt, body(n)) for n, rcpt in enumerate(good)]
    bounced_body = body(99)
    published.append(postmanq("app@sender.example", "nobody@d0.example", bounced_body,
                              trySendingCount=1))
    broker.publish(published)
    relay = deliver_relay(relay_factory, net, workers=2, amqp={
        "consumer": [{"url": URL, "queue": broker.queue}],
        "events": {"url": URL, "exchange": events},
    })
    failure_queue = f"{broker.queue}.failure.recipient"
    wait_for(lambda: broker.count(failure_queue) == 1, 30, "the bounce in failure.recipient")
    [failure] = broker.drain(failure_queue)
    assert failure["error"]["code"] == 550 and "5.1.1 No such user" in failure["error"]["message"]
    assert (failure["envelope"], failure["recipient"]) == ("app@sender.example", "nobody@d0.example")
    assert failure["body"] == bounced_body and failure["trySendingCount"] == 1  # the original JSON
    for other in ("technical", "connection", "unknown"):
        assert broker.count(f"{broker.queue}.failure.{other}") == 0
    sender_mx.wait_received(1, timeout=20)  # the DSN, delivered: its event follows
    expected = set(good) | {"nobody@d0.example", "app@sender.example"}
    wait_for(lambda: {e["recipient"] for e in log_events(relay) if e["outcome"] != "deferred"}
             >= expected, 30, "every final outcome logged")
    wait_for(lambda: stats(relay)["gauges"]["feed_lag_events"] == 0, 10, "events feed caught up")
    records = broker.drain(f"{events}.all")
    # One record per event, exactly: the same events as the delivery logs
    # (a recipient may have more than one, e.g. a 4xx attempt first).
    logged = sorted((e["queue_id"], e["recipient"], e["outcome"]) for e in log_events(relay))
    assert sorted((r["id"], r["recipient"], r["outcome"]) for r in records) == logged
    assert len({r["event_id"] for r in records}) == len(records)
    by_recipient = {r["recipient"]: r for r in records if r["outcome"] != "deferred"}
    assert set(by_recipient) == expected
    assert all(by_recipient[r]["type"] == "Delivery" for r in good)
    bounce = by_recipient["nobody@d0.example"]
    assert (bounce["type"], bounce["response"]["code"], bounce["class"]) == ("Bounce", 550, "recipient")
    assert bounce["response"]["enhanced_code"] == {"class": 5, "subject": 1, "detail": 1}
    assert bounce["sender"] == "app@sender.example" and bounce["queue"] == broker.queue
    assert all(by_recipient[r]["sender"] == "app@sender.example" for r in good)
    # The DSN: its message leaves the spool with its delivery, and events
    # do not carry the sender (yet): known only while the message is there.
    assert by_recipient["app@sender.example"]["sender"] in ("", None)
    counters = stats(relay)["counters"]
    assert counters["feed_published"] == len(records) + 1  # the events and the one failure
    relay.stop()


def test_feed_lag_shows_in_stats_while_the_events_broker_is_unreachable(relay_factory, net, broker):
    net.add_domain("d1.example", ["127.0.0.11"])
    broker.publish([postmanq("app@sender.example", f"r{n}@d1.example", body(n)) for n in range(5)])
    dead = f"amqp://guest:guest@127.0.0.1:{free_port()}/"
    relay = deliver_relay(relay_factory, net, workers=1, amqp={
        "consumer": [{"url": URL, "queue": broker.queue}],
        "events": {"url": dead, "exchange": f"{broker.prefix}.events"},
    })
    net.farm.wait_received(5, timeout=20)  # delivery does not wait for the feed
    wait_for(lambda: stats(relay)["gauges"]["feed_lag_events"] == 5, 15, "a lag of 5 events")
    assert stats(relay)["counters"]["feed_errors"] >= 1
    assert "feeds published 0" in relayctl(relay, "stats").stdout
    relay.stop()


def test_feeds_lose_nothing_when_the_broker_cuts_their_connections(relay_factory, net, broker):
    events = f"{broker.prefix}.events"
    broker.declare_exchange(events, "topic")
    broker.bind_queue(f"{events}.delivered", events, "delivered.*")
    net.add_domain("d1.example", ["127.0.0.11"])
    count = 300
    broker.publish([postmanq("app@sender.example", f"r{n}@d1.example", body(n)) for n in range(count)])
    relay = deliver_relay(relay_factory, net, workers=2, amqp={
        "consumer": [{"url": URL, "queue": broker.queue}],
        "events": {"url": URL, "exchange": events},
    })
    wait_for(lambda: broker.count(f"{events}.delivered") >= 30, 30, "events flowing")
    # Both workers' consumers, and the events feed of the worker that owns
    # d1.example (a feed connects when it first has something to publish).
    assert broker.close_relay_connections() == 3
    net.farm.wait_received(count, timeout=60)
    wait_for(lambda: stats(relay)["gauges"]["feed_lag_events"] == 0, 30, "the feed caught up")
    records = broker.drain(f"{events}.delivered")
    recipients = collections.Counter(r["recipient"] for r in records)
    assert set(recipients) == {f"r{n}@d1.example" for n in range(count)}  # none lost
    print(f"events after a cut: {len(records)} records for {len(recipients)} deliveries, "
          f"{sum(n - 1 for n in recipients.values())} published twice (at-least-once)")
    relay.stop()


def test_relayctl_amqp_shows_consumers_and_feeds(relay_factory, net, broker):
    net.add_domain("d1.example", ["127.0.0.11"])
    broker.publish([postmanq("app@sender.example", f"r{n}@d1.example", body(n)) for n in range(4)]
                   + [b"not json"])
    relay = deliver_relay(relay_factory, net, workers=2, amqp={
        "consumer": [{"url": URL, "queue": broker.queue, "prefetch": 7}],
    })
    net.farm.wait_received(4, timeout=20)
    wait_for(lambda: broker.count(f"{broker.queue}.failure.technical") == 1, 15, "the bad one")

    def answer():
        result = relayctl(relay, "amqp", "--json")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    wait_for(lambda: sum(c["acked"] for w in answer()["per_worker"] for c in w["consumers"]) == 5,
             10, "every message acked")
    status = answer()
    assert [w["worker"] for w in status["per_worker"]] == [0, 1]
    consumers = [c for w in status["per_worker"] for c in w["consumers"]]
    assert all(c["queue"] == broker.queue and c["connected"] and c["prefetch"] == 7
               and c["unacked"] == 0 and "guest:***@" in c["url"] for c in consumers)
    assert sum(c["failed"] for c in consumers) == 1 and sum(c["consumed"] for c in consumers) == 5
    feeds = [f for w in status["per_worker"] for f in w["feeds"]]
    assert [f["feed"] for f in feeds] == ["amqp.failures"] * 2
    assert all(f["lag"] == 0 and f["last_error"] is None for f in feeds)
    text = relayctl(relay, "amqp").stdout
    assert broker.queue[:31] in text and "amqp.failures" in text
    relay.stop()


def test_relayctl_amqp_move_moves_matching_messages_with_confirms(relay_factory, broker):
    failures = f"{broker.queue}.failure.recipient"
    broker.declare(failures)
    broker.publish([postmanq("a@x.example", f"r{n}@d.example", body(n),
                             error={"code": code, "message": f"{code} no"})
                    for n, code in enumerate([550, 554, 550])], exchange=failures)
    relay = relay_factory(workers=1, amqp={"consumer": [{"url": URL, "queue": broker.queue}]})

    def move(*args):
        result = relayctl(relay, "amqp", "move", "--from", failures, "--to", broker.queue,
                          "--json", *args)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    assert move("--code", "550", "--dry-run") == {"moved": 0, "matched": 2, "seen": 3}
    assert broker.count(failures) == 3 and broker.count(broker.queue) == 0
    assert move("--code", "550") == {"moved": 2, "matched": 2, "seen": 3}
    wait_for(lambda: broker.count(failures) == 1, 5, "the one left behind")
    moved = broker.drain(broker.queue)
    assert sorted(m["recipient"] for m in moved) == ["r0@d.example", "r2@d.example"]
    assert broker.drain(failures)[0]["error"]["code"] == 554
    missing = relayctl(relay, "amqp", "move", "--from", failures, "--to", f"{broker.prefix}.nope")
    assert missing.returncode == 1 and "amqp move failed" in missing.stderr
