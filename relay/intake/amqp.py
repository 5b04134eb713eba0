"""AMQP intake: consume ``[[amqp.consumer]]`` queues into the acceptance path.

Input: messages from RabbitMQ queues in PostmanQ's format (or the relay's
extended one; intake.amqp_message parses and checks them).  Output: each
message handed to the worker's ``accept`` (DKIM, routing to the owners,
group commit) exactly as an SMTP transaction is, then acked; bad input
published to ``<queue>.failure.technical`` and acked.

Theory of operation.  Every worker consumes every configured queue, with
``prefetch`` unacked messages at most (basic.qos), each handled in its own
task (aiormq runs a consumer callback per delivery), so many messages share
one group commit.  A message is acked only after the step that makes it
safe has completed:

* accepted: its key claimed at the key's owner (recorded on disk there),
  then every part on disk in its owner's spool, then ack;
* bad input (not JSON, a field missing, a bad address, a body the DATA
  rules refuse, too large): published persistent to the exchange
  ``<exchange>.failure.technical`` with publisher confirms (and mandatory:
  a failure nobody would receive is an error), with the original fields and
  PostmanQ's ``error {message, code}``; ack once the broker confirmed;
* anything else (spool failure, owner down, low disk, the failure publish
  refused): wait ``NACK_DELAY``, then nack with requeue.  Never an ack.

A redelivery (the connection broke between our commit and our ack, or a
worker died), or a second copy of one message published twice, is
recognised by the message's key.  Before storing, a try claims the key at
its owner worker (route.forward ``claim_key``; spool.seen), where check and
record are one atomic step, so of two copies taken at once by any two
workers one only goes ahead.  The other is told: committed already -> ack
without storing it again; a try still under way in a live worker -> nack,
see it again shortly; held by a worker that died before committing -> the
key is taken over and the copy stored.  Within a worker a set of keys being
taken spares a copy the round trip.

The connection is relay.broker's: aio-pika's robust connection, which
after a loss reconnects and restores channel, qos, declarations and
consumers; the first connection is retried with exponential backoff.  SMTP
intake is unaffected meanwhile.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import re
import time

import aio_pika
import aiormq
from aio_pika.abc import AbstractIncomingMessage

from relay.broker import SETTLE_ERRORS, BrokerLink, stop_consuming
from relay.errors import RelayError
from relay.intake import amqp_message, lane
from relay.intake.handler import IntakeState, wants_trace
from relay.intake.received import date_of_second
from relay.model import Transaction

log = logging.getLogger("relay.amqp")

# What spool.seen.IntakeIndex.claim says of a key held by another try
# (intake may not import spool).
COMMITTED = "committed"

NACK_DELAY = 1.0  # seconds before a message we could not store goes back to the queue
# A try that failed gives its key back; when the key's owner cannot be
# reached (it died, and the supervisor restarts it) this is tried again
# every FORGET_RETRY seconds for up to FORGET_FOR (spool.seen's
# IN_FLIGHT_LIMIT: after that the record counts as abandoned anyway).
FORGET_RETRY = 0.5
FORGET_FOR = 60.0
FAILURE_CLASSES = ("recipient", "technical", "connection", "unknown")

_UNSAFE = re.compile(r"[^\x21-\x7e]")


def _without_password(url: str) -> str:
    return re.sub(r"(://[^:/@]*):[^@]*@", r"\1:***@", url)


def failure_name(name: str, failure_class: str) -> str:
    """PostmanQ's failure exchange / queue for a main exchange / queue."""
    return f"{name}.failure.{failure_class}"


def not_send_name(name: str) -> str:
    return f"{name}.not.send"


def received_line(queue: str, hostname: str, queue_id: str, when: float) -> bytes:
    """``Received: from amqp queue Q by HOST (relay) with AMQP id QID; date``."""
    date = date_of_second(int(when))
    return (f"Received: from amqp queue {_UNSAFE.sub('?', queue)[:200]}\r\n"
            f"\tby {hostname} (relay) with AMQP id {queue_id};\r\n\t{date}\r\n").encode(
                "ascii", "replace")


