"""Many relay hosts on one RabbitMQ: parts for other hosts out to their
shard queue, this host's shard queue in to its workers.

Input: parts of accepted transactions whose slots another host owns
(``route.shard.host_of``), from ``Router.submit``; and the messages of this
host's durable queue ``relay.shard.<index>`` (``[cluster] queue_prefix``).
Output: each outgoing part published persistent, mandatory, with publisher confirms, before intake
answers 250 (or acks what it consumed); each incoming part stored through
``Router.submit_here`` (the workers' two-phase commit, this worker
coordinating) and acked only then.

Theory of operation.  Every worker publishes (one robust connection and a
confirming channel each) and declares every host's shard queue (durable,
quorum by default), so a part for a host that never started waits in the
broker.  A publish not confirmed within ``PUBLISH_TIMEOUT`` — broker down,
queue full, the channel lost — raises OwnerUnavailable: intake says 451,
the AMQP intake nacks; nothing was stored on this host for that
transaction yet (``Router.submit`` publishes first), so a retry makes no
duplicate here.

Worker 0 alone consumes this host's shard queue: a redelivered part (our
ack was lost with the connection, or worker 0 died) then always comes
back to the process that took the first copy, where the check "already
committed on this host?" (spool.seen) and the record of the parts being
stored (``_taking``) are one step, so a part whose first try committed is
acked, not stored again.  Parts still go to every worker of this host
through the peer sockets; only the taking is in one process.

Wire format of a shard message: ``!I`` header length, the JSON header
(route.forward.envelope_of, plus ``"origin"``: the publishing host), the
raw body.  A message that does not decode is published to
``relay.shard.<index>.bad`` (with confirms) for the operator, then acked.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import struct
import time

import aio_pika
import aiormq
import orjson

from relay.broker import SETTLE_ERRORS, BrokerLink, stop_consuming
from relay.errors import CorruptEntry, OwnerUnavailable, RelayError
from relay.model import Part, Transaction
from relay.route.forward import envelope_of, part_from

log = logging.getLogger("relay.cluster")

HEADER = struct.Struct("!I")
PUBLISH_TIMEOUT = 10.0  # a publish not confirmed by then is a failure (451)
NACK_DELAY = 1.0  # seconds before a part we could not store goes back to the queue
DEPTH_INTERVAL = 5.0  # how often worker 0 reads its shard queue's depth (for /metrics)
CONSUMER = 0  # the worker that consumes this host's shard queue


def queue_name(prefix: str, host: int) -> str:
    return f"{prefix}.{host}"


def encode(part: Part, origin: int) -> bytes:
    header = orjson.dumps({**envelope_of(part), "origin": origin})
    return HEADER.pack(len(header)) + header + part.body


def decode(data: bytes) -> tuple[Part, int]:
    """(part, origin host); CorruptEntry unless the message is whole."""
    if len(data) < HEADER.size:
        raise CorruptEntry("shard message shorter than its header")
    (length,) = HEADER.unpack_from(data)
    if HEADER.size + length > len(data):
        raise CorruptEntry("shard message shorter than its header says")
    try:
        header = orjson.loads(data[HEADER.size:HEADER.size + length])
    except orjson.JSONDecodeError as exc:
        raise CorruptEntry(f"shard message header is not JSON: {exc}") from None
    if not isinstance(header, dict) or not isinstance(header.get("origin"), int):
        raise CorruptEntry("shard message header without its origin host")
    return part_from(header, data[HEADER.size + length:]), header["origin"]


def transaction_of(part: Part) -> Transaction:
    """The transaction a consumed part is stored as on this host: its id,
    envelope, body, arrival, class and campaign as the intake host took them."""
    return Transaction(part.queue_id, part.sender, tuple(r.address for r in part.recipients),
                       part.body, part.received_at, part.smtputf8, part.trace,
                       lane=part.lane, campaign=part.campaign, tenant=part.tenant)


class ClusterLink:
    """One worker's side of the cluster."""

    def __init__(self, settings, worker: int, submit_here, committed, counters) -> None:
        self.settings = settings.cluster
        self.worker = worker
        # async (Transaction, [Recipient]) -> None: route.forward.Router.submit_here
        self.submit_here = submit_here
        self.committed = committed  # async (queue id) -> bool: spool.seen.IntakeIndex.committed
        self.counters = counters  # the worker's stats counters (cluster_*)
        self.counts: collections.Counter[str] = collections.Counter()
        self.link: BrokerLink | None = None
        self._error = ""  # the last publish or store that failed (the link has its own)
        self.depth: int | None = None  # this host's shard queue (worker 0 reads it)
        self.consumers_seen: int | None = None
        self._channel = None
        self._queue = None
        self._consumer_tag = None
        self._bad = None
        self._taking: set[str] = set()
        self._settling: set[asyncio.Task] = set()
        self._tasks: list[asyncio.Task] = []
        self._ready = asyncio.Event()
        self.in_flight = 0

    def queue_of(self, host: int) -> str:
        return queue_name(self.settings.queue_prefix, host)

    @property
    def own_queue(self) -> str:
        return self.queue_of(self.settings.index)

    def count(self, name: str) -> None:
        self.counters[f"cluster_{name}"] += 1
        self.counts[name] += 1

    def start(self) -> None:
        self._tasks.append(asyncio.create_task(self._run(), name="cluster"))

    async def _run(self) -> None:
        self.link = BrokerLink(self.settings.amqp_url,
                               f"relay host {self.settings.index} worker {self.worker}",
                               "cluster", on_change=self._connection_changed)
        if not await self.link.open(self._setup):
            return
        log.info("cluster: host %d of %d, worker %d connected%s", self.settings.index,
                 self.settings.hosts, self.worker,
                 f", consuming {self.own_queue}" if self.worker == CONSUMER else "")
        if self.worker == CONSUMER:
            await self._watch_depth()

    async def _setup(self, connection) -> None:
        self._channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        arguments = {"x-queue-type": self.settings.queue_type}
        for host in range(self.settings.hosts):
            await self._channel.declare_queue(self.queue_of(host), durable=True, arguments=arguments)
        if self.worker == CONSUMER:
            await self._consume(connection, arguments)

    def _connection_changed(self, connected: bool) -> None:
        (self._ready.set if connected else self._ready.clear)()

    @property
    def connected(self) -> bool:
        return self.link is not None and self.link.connected

    @property
    def last_error(self) -> str:
        return self._error or (self.link.last_error if self.link is not None else "")

    async def _consume(self, connection, arguments: dict) -> None:
        consuming = await connection.channel(publisher_confirms=True, on_return_raises=True)
        await consuming.set_qos(prefetch_count=self.settings.prefetch)
        self._queue = await consuming.declare_queue(self.own_queue, durable=True,
                                                    arguments=arguments)
        bad = f"{self.own_queue}.bad"
        await consuming.declare_queue(bad, durable=True, arguments=arguments)
        self._bad = (consuming, bad)
        self._consumer_tag = await self._queue.consume(self._on_message)

    async def _watch_depth(self) -> None:
        while True:  # until close() cancels it
            try:
                if self.connected:
                    self.depth, self.consumers_seen = await self._inspect(self.own_queue)
            except Exception as exc:  # the channel is being restored: read it next time
                self._error = f"{type(exc).__name__}: {exc}"[:300]
            await asyncio.sleep(DEPTH_INTERVAL)

    async def _inspect(self, name: str) -> tuple[int, int]:
        """(messages, consumers) of a queue as the broker says now.  Asked on
        the underlying channel: aio-pika's robust channel answers a passive
        declare of a queue it knows with the first declaration's figures."""
        channel = await self._channel.get_underlay_channel()
        result = await asyncio.wait_for(channel.queue_declare(name, passive=True), 5)
        return result.message_count, result.consumer_count

    # -- out: parts for other hosts --------------------------------------------

    async def publish(self, host: int, part: Part) -> None:
        """The part is in ``relay.shard.<host>`` (confirmed), or OwnerUnavailable."""
        try:
            if not self._ready.is_set():
                await asyncio.wait_for(self._ready.wait(), 1.0)
            message = aio_pika.Message(encode(part, self.settings.index),
                                       delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                                       message_id=part.queue_id, timestamp=time.time())
            await asyncio.wait_for(
                self._channel.default_exchange.publish(message, routing_key=self.queue_of(host),
                                                       mandatory=True),
                PUBLISH_TIMEOUT)
        except (aiormq.exceptions.AMQPError, aio_pika.exceptions.MessageProcessError,
                asyncio.TimeoutError, ConnectionError, OSError, RuntimeError, AttributeError) as exc:
            # AttributeError: no channel yet (never connected).
            self.count("publish_failed")
            self._error = f"publish to {self.queue_of(host)}: {type(exc).__name__}: {exc}"[:300]
            raise OwnerUnavailable(f"host {host}'s shard queue did not confirm the part") from None
        self.count("published")

    # -- in: this host's shard queue ---------------------------------------------

    async def _on_message(self, message) -> None:
        # A part half stored must finish even if the channel closes meanwhile.
        task = asyncio.ensure_future(self._settle(message))
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)
        await asyncio.shield(task)

    async def _settle(self, message) -> None:
        self.in_flight += 1
        try:
            if await self._take(message):
                await message.ack()
            else:
                await asyncio.sleep(NACK_DELAY)
                await message.nack(requeue=True)
                self.count("nacked")
        except SETTLE_ERRORS as exc:
            log.info("cluster: could not settle a part: %s", exc)  # redelivered, recognised
        finally:
            self.in_flight -= 1

    async def _take(self, message) -> bool:
        """True: ack.  False: nack with requeue after a delay."""
        try:
            part, origin = decode(message.body)
        except CorruptEntry as exc:
            return await self._set_aside(message, str(exc))
        queue_id = part.queue_id
        if queue_id in self._taking:  # another copy is being stored right now
            return False
        self._taking.add(queue_id)
        try:
            if await self.committed(queue_id):
                self.count("duplicates")
                log.info("cluster: %s from host %d is stored already; acked", queue_id, origin)
                return True
            await self.submit_here(transaction_of(part), list(part.recipients))
            self.count("consumed")
            return True
        except RelayError as exc:
            self._error = f"storing {queue_id}: {exc}"[:300]
            log.warning("cluster: %s from host %d not stored (%s); handed back", queue_id, origin, exc)
            return False
        finally:
            self._taking.discard(queue_id)

    async def _set_aside(self, message, why: str) -> bool:
        channel, bad = self._bad
        log.error("cluster: a message of %s does not decode (%s): moved to %s",
                  self.own_queue, why, bad)
        try:
            await asyncio.wait_for(channel.default_exchange.publish(
                aio_pika.Message(message.body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                                 headers={"error": why[:500]}),
                routing_key=bad, mandatory=True), PUBLISH_TIMEOUT)
        except (aiormq.exceptions.AMQPError, aio_pika.exceptions.MessageProcessError,
                asyncio.TimeoutError, ConnectionError, OSError, RuntimeError):
            return False
        self.count("bad")
        return True

    # -- operators ---------------------------------------------------------------

    def status(self) -> dict:
        """For ``relayctl cluster``."""
        return {
            "worker": self.worker, "connected": self.connected,
            "consumes": self.own_queue if self.worker == CONSUMER else None,
            **{name: self.counts[name]
               for name in ("published", "publish_failed", "consumed", "duplicates", "nacked", "bad")},
            "last_error": self.last_error,
            **({"depth": self.depth, "consumers": self.consumers_seen}
               if self.worker == CONSUMER else {}),
        }

    def gauges(self) -> dict[str, float]:
        gauges = {"cluster_connected": float(self.connected)}
        if self.worker == CONSUMER and self.depth is not None:
            gauges["cluster_queue_depth"] = float(self.depth)
        return gauges

    async def queues(self) -> list[dict]:
        """Every shard queue's depth and consumers, as the broker says now."""
        found = []
        for host in range(self.settings.hosts):
            entry = {"queue": self.queue_of(host), "host": host}
            try:
                messages, consumers = await self._inspect(self.queue_of(host))
                entry.update(messages=messages, consumers=consumers)
            except Exception as exc:  # reported, not raised: the others still count
                entry["error"] = f"{type(exc).__name__}: {exc}"[:200]
            found.append(entry)
        return found

    async def stop_consuming(self, timeout: float) -> None:
        """Drain, first step: take no more parts, let those in hand finish
        (what is not acked by then goes back to the queue).  Publishing goes
        on: sessions still finishing may hand over parts for other hosts."""
        await stop_consuming(self._queue, self._consumer_tag, lambda: self.in_flight, timeout)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self.link is not None:
            await self.link.close()
