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
committed on this host?" (spool.known) and the record of the parts being
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
import re
import struct
import time

import aio_pika
import aiormq
import orjson

from relay.errors import CorruptEntry, OwnerUnavailable, RelayError
from relay.model import Part, Transaction
from relay.route.forward import envelope_of, part_from

log = logging.getLogger("relay.cluster")

HEADER = struct.Struct("!I")
PUBLISH_TIMEOUT = 10.0  # a publish not confirmed by then is a failure (451)
NACK_DELAY = 1.0  # seconds before a part we could not store goes back to the queue
RECONNECT_INTERVAL = 2.0
FIRST_CONNECT_BACKOFF = (0.5, 30.0)
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


def _without_password(url: str) -> str:
    return re.sub(r"(://[^:/@]*):[^@]*@", r"\1:***@", url)


class ClusterLink:
    """One worker's side of the cluster."""

    def __init__(self, settings, worker: int, submit_here, committed, counters) -> None:
        self.settings = settings.cluster
        self.worker = worker
        # async (Transaction, [Recipient]) -> None: route.forward.Router.submit_here
        self.submit_here = submit_here
        self.committed = committed  # async (queue id) -> bool: spool.known.Parts.committed
        self.counters = counters  # the worker's stats counters (cluster_*)
        self.counts: collections.Counter[str] = collections.Counter()
        self.connection = None
        self.connected = False
        self.last_error = ""
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
        self._stopping = False
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
        delay, largest = FIRST_CONNECT_BACKOFF
        while not self._stopping:
            try:
                self.connection = await aio_pika.connect_robust(
                    self.settings.amqp_url, reconnect_interval=RECONNECT_INTERVAL,
                    client_properties={"connection_name":
                                       f"relay host {self.settings.index} worker {self.worker}"})
                self._channel = await self.connection.channel(publisher_confirms=True,
                                                              on_return_raises=True)
                arguments = {"x-queue-type": self.settings.queue_type}
                for host in range(self.settings.hosts):
                    await self._channel.declare_queue(self.queue_of(host), durable=True,
                                                      arguments=arguments)
                if self.worker == CONSUMER:
                    await self._consume(arguments)
                break
            except (aiormq.exceptions.AMQPError, OSError, ConnectionError,
                    asyncio.TimeoutError) as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"[:300]
                log.warning("cluster: no broker at %s (%s); retrying in %.1fs",
                            _without_password(self.settings.amqp_url), self.last_error, delay)
                await self._close_connection()
                await asyncio.sleep(delay)
                delay = min(delay * 2, largest)
        if self.connection is None or self._stopping:
            return
        self.connected = True
        self._ready.set()
        self.connection.close_callbacks.add(self._on_lost)
        self.connection.reconnect_callbacks.add(self._on_reconnected)
        log.info("cluster: host %d of %d, worker %d connected%s", self.settings.index,
                 self.settings.hosts, self.worker,
                 f", consuming {self.own_queue}" if self.worker == CONSUMER else "")
        if self.worker == CONSUMER:
            await self._watch_depth()

    async def _consume(self, arguments: dict) -> None:
        consuming = await self.connection.channel(publisher_confirms=True, on_return_raises=True)
        await consuming.set_qos(prefetch_count=self.settings.prefetch)
        self._queue = await consuming.declare_queue(self.own_queue, durable=True,
                                                    arguments=arguments)
        bad = f"{self.own_queue}.bad"
        await consuming.declare_queue(bad, durable=True, arguments=arguments)
        self._bad = (consuming, bad)
        self._consumer_tag = await self._queue.consume(self._on_message)

    def _on_lost(self, *args) -> None:
        if self.connected and not self._stopping:
            log.warning("cluster: broker connection lost; reconnecting")
            self.last_error = "connection lost"
        self.connected = False
        self._ready.clear()

    def _on_reconnected(self, *args) -> None:
        self.connected = True
        self._ready.set()
        log.info("cluster: reconnected")

    async def _watch_depth(self) -> None:
        while not self._stopping:
            try:
                if self.connected:
                    self.depth, self.consumers_seen = await self._inspect(self.own_queue)
            except Exception as exc:  # the channel is being restored: read it next time
                self.last_error = f"{type(exc).__name__}: {exc}"[:300]
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
            self.last_error = f"publish to {self.queue_of(host)}: {type(exc).__name__}: {exc}"[:300]
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
        except (aiormq.exceptions.AMQPError, aio_pika.exceptions.MessageProcessError,
                ConnectionError, OSError, RuntimeError) as exc:
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
            txn = Transaction(queue_id, part.sender, tuple(r.address for r in part.recipients),
                              part.body, part.received_at, part.smtputf8, part.trace)
            await self.submit_here(txn, list(part.recipients))
            self.count("consumed")
            return True
        except RelayError as exc:
            self.last_error = f"storing {queue_id}: {exc}"[:300]
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
        if self._queue is not None and self._consumer_tag is not None:
            try:
                await asyncio.wait_for(self._queue.cancel(self._consumer_tag), timeout=2)
            except Exception:  # the broker is gone: nothing more will come anyway
                pass
        deadline = time.monotonic() + timeout
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.02)

    async def close(self) -> None:
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        await self._close_connection()

    async def _close_connection(self) -> None:
        connection, self.connection = self.connection, None
        self.connected = False
        if connection is not None:
            try:
                await connection.close()
            except Exception:  # closing a half-open connection: nothing to keep
                pass