async def declare_topology(channel, consumer) -> tuple:
    """The main exchange and queue and their failure.* / not.send twins,
    durable, as PostmanQ declares them (consumer/binding.go); or, with
    ``declare = false``, the ones that exist (passive).  Returns (queue,
    failure exchanges by class)."""
    exchange_name = consumer.exchange or consumer.queue
    kind = aio_pika.ExchangeType(consumer.exchange_type)
    arguments = {"x-queue-type": consumer.queue_type}
    failures = {}
    if not consumer.declare:
        queue = await channel.get_queue(consumer.queue, ensure=True)
        for name in FAILURE_CLASSES:
            failures[name] = await channel.get_exchange(failure_name(exchange_name, name),
                                                        ensure=True)
        return queue, failures
    exchange = await channel.declare_exchange(exchange_name, kind, durable=True)
    queue = await channel.declare_queue(consumer.queue, durable=True, arguments=arguments)
    await queue.bind(exchange, routing_key=consumer.routing_key)
    for name in FAILURE_CLASSES:
        failures[name] = await _declare_pair(
            channel, failure_name(exchange_name, name), failure_name(consumer.queue, name),
            kind, arguments)
    await _declare_pair(channel, not_send_name(exchange_name), not_send_name(consumer.queue),
                        kind, arguments)
    return queue, failures


async def _declare_pair(channel, exchange_name, queue_name, kind, arguments):
    exchange = await channel.declare_exchange(exchange_name, kind, durable=True)
    queue = await channel.declare_queue(queue_name, durable=True, arguments=arguments)
    await queue.bind(exchange, routing_key="")
    return exchange


