"""feeds: KumoMTA-like records, PostmanQ failure records, the outbox cursor."""

from __future__ import annotations

import asyncio
import base64

import orjson

from relay.feeds.amqp import error_of, record, routing_key
from relay.feeds.outbox import Outbox
from relay.intake import amqp_message

EVENT = {"id": 7, "time": 1795380441.5, "queue_id": "Q1", "recipient": "a@d.example",
         "destination": "mx1.d.example", "mx": "mx1.d.example", "source_ip": "192.0.2.1",
         "tls": 1, "code": 550, "enhanced": "5.1.1", "text": "No such user",
         "outcome": "bounced", "class": "recipient", "latency": 0.01, "sender": "s@x.example",
         "size": 120, "attempts": 1}


def test_a_bounce_record_uses_kumomta_names():
    r = record(EVENT, worker=1, campaign="c", queue="outbox")
    assert (r["type"], r["id"], r["event_id"], r["recipient"]) == ("Bounce", "Q1", "1-7", "a@d.example")
    assert r["response"] == {"code": 550, "enhanced_code": {"class": 5, "subject": 1, "detail": 1},
                             "content": "No such user"}
    assert r["event_time"].startswith("2026-") and r["timestamp"] == 1795380441
    assert (r["tls"], r["campaign"], r["queue"], r["num_attempts"]) == (True, "c", "outbox", 1)
    assert routing_key(EVENT) == "bounced.recipient"
    assert error_of(EVENT) == {"message": "550 5.1.1 No such user", "code": 550}


def test_types_by_outcome():
    assert record({**EVENT, "outcome": "delivered", "class": None, "code": 250}, 0)["type"] == "Delivery"
    assert record({**EVENT, "outcome": "deferred", "code": 451}, 0)["type"] == "TransientFailure"
    assert record({**EVENT, "code": 451}, 0)["type"] == "Expiration"  # bounced on a 4xx: too old
    assert routing_key({**EVENT, "outcome": "delivered", "class": None}) == "delivered.none"


def test_failure_record_restores_the_original_body():
    limits = amqp_message.Limits(10_000, 3, False, 5)
    payload = orjson.dumps({"envelope": "s@x.example", "recipient": "a@d.example",
                            "body": "Subject: x\r\n\r\nhi\r\n", "bindingType": 0})
    message = amqp_message.parse(payload, "postmanq", limits)
    spooled = b"Received: x\r\nDKIM-Signature: y\r\n" + message.body
    error = {"message": "550 5.1.1 No", "code": 550}
    out = orjson.loads(amqp_message.bounced(message.origin(), spooled, "a@d.example", error))
    assert out == {**orjson.loads(payload), "error": error}


def test_failure_record_of_the_relay_format_names_the_failed_recipient():
    limits = amqp_message.Limits(10_000, 3, False, 5)
    raw = b"Subject: x\r\n\r\nhi\r\n"
    payload = orjson.dumps({"sender": "s@x.example", "recipients": ["a@d.example", "b@d.example"],
                            "body_base64": base64.b64encode(raw).decode()})
    message = amqp_message.parse(payload, "relay", limits)
    out = orjson.loads(amqp_message.bounced(message.origin(), b"Received: x\r\n" + message.body,
                                            "b@d.example", {"message": "550", "code": 550}))
    assert out["recipients"] == ["b@d.example"] and base64.b64decode(out["body_base64"]) == raw


class FakeSpool:
    def __init__(self, ids):
        self.ids, self.meta = ids, {}

    async def get_meta(self, key):
        return self.meta.get(key)

    async def set_meta(self, key, value):
        self.meta[key] = value

    async def last_event_id(self):
        return max(self.ids, default=0)

    async def events_after(self, cursor, limit):
        return [{"id": i} for i in sorted(self.ids) if i > cursor][:limit]


def test_the_outbox_cursor_persists_and_lag_counts_what_is_left():
    async def go():
        spool = FakeSpool(range(1, 11))
        outbox = Outbox(spool, "f")
        await outbox.open()
        batch = await outbox.next_batch(4)
        assert [e["id"] for e in batch] == [1, 2, 3, 4] and outbox.lag == 10
        assert [e["id"] for e in await outbox.next_batch(4)] == [1, 2, 3, 4]  # not advanced
        await outbox.advance(4)
        assert outbox.lag == 6 and spool.meta["feed.f.cursor"] == "4"
        again = Outbox(spool, "f")  # a restarted worker
        await again.open()
        assert [e["id"] for e in await again.next_batch(100)][0] == 5
        spool.ids = [1, 2]  # everything pruned, ids started again
        assert [e["id"] for e in await again.next_batch(100)] == [1, 2]

    asyncio.run(go())
