"""The AMQP side of amqp-intake: a backlog on RabbitMQ, and its consumption timed.

Input: the broker's URL, a queue name of the run's own, the scenario's
stream (perf.loadgen's ``Messages`` make the same messages SMTP sends),
the relay's run_dir and the fake internet.  Output: the queue declared as
the relay declares it and filled with PostmanQ messages
(``{"envelope", "recipient", "body"}``, persistent, publisher-confirmed);
then, while the relay starts and consumes, the moments consumption began
and every message was spooled, as ``Injection`` records perf.report reads;
at the end every queue and exchange of that name deleted.

How the moments are taken: *start* is the first poll (every 10 ms, a
passive declare) that finds fewer ready messages in the queue than were
published: the consumers took their first prefetch.  *spooled* is the
first moment the relay's stats ring (relay/stats/ring.py) shows
``amqp_acked`` >= N with the queue's ready count 0; the relay acks a
message only when every part of it is in its owners' spools.  Workers
publish the ring every 0.25 s, so *spooled* is up to 0.25 s late.
Delivered figures come from the sinks' receipts, counted from *start*.
"""

from __future__ import annotations

import asyncio
import random
import time

import aio_pika
import aiormq
import orjson

from perf.loadgen import SENDER, Injection, Messages, Stream

URL = "amqp://guest:guest@127.0.0.1:5672/"
FAILURE_CLASSES = ("recipient", "technical", "connection", "unknown")
START_POLL = 0.01
POLL = 0.25
PUBLISH_BATCH = 500


class Unreachable(RuntimeError):
    pass


async def connect(url: str = URL):
    try:
        return await aio_pika.connect(url, timeout=5)
    except Exception as exc:
        raise Unreachable(
            f"RabbitMQ is not reachable at {url} ({type(exc).__name__}: {exc}); amqp-intake needs"
            " it: start it with `rabbitmq-server -detached`") from exc


def names(queue: str) -> list[str]:
    """The queue (and exchange) and the PostmanQ twins the relay declares for it."""
    return [queue, *(f"{queue}.failure.{c}" for c in FAILURE_CLASSES), f"{queue}.not.send"]


def postmanq_bodies(stream: Stream, run_tag: str, seed: int = 1) -> list[bytes]:
    """Message n of the stream as PostmanQ JSON (one recipient each)."""
    messages = Messages(stream, random.Random(seed * 1000), run_tag)
    bodies = []
    for n in range(stream.messages):
        rcpts, message = messages.message(n)
        bodies.append(orjson.dumps({"envelope": SENDER, "recipient": rcpts[0],
                                    "body": message.decode("ascii")}))
    return bodies


class Backlog:
    """One queue of the run's own on the broker, filled before the relay starts."""

    def __init__(self, queue: str, url: str = URL) -> None:
        self.queue = queue
        self.url = url
        self.connection = None
        self.channel = None

    async def open(self) -> "Backlog":
        self.connection = await connect(self.url)
        self.channel = await self.connection.channel(publisher_confirms=True)
        return self

    async def fill(self, bodies: list[bytes]) -> None:
        """Declare the fanout exchange and classic queue as the relay does, publish, confirmed."""
        exchange = await self.channel.declare_exchange(self.queue, aio_pika.ExchangeType.FANOUT,
                                                       durable=True)
        queue = await self.channel.declare_queue(self.queue, durable=True,
                                                 arguments={"x-queue-type": "classic"})
        await queue.bind(exchange, routing_key="")
        for start in range(0, len(bodies), PUBLISH_BATCH):
            await asyncio.gather(*(
                exchange.publish(aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                                                  content_type="application/json"), routing_key="")
                for body in bodies[start:start + PUBLISH_BATCH]))
        if await self.ready() != len(bodies):
            raise RuntimeError(f"queue {self.queue}: {await self.ready()} ready, {len(bodies)} published")

    async def ready(self) -> int:
        declared = await self.channel.declare_queue(self.queue, passive=True)
        return declared.declaration_result.message_count

    async def delete(self) -> None:
        """Every queue and exchange of the run's name (call once the relay has stopped)."""
        for name in names(self.queue):
            for delete in ("queue_delete", "exchange_delete"):
                try:
                    await getattr(self.channel, delete)(name)
                except aiormq.exceptions.AMQPError:
                    self.channel = await self.connection.channel(publisher_confirms=True)

    async def close(self) -> None:
        if self.connection is not None:
            await self.connection.close()


async def wait_consumed(backlog: Backlog, total: int, acked, deadline: float) -> tuple[float, float]:
    """(start, spooled) wall-clock moments; ``acked()`` reads the ring's
    amqp_acked (None while the ring does not exist yet).  spooled is 0.0
    when ``deadline`` (monotonic) passed first."""
    while (ready := await backlog.ready()) >= total:
        if time.monotonic() > deadline:
            return time.time(), 0.0
        await asyncio.sleep(START_POLL)
    start = time.time()
    while time.monotonic() < deadline:
        count = acked()
        if count is not None and count >= total and ready == 0:
            return start, time.time()
        await asyncio.sleep(POLL)
        ready = await backlog.ready()
    return start, 0.0


def injections(stream: Stream, start: float, spooled: float) -> list[Injection]:
    """One record per message: all consumed from ``start``, all spooled by
    ``spooled`` (0.0: not all were; they count as failed, code 0)."""
    code = 250 if spooled else 0
    return [Injection(stream.name, stream.recipients, start, spooled or time.time(), code)
            for _ in range(stream.messages)]