class Consumer:
    """One ``[[amqp.consumer]]`` table, in one worker."""

    def __init__(self, settings, state: IntakeState, claim, forget,
                 taking: set[str] | None = None) -> None:
        self.settings = settings  # the AmqpConsumer table
        # Keys this worker is taking now (shared by its consumers): a second
        # copy waits, so two copies never pass the check below at once.
        self.taking = taking if taking is not None else set()
        self.state = state
        # async (key, queue_id, queue, origin) -> None (this try holds the key)
        # or (COMMITTED | IN_FLIGHT, queue id) of the try that does  (Router.claim_key)
        self.claim = claim
        self.forget = forget  # async (key, queue_id)  (Router.forget_key)
        self.link: BrokerLink | None = None
        self.in_flight = 0
        self._consumer_tag = None
        self._queue = None
        self._failures: dict = {}
        self.counts: collections.Counter[str] = collections.Counter()  # this consumer's own
        self._settling: set[asyncio.Task] = set()
        self._forgetting: set[asyncio.Task] = set()  # keys given back in the background

    def count(self, name: str) -> None:
        """One more ``amqp_<name>``: in the worker's stats and this consumer's status."""
        self.state.counters[f"amqp_{name}"] += 1
        self.counts[name] += 1

    def status(self) -> dict:
        """For ``relayctl amqp``."""
        return {
            "queue": self.settings.queue,
            "url": _without_password(self.settings.url),
            "format": self.settings.format,
            "connected": self.connected,
            "prefetch": self.settings.prefetch,
            "unacked": self.in_flight,
            **{name: self.counts[name]
               for name in ("consumed", "acked", "nacked", "failed", "duplicates")},
        }

    async def run(self) -> None:
        """Connect (with backoff until the broker answers), declare, consume."""
        self.link = BrokerLink(self.settings.url,
                               f"relay worker {self.state.worker} {self.settings.queue}",
                               f"amqp {self.settings.queue}", cannot="cannot consume",
                               restored="reconnected, consuming again")
        if await self.link.open(self._consume):
            log.info("amqp: worker %d consuming %s (prefetch %d)", self.state.worker,
                     self.settings.queue, self.settings.prefetch)

    async def _consume(self, connection) -> None:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        await channel.set_qos(prefetch_count=self.settings.prefetch)
        self._queue, self._failures = await declare_topology(channel, self.settings)
        self._consumer_tag = await self._queue.consume(self._on_message)

    @property
    def connected(self) -> bool:
        return self.link is not None and self.link.connected

    async def stop(self, timeout: float) -> None:
        """Drain: take no more messages, let those in hand finish, close.
        Whatever is not acked by then goes back to the queue."""
        if self.link is not None:
            self.link.closing = True  # a first connection still being tried gives up
        await stop_consuming(self._queue, self._consumer_tag, lambda: self.in_flight, timeout)
        for task in list(self._forgetting):
            task.cancel()  # the records left count as abandoned after IN_FLIGHT_LIMIT
        if self.link is not None:
            await self.link.close()

    # -- one message ---------------------------------------------------------

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        """aiormq's callback: it cancels its callbacks when the channel closes,
        but a message half handed to the owners must finish (committed, or
        withdrawn with its record): the work runs in a task of its own."""
        task = asyncio.ensure_future(self._settle(message))
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)
        await asyncio.shield(task)

    async def _settle(self, message: AbstractIncomingMessage) -> None:
        self.count("consumed")
        self.in_flight += 1
        try:
            if await self._handle(message):
                await message.ack()
                self.count("acked")
            else:
                await asyncio.sleep(NACK_DELAY)
                await message.nack(requeue=True)
                self.count("nacked")
        except SETTLE_ERRORS as exc:
            # The channel went away before the ack: the broker redelivers the
            # message and its key says whether it is already spooled.
            log.info("amqp %s: could not settle a message: %s", self.settings.queue, exc)
        finally:
            self.in_flight -= 1

    async def _handle(self, message: AbstractIncomingMessage) -> bool:
        """True: ack.  False: nack with requeue after a delay."""
        state, consumer = self.state, self.settings
        intake = state.intake
        limits = amqp_message.Limits(
            max_message_size=intake.max_message_size,
            max_recipients=intake.max_recipients,
            normalize=intake.bare_line_endings == "normalize",
            max_received_headers=intake.max_received_headers,
        )
        try:
            parsed = amqp_message.parse(message.body, consumer.format, limits, message.message_id)
        except amqp_message.BadMessage as bad:
            return await self._technical_failure(message, bad)
        try:
            labels = lane.choose(parsed.body, listener=consumer.class_,
                                 declared={"class": parsed.lane, "campaign": parsed.campaign})
        except lane.BadLabel as exc:
            return await self._technical_failure(message, amqp_message.BadMessage(exc.reply,
                                                                                  parsed.fields))
        if parsed.key in self.taking:  # this worker is taking another copy right now
            log.info("amqp %s: %s is being spooled here; nacked until it is",
                     consumer.queue, parsed.key)
            return False
        self.taking.add(parsed.key)
        try:
            return await self._take(parsed, labels)
        finally:
            self.taking.discard(parsed.key)

    async def _take(self, parsed: amqp_message.Message, labels: lane.Labels) -> bool:
        state, consumer = self.state, self.settings
        if state.draining or state.low_disk():
            if state.low_disk():
                state.counters["rejected_low_disk"] += 1
            return False
        queue_id = state.queue_ids.next()
        try:
            holder = await self.claim(parsed.key, queue_id, consumer.queue, parsed.origin())
        except RelayError as exc:
            state.counters["rejected_spool"] += 1
            log.warning("%s: not accepted from amqp %s: cannot record its key: %s", queue_id,
                        consumer.queue, exc)
            # The owner may have recorded the claim before it failed to answer
            # (it died): until that record goes, every copy would wait for it.
            self._forget_later(parsed.key, queue_id)
            return False
        if holder is not None and holder[0] == COMMITTED:
            self.count("duplicates")
            log.info("amqp %s: %s already spooled as %s; acked", consumer.queue, parsed.key,
                     holder[1])
            return True
        if holder is not None:  # another try of it is under way: see it again shortly
            log.info("amqp %s: %s is being spooled as %s; nacked until it is",
                     consumer.queue, parsed.key, holder[1])
            return False
        now = time.time()
        txn = Transaction(
            queue_id=queue_id,
            sender=parsed.sender,
            recipients=parsed.recipients,
            body=received_line(consumer.queue, state.hostname, queue_id, now) + parsed.body,
            received_at=now,
            smtputf8=parsed.smtputf8,
            trace=wants_trace(parsed.body, list(parsed.recipients), state.traced),
            lane=labels.lane, campaign=labels.campaign, tenant=labels.tenant,
        )
        try:
            await state.accept(txn)
        except RelayError as exc:
            state.counters["rejected_spool"] += 1
            log.warning("%s: not accepted from amqp %s: %s", queue_id, consumer.queue, exc)
            await self._forget(parsed.key, queue_id)
            return False
        except BaseException:  # a bug: the record must not make retries wait
            await self._forget(parsed.key, queue_id)
            raise
        state.counters["accepted_messages"] += 1
        state.counters["accepted_recipients"] += len(txn.recipients)
        state.counters[f"accepted_{txn.lane}"] += len(txn.recipients)
        state.counters["accepted_bytes"] += len(txn.body)
        log.info("%s: accepted from=<%s> nrcpt=%d size=%d amqp=%s%s", queue_id, txn.sender,
                 len(txn.recipients), len(txn.body), consumer.queue, " trace" if txn.trace else "")
        return True

    async def _forget(self, key: str, queue_id: str) -> None:
        try:
            await self.forget(key, queue_id)
        except RelayError as exc:
            log.warning("%s: could not drop its intake record yet (%s): trying again", queue_id, exc)
            self._forget_later(key, queue_id)

    def _forget_later(self, key: str, queue_id: str) -> None:
        """Give the key back in the background, as soon as its owner answers
        (forgetting a queue id that has no record changes nothing)."""
        task = asyncio.ensure_future(self._forget_until_answered(key, queue_id))
        self._forgetting.add(task)
        task.add_done_callback(self._forgetting.discard)

    async def _forget_until_answered(self, key: str, queue_id: str) -> None:
        deadline = time.monotonic() + FORGET_FOR
        while time.monotonic() < deadline:
            await asyncio.sleep(FORGET_RETRY)
            try:
                await self.forget(key, queue_id)
                return
            except RelayError:
                continue
        log.error("%s: could not drop its intake record: copies wait until it is %.0f s old",
                  queue_id, FORGET_FOR)

    async def _technical_failure(self, message: AbstractIncomingMessage,
                                 bad: amqp_message.BadMessage) -> bool:
        """Publish to failure.technical, persistent and confirmed: True once
        the broker took it (then the original may be acked)."""
        error = bad.error
        body = amqp_message.technical_failure(message.body, error)
        try:
            await self._failures["technical"].publish(
                aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                                 content_type="application/json",
                                 headers={"x-relay-error-code": error["code"]}),
                routing_key="",
            )
        except (aiormq.exceptions.AMQPError, aio_pika.exceptions.DeliveryError,
                ConnectionError, OSError, RuntimeError) as exc:
            log.warning("amqp %s: failure.technical refused a message (%s): kept in the queue",
                        self.settings.queue, exc)
            return False
        self.count("failed")
        log.warning("amqp %s: bad message to %s: %s", self.settings.queue,
                    failure_name(self.settings.queue, "technical"), error["message"])
        return True


