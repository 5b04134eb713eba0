"""Test support for AMQP: the local RabbitMQ (127.0.0.1:5672, guest/guest),
driven from the test's thread.

Every test gets its own queue names (``t<random>.outbox``), declares them as
the relay would, and deletes every queue and exchange it made afterwards.
A broker that cannot be reached fails the test with a message saying so:
these tests never skip.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import time
import uuid

import aio_pika
import aiormq
import orjson
import pytest

URL = "amqp://guest:guest@127.0.0.1:5672/"
FAILURE_CLASSES = ("recipient", "technical", "connection", "unknown")


class Broker:
    def __init__(self) -> None:
        self.prefix = f"t{uuid.uuid4().hex[:12]}"
        self.queue = f"{self.prefix}.outbox"
        self._loop = asyncio.new_event_loop()
        self._declared: set[str] = set()
        try:
            self.connection = self._run(aio_pika.connect(URL, timeout=5))
        except Exception as exc:
            self._loop.close()
            pytest.fail(
                f"RabbitMQ is not reachable at {URL} ({type(exc).__name__}: {exc}); these tests "
                "need it: start it with `rabbitmq-server -detached` (.ci/run does)",
                pytrace=False,
            )
        self.channel = self._run(self._channel())

    async def _channel(self):
        return await self.connection.channel(publisher_confirms=True)

    def _run(self, coro):
        return self._loop.run_until_complete(coro)

    def names(self, name: str) -> list[str]:
        """The queue (or exchange) and the PostmanQ twins the relay declares."""
        return [name, *(f"{name}.failure.{c}" for c in FAILURE_CLASSES), f"{name}.not.send"]

    def declare(self, name: str | None = None, kind: str = "fanout",
                queue_type: str = "classic") -> None:
        """The main exchange and queue, as the relay declares them."""
        name = name or self.queue

        async def go():
            exchange = await self.channel.declare_exchange(name, aio_pika.ExchangeType(kind),
                                                           durable=True)
            queue = await self.channel.declare_queue(name, durable=True,
                                                     arguments={"x-queue-type": queue_type})
            await queue.bind(exchange, routing_key="")

        self._declared.update(self.names(name))
        self._run(go())

    def publish(self, bodies, exchange: str | None = None, persistent: bool = True) -> None:
        async def go():
            target = await self.channel.get_exchange(exchange or self.queue)
            mode = aio_pika.DeliveryMode.PERSISTENT if persistent else aio_pika.DeliveryMode.NOT_PERSISTENT
            pending = [target.publish(aio_pika.Message(b, delivery_mode=mode,
                                                       content_type="text/plain"), routing_key="")
                       for b in bodies]
            for start in range(0, len(pending), 200):
                await asyncio.gather(*pending[start:start + 200])

        self._run(go())

    def count(self, queue: str) -> int:
        """Ready messages in a queue; 0 for a queue not declared (yet)."""
        async def go():
            try:
                declared = await self.channel.declare_queue(queue, passive=True)
            except aiormq.exceptions.ChannelNotFoundEntity:
                self.channel = await self._channel()  # a 404 closes the channel
                return 0
            return declared.declaration_result.message_count

        return self._run(go())

    def drain(self, queue: str) -> list[dict]:
        """Every message in a queue, taken and acked, as parsed JSON."""
        async def go():
            declared = await self.channel.get_queue(queue, ensure=True)
            found = []
            while (message := await declared.get(fail=False)) is not None:
                found.append(orjson.loads(message.body))
                await message.ack()
            return found

        return self._run(go())

    def declare_exchange(self, name: str, kind: str) -> None:
        self._declared.add(name)
        self._run(self.channel.declare_exchange(name, aio_pika.ExchangeType(kind), durable=True))

    def bind_queue(self, queue: str, exchange: str, routing_key: str) -> None:
        async def go():
            declared = await self.channel.declare_queue(queue, durable=True)
            await declared.bind(exchange, routing_key=routing_key)

        self._declared.add(queue)
        self._run(go())

    def close_relay_connections(self) -> int:
        """Close the broker side of every connection of the relay under test
        (their names carry this test's queue name), as a broker restart or
        a network cut would; other clients of the shared broker are left
        alone.  Returns how many were closed."""
        listing = subprocess.run(
            ["rabbitmqctl", "-q", "list_connections", "pid", "client_properties"],
            capture_output=True, text=True, timeout=60, check=True,
        ).stdout
        pids = [line.split("\t", 1)[0] for line in listing.splitlines() if self.prefix in line]
        for pid in pids:
            subprocess.run(["rabbitmqctl", "-q", "close_connection", pid, "test: connection cut"],
                           capture_output=True, timeout=60, check=True)
        return len(pids)

    def restart(self, down_for: float) -> float:
        """Stop the broker application (``rabbitmqctl stop_app``: every client
        of the machine loses its connections and the listener closes), wait
        ``down_for`` seconds, start it again and wait until it serves (bounded).
        It is started again whatever happens.  Durable queues and persistent
        messages survive.  Returns how long it was not serving."""
        def ctl(*args, timeout=60):
            subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True, timeout=timeout,
                           check=True)

        stopped = time.monotonic()
        try:
            ctl("stop_app")
            time.sleep(down_for)
        finally:
            ctl("start_app")
            ctl("-t", "60", "await_startup", timeout=90)
        down = time.monotonic() - stopped
        try:
            self._run(self.connection.close())
        except Exception:  # closed by the broker's stop: nothing to keep
            pass
        self.connection = self._run(aio_pika.connect(URL, timeout=5))
        self.channel = self._run(self._channel())
        return down

    def cleanup(self) -> None:
        async def go():
            self.channel = await self._channel()  # a fresh one: a test may have broken its own
            for name in sorted(self._declared):
                for kind in ("queue_delete", "exchange_delete"):
                    try:
                        await getattr(self.channel, kind)(name)
                    except Exception:
                        # The channel closes on a 404: open another and go on.
                        self.channel = await self._channel()

        try:
            self._run(go())
            self._run(self.connection.close())
        finally:
            self._loop.close()


def leftovers(prefix: str) -> list[str]:
    """Queues and exchanges on the broker whose names start with prefix."""
    names = []
    for what in ("list_queues", "list_exchanges"):
        out = subprocess.run(["rabbitmqctl", "-q", what, "name"], capture_output=True, text=True,
                             timeout=60).stdout
        names += [n for n in out.split() if n.startswith(prefix)]
    return names


def postmanq(sender: str, recipient: str, body: str, **extra) -> bytes:
    return orjson.dumps({"envelope": sender, "recipient": recipient, "body": body, **extra})


MARK = re.compile(rb"X-Test-Seq: (\d+)")


def sequence_numbers(received) -> list[int]:
    """The X-Test-Seq of every message a sink farm received."""
    return [int(MARK.search(r.data).group(1)) for r in received if MARK.search(r.data)]
