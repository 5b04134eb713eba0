"""One robust connection to RabbitMQ, as the AMQP consumers and the
cluster's link hold it.

Input: a broker URL, a connection name (shown by ``rabbitmqctl
list_connections``) and a ``setup(connection)`` coroutine that opens the
channels, declares and consumes.  Output: ``connection`` once setup
completed, and ``connected``, kept true or false as the connection is lost
and restored.

The first connection (with its setup) is retried with exponential backoff
until it succeeds or ``close`` is called; after that aio-pika's robust
connection reconnects every ``RECONNECT_INTERVAL`` and restores the
channels, declarations and consumers by itself.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, Callable

import aio_pika
import aiormq

log = logging.getLogger("relay.amqp")

# Quiet aio-pika's and aiormq's per-reconnect tracebacks; the users log the state.
logging.getLogger("aio_pika").setLevel(logging.CRITICAL)
logging.getLogger("aiormq").setLevel(logging.CRITICAL)

RECONNECT_INTERVAL = 2.0  # seconds between reconnection attempts of the robust connection
FIRST_CONNECT_BACKOFF = (0.5, 30.0)  # first connection: initial and largest delay
CONNECT_ERRORS = (aiormq.exceptions.AMQPError, OSError, ConnectionError, asyncio.TimeoutError)
# An ack or nack that cannot be sent (the channel went away): the broker
# redelivers the message, and its consumer recognises it.
SETTLE_ERRORS = (aiormq.exceptions.AMQPError, aio_pika.exceptions.MessageProcessError,
                 ConnectionError, OSError, RuntimeError)


class BrokerLink:
    def __init__(self, url: str, name: str, what: str,
                 on_change: Callable[[bool], None] | None = None, *,
                 cannot: str = "cannot connect", restored: str = "reconnected") -> None:
        self.url = url
        self.name = name  # the connection's name at the broker
        # For the log: "<what>: <cannot> (why); retrying", "<what>: <restored>".
        self.what, self.cannot, self.restored = what, cannot, restored
        self.on_change = on_change  # told True / False as the connection comes and goes
        self.connection = None
        self.connected = False
        self.closing = False
        self.last_error = ""

    async def open(self, setup: Callable[[object], Awaitable[None]]) -> bool:
        """Connect and run ``setup``, retrying with backoff; False when
        closed before that succeeded."""
        delay, largest = FIRST_CONNECT_BACKOFF
        while not self.closing:
            try:
                self.connection = await aio_pika.connect_robust(
                    self.url, reconnect_interval=RECONNECT_INTERVAL,
                    client_properties={"connection_name": self.name})
                await setup(self.connection)
                break
            except CONNECT_ERRORS as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"[:300]
                log.warning("%s: %s (%s); retrying in %.1fs", self.what, self.cannot,
                            self.last_error, delay)
                await self._close_connection()
                await asyncio.sleep(delay)
                delay = min(delay * 2, largest)
        if self.connection is None or self.closing:
            return False
        self.connection.close_callbacks.add(self._on_lost)
        self.connection.reconnect_callbacks.add(self._on_reconnected)
        self._set(True)
        return True

    def _set(self, connected: bool) -> None:
        self.connected = connected
        if self.on_change is not None:
            self.on_change(connected)

    def _on_lost(self, *args) -> None:
        if self.connected and not self.closing:
            log.warning("%s: connection lost; reconnecting", self.what)
            self.last_error = "connection lost"
        self._set(False)

    def _on_reconnected(self, *args) -> None:
        self._set(True)
        log.info("%s: %s", self.what, self.restored)

    async def close(self) -> None:
        self.closing = True
        await self._close_connection()
        self.connected = False

    async def _close_connection(self) -> None:
        connection, self.connection = self.connection, None
        if connection is not None:
            try:
                await connection.close()
            except Exception:  # closing a half-open connection: nothing to keep
                pass


async def stop_consuming(queue, consumer_tag, busy: Callable[[], int], timeout: float) -> None:
    """Take no more messages from ``queue`` and let those in hand finish:
    wait while ``busy()`` within ``timeout`` (what is not acked by then
    goes back to the queue when the connection closes)."""
    if queue is not None and consumer_tag is not None:
        try:
            await asyncio.wait_for(queue.cancel(consumer_tag), timeout=2)
        except Exception:  # the broker is gone: nothing more will come anyway
            pass
    deadline = time.monotonic() + timeout
    while busy() and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