PRUNE_INTERVAL = 3600.0  # seconds between prunes of the keys of spooled messages
# The workers start together: a message taken before every peer serves
# would be nacked (its key's owner or its recipients' is not reachable yet)
# and come again, so consumers wait this long at most for them first.
PEERS_WAIT = 10.0


class AmqpIntake:
    """Every consumer of one worker, and the pruning of the keys they
    recorded (kept as long as delivery events: ``deliver.event_retention``)."""

    def __init__(self, settings, state: IntakeState, spool, router) -> None:
        self.settings = settings
        taking: set[str] = set()
        self.consumers = [Consumer(c, state, router.claim_key, router.forget_key, taking)
                          for c in settings.amqp.consumers]
        self._prune = spool.prune_intake  # async (older_than) -> count
        self._peers_reachable = router.wait_peers_reachable
        self._tasks: list[asyncio.Task] = []

    def start(self) -> None:
        if not self.consumers:
            return
        for consumer in self.consumers:
            self._tasks.append(asyncio.create_task(self._run(consumer),
                                                   name=f"amqp-{consumer.settings.queue}"))
        self._tasks.append(asyncio.create_task(self._prune_keys(), name="amqp-prune"))

    async def _run(self, consumer: Consumer) -> None:
        await self._peers_reachable(PEERS_WAIT)
        await consumer.run()

    async def _prune_keys(self) -> None:
        while True:
            try:
                await self._prune(time.time() - self.settings.deliver.event_retention)
            except RelayError as exc:
                log.info("pruning AMQP keys postponed: %s", exc)
            await asyncio.sleep(PRUNE_INTERVAL)

    def status(self) -> list[dict]:
        return [consumer.status() for consumer in self.consumers]

    def gauges(self) -> dict[str, float]:
        return {"amqp_connected": sum(c.connected for c in self.consumers),
                "amqp_unacked": sum(c.in_flight for c in self.consumers)}

    async def stop(self, timeout: float) -> None:
        for task in self._tasks:
            if not task.done():
                task.cancel()
        await asyncio.gather(*(c.stop(timeout) for c in self.consumers), return_exceptions=True)
