"""AMQP feeds: delivery events out to RabbitMQ, confirmed, through the outbox.

Input: this worker's committed events (feeds.outbox), and for mail that
came over AMQP its origin (spool.seen: queue, original fields).  Output:

* ``failures``: each bounced recipient of AMQP-originated mail published to
  PostmanQ's ``<exchange>.failure.<class>`` (exchange of the consumer the
  mail came from), carrying the original JSON with its body and ``error
  {message, code}``, so pmq-report / pmq-publish keep working;
* ``events`` (when ``[amqp.events] url`` is set): one record per event to
  the topic exchange ``[amqp.events] exchange``, routing key
  ``<outcome>.<class>`` (``none`` for no class), with KumoMTA's log-record
  field names where they fit.  ``sender`` and ``size`` come from the
  message while it is still in the spool (a delivered message leaves it in
  the transaction that writes its event): for AMQP mail the sender is taken
  from the original fields, for SMTP mail already gone they are null.

Each publish is persistent, mandatory and confirmed; a batch's cursor moves
only after every publish of the batch was confirmed.  While the broker is
away the feed retries with backoff and its lag grows (gauges
``feed_lag_*``); delivery never waits for a feed.
"""

from __future__ import annotations

import asyncio
import datetime
import logging

import aio_pika
import aiormq
import orjson

from relay.errors import RelayError
from relay.feeds.outbox import Outbox
from relay.intake import amqp_message
from relay.intake.amqp import failure_name

log = logging.getLogger("relay.feeds")

BATCH = 200  # events per batch
POLL = 0.25  # seconds between looks at the outbox when it is empty
BACKOFF = (0.5, 30.0)  # after a failure: first and largest delay
FAILURE_CLASSES = ("recipient", "technical", "connection", "unknown")

# Outcome -> KumoMTA log record type.
TYPES = {"delivered": "Delivery", "bounced": "Bounce", "deferred": "TransientFailure",
         "requeued": "TransientFailure", "dropped": "AdminBounce"}

_PUBLISH_ERRORS = (aiormq.exceptions.AMQPError, aio_pika.exceptions.DeliveryError,
                   aio_pika.exceptions.AMQPException, ConnectionError, OSError, RuntimeError,
                   asyncio.TimeoutError)


def record(event: dict, worker: int, campaign: str | None = None, queue: str | None = None) -> dict:
    """A KumoMTA-like log record of one spool event."""
    outcome = event["outcome"]
    kind = TYPES.get(outcome, "TransientFailure")
    if outcome == "bounced" and 0 < event["code"] < 500:
        kind = "Expiration"  # a temporary failure past deliver.max_lifetime
    enhanced = None
    if event["enhanced"]:
        parts = event["enhanced"].split(".")
        if len(parts) == 3 and all(p.isdigit() for p in parts):
            enhanced = dict(zip(("class", "subject", "detail"), map(int, parts)))
    when = event["time"]
    return {
        "type": kind,
        "id": event["queue_id"],
        "event_id": f"{worker}-{event['id']}",
        "sender": event["sender"],
        "recipient": event["recipient"],
        "queue": queue,
        "site": event["destination"] or "",
        "size": event["size"],
        "response": {"code": event["code"], "enhanced_code": enhanced,
                     "content": event["text"]},
        "peer_address": {"name": event["mx"], "addr": None},
        "timestamp": int(when),
        "event_time": datetime.datetime.fromtimestamp(when, datetime.timezone.utc).isoformat(),
        "num_attempts": event["attempts"],
        "outcome": outcome,
        "class": event["class"],
        "campaign": campaign,
        "source_ip": event["source_ip"],
        "tls": bool(event["tls"]),
        "latency": event["latency"],
    }


async def describe(event: dict, worker: int, seen) -> dict:
    """The record of an event, with what the AMQP intake knew of its message."""
    origin = await seen.origin(event["queue_id"])
    campaign = queue = None
    if origin is not None:
        queue = origin[0]
        fields = orjson.loads(origin[1])["fields"]
        campaign = fields.get("campaign")
        if event["sender"] is None:  # the message left the spool with its delivery
            event = {**event, "sender": fields.get("envelope", fields.get("sender"))}
    return record(event, worker, campaign, queue)


def routing_key(event: dict) -> str:
    return f"{event['outcome']}.{event['class'] or 'none'}"


def error_of(event: dict) -> dict:
    """PostmanQ's MailError of a bounce: the reply, and its code."""
    text = " ".join(str(p) for p in (event["code"], event["enhanced"], event["text"]) if p)
    return {"message": text, "code": event["code"]}


class _Link:
    """A robust connection and a confirming channel to one broker."""

    def __init__(self, url: str, name: str) -> None:
        self.url = url
        self.name = name
        self.connection = None
        self.channel = None
        self.exchanges: dict[str, object] = {}

    async def ready(self):
        if self.channel is None or self.channel.is_closed:
            if self.connection is None:
                self.connection = await aio_pika.connect_robust(
                    self.url, reconnect_interval=2.0,
                    client_properties={"connection_name": self.name})
            self.channel = await self.connection.channel(publisher_confirms=True,
                                                         on_return_raises=True)
            self.exchanges.clear()
        return self.channel

    async def exchange(self, name: str, declare_topic: bool = False):
        channel = await self.ready()
        if name not in self.exchanges:
            if declare_topic:
                self.exchanges[name] = await channel.declare_exchange(
                    name, aio_pika.ExchangeType.TOPIC, durable=True)
            else:  # declared by the consumer (or by the operator: declare = false)
                self.exchanges[name] = await channel.get_exchange(name, ensure=False)
        return self.exchanges[name]

    async def publish(self, exchange, body: bytes, key: str) -> None:
        await exchange.publish(
            aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                             content_type="application/json"),
            routing_key=key, timeout=30)

    async def close(self) -> None:
        connection, self.connection, self.channel = self.connection, None, None
        if connection is not None:
            try:
                await connection.close()
            except Exception:  # a connection already gone: nothing to keep
                pass


class Feed:
    """One feed of one worker: an outbox and what publishes a batch."""

    gauge = ""

    def __init__(self, spool, worker: int, counters, name: str) -> None:
        self.spool = spool
        self.worker = worker
        self.counters = counters
        self.outbox = Outbox(spool, name)
        self.last_error: str | None = None
        self.published = 0

    def status(self) -> dict:
        """For ``relayctl amqp``."""
        return {"feed": self.outbox.name, "cursor": self.outbox.cursor, "lag": self.outbox.lag,
                "published": self.published, "last_error": self.last_error}

    async def run(self) -> None:
        await self.outbox.open()
        delay = BACKOFF[0]
        while True:
            try:
                batch = await self.outbox.next_batch(BATCH)
            except RelayError as exc:
                log.warning("feed %s: cannot read the outbox: %s", self.outbox.name, exc)
                await asyncio.sleep(delay)
                continue
            if not batch:
                await asyncio.sleep(POLL)
                continue
            wait = self.wait_for_more(batch)
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            try:
                published = await self.publish(batch)
                await self.outbox.advance(batch[-1]["id"])
            except (*_PUBLISH_ERRORS, RelayError) as exc:
                self.counters["feed_errors"] += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("feed %s: publish failed (%s); retrying in %.1fs",
                            self.outbox.name, self.last_error, delay)
                await self.reset()
                await asyncio.sleep(delay)
                delay = min(delay * 2, BACKOFF[1])
                continue
            delay = BACKOFF[0]
            self.last_error = None
            self.counters["feed_published"] += published
            self.published += published

    def wait_for_more(self, batch: list[dict]) -> float:
        """Seconds to let a partial batch wait for more events (0: send now)."""
        return 0.0

    async def publish(self, batch: list[dict]) -> int:
        raise NotImplementedError

    async def reset(self) -> None:
        pass

    async def close(self) -> None:
        pass


class EventsFeed(Feed):
    """Every event to the ``[amqp.events]`` topic exchange."""

    gauge = "feed_lag_events"

    def __init__(self, spool, worker, counters, settings, seen) -> None:
        super().__init__(spool, worker, counters, "amqp.events")
        self.settings = settings  # [amqp.events]
        self.seen = seen
        self.link = _Link(settings.url, f"relay worker {worker} events {settings.exchange}")

    async def publish(self, batch: list[dict]) -> int:
        exchange = await self.link.exchange(self.settings.exchange, declare_topic=True)
        pending = []
        for event in batch:
            body = orjson.dumps(await describe(event, self.worker, self.seen))
            pending.append(self.link.publish(exchange, body, routing_key(event)))
        await asyncio.gather(*pending)
        return len(pending)

    async def reset(self) -> None:
        await self.link.close()

    async def close(self) -> None:
        await self.link.close()


class FailureFeed(Feed):
    """Bounced recipients of AMQP mail to PostmanQ's failure queues."""

    gauge = "feed_lag_failures"

    def __init__(self, spool, worker, counters, consumers, seen) -> None:
        super().__init__(spool, worker, counters, "amqp.failures")
        self.consumers = {c.queue: c for c in consumers}
        self.seen = seen
        self.links: dict[str, _Link] = {}

    def _link(self, url: str) -> _Link:
        if url not in self.links:
            self.links[url] = _Link(url, f"relay worker {self.worker} failures "
                                         f"{','.join(sorted(self.consumers))}")
        return self.links[url]

    async def publish(self, batch: list[dict]) -> int:
        pending = []
        for event in batch:
            if event["outcome"] != "bounced":
                continue
            origin = await self.seen.origin(event["queue_id"])
            if origin is None:
                continue  # not AMQP mail (or its record was pruned)
            queue, stored = origin
            consumer = self.consumers.get(queue)
            if consumer is None:
                log.info("%s: bounced, but queue %s is no longer consumed: no failure published",
                         event["queue_id"], queue)
                continue
            failure_class = event["class"] if event["class"] in FAILURE_CLASSES else "unknown"
            link = self._link(consumer.url)
            exchange = await link.exchange(failure_name(consumer.exchange or consumer.queue,
                                                        failure_class))
            body = await self.spool.body(event["queue_id"])
            if body is None:
                log.warning("%s: body gone before its failure was published; sent without it",
                            event["queue_id"])
            payload = amqp_message.bounced(stored, body, event["recipient"], error_of(event))
            pending.append(link.publish(exchange, payload, ""))
        await asyncio.gather(*pending)
        return len(pending)

    async def reset(self) -> None:
        for link in self.links.values():
            await link.close()

    async def close(self) -> None:
        await self.reset()


class Feeds:
    """The feeds of one worker."""

    def __init__(self, settings, worker: int, spool, seen, counters) -> None:
        from relay.feeds.webhook import WebhookFeed

        self.feeds: list[Feed] = [WebhookFeed(spool, worker, counters, hook, seen)
                                  for hook in settings.webhooks]
        amqp = settings.amqp
        if amqp.consumers:
            self.feeds.append(FailureFeed(spool, worker, counters, amqp.consumers, seen))
        if amqp.events.url:
            self.feeds.append(EventsFeed(spool, worker, counters, amqp.events, seen))
        self._tasks: list[asyncio.Task] = []

    def start(self) -> None:
        for feed in self.feeds:
            self._tasks.append(asyncio.create_task(feed.run(), name=f"feed-{feed.outbox.name}"))

    def status(self) -> list[dict]:
        return [feed.status() for feed in self.feeds]

    def gauges(self) -> dict[str, float]:
        gauges: dict[str, float] = {}
        for feed in self.feeds:
            gauges[feed.gauge] = gauges.get(feed.gauge, 0) + feed.outbox.lag
        return gauges

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for feed in self.feeds:
            await feed.close()
