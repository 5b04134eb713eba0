"""The load generator: many pipelined SMTP clients on one uvloop.

Input: ``Stream`` descriptions (how many messages, recipients per message,
message-size distribution, recipient-domain distribution, concurrency, an
optional fixed rate), the server's address, loopback source addresses and
a deadline.  Output: an ``Injection`` record per message — when it was
started, when the 250 after the final dot came (or the failure), its
stream and recipient count.

Every recipient address is unique and names its message
(``r<message>.<index>@<domain>``), so a sink's receipt can be matched to
the injection without keeping message bodies.  Each message also carries
a unique Message-ID.

The client is our own, minimal on purpose: one ``asyncio.Protocol`` that
splits replies into lines, MAIL/RCPT/DATA sent in one write (RFC 2920
PIPELINING, which both the relay and Postfix offer), then the body; with
a TLS context, STARTTLS after the first EHLO on every connection.  A
general client (aiosmtplib) costs several times the CPU per message, and
the generator shares the two cores with the server it measures.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import itertools
import random
import ssl
import time
from dataclasses import dataclass, field

SENDER = "bench@sender.example"
LINE = 76  # body line length before CRLF
CONNECT_TIMEOUT = 30.0
REPLY_TIMEOUT = 120.0


@dataclass(frozen=True)
class Stream:
    """One kind of traffic in a scenario."""

    name: str
    messages: int
    domains: tuple[str, ...]
    recipients: int = 1  # per message
    sizes: tuple[tuple[int, float], ...] = ((2048, 1.0),)  # (bytes, weight)
    zipf: float = 1.0  # domain popularity: weight of the k-th domain is 1/k**zipf; 0 = uniform
    concurrency: int = 10  # connections
    rate: float | None = None  # messages/s (open loop); None = as fast as replies allow
    per_connection: int = 100  # messages before QUIT and a new connection
    headers: tuple[str, ...] = ()  # extra header fields ("X-Relay-Class: bulk")
    start_after: float = 0.0  # seconds after the run starts before this stream injects


@dataclass
class Injection:
    stream: str
    recipients: int
    started: float  # wall clock, just before MAIL was written
    finished: float = 0.0  # the reply after the final dot (or the failure)
    code: int = 0  # that reply's code; 0 = connection failure

    @property
    def accepted(self) -> bool:
        return self.code == 250


class ReplyError(Exception):
    def __init__(self, code: int, line: bytes) -> None:
        super().__init__(line.decode("ascii", "replace"))
        self.code = code


class Client(asyncio.Protocol):
    """One SMTP connection: writes commands, hands back whole replies."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._replies: collections.deque[bytes] = collections.deque()
        self._waiter: asyncio.Future | None = None
        self._need = 0
        self.closed = False

    # -- protocol callbacks -----------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        start = 0
        while True:
            end = buffer.find(b"\r\n", start)
            if end < 0:
                break
            if buffer[start + 3:start + 4] != b"-":  # the last line of a reply
                self._replies.append(bytes(buffer[start:end]))
            start = end + 2
        del buffer[:start]
        self._wake()

    def connection_lost(self, exc) -> None:
        self.closed = True
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done() and (
            len(self._replies) >= self._need or self.closed
        ):
            waiter.set_result(None)

    # -- calls ------------------------------------------------------------

    async def replies(self, count: int, timeout: float = REPLY_TIMEOUT) -> list[bytes]:
        while len(self._replies) < count:
            if self.closed:
                raise ConnectionError("closed by the server")
            self._need = count
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait_for(self._waiter, timeout)
            finally:
                self._waiter = None
        return [self._replies.popleft() for _ in range(count)]

    def write(self, data: bytes) -> None:
        if self.closed:
            raise ConnectionError("closed")
        self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def connect(host: str, port: int, source: str | None, helo: str = "loadgen.test",
                  tls: ssl.SSLContext | None = None, server_hostname: str | None = None) -> Client:
    """Connect, read the greeting, EHLO (and with ``tls`` STARTTLS, the
    handshake and EHLO again); raises on anything but 220/250."""
    loop = asyncio.get_running_loop()
    _, client = await asyncio.wait_for(
        loop.create_connection(Client, host, port, local_addr=(source, 0) if source else None),
        CONNECT_TIMEOUT,
    )
    try:
        (greeting,) = await client.replies(1)
        if not greeting.startswith(b"220"):
            raise ReplyError(int(greeting[:3]), greeting)
        await _ehlo(client, helo)
        if tls is not None:
            client.write(b"STARTTLS\r\n")
            (ready,) = await client.replies(1)
            if not ready.startswith(b"220"):
                raise ReplyError(int(ready[:3]), ready)
            # The same protocol object reads the decrypted stream.
            client.transport = await asyncio.wait_for(
                loop.start_tls(client.transport, client, tls, server_hostname=server_hostname),
                CONNECT_TIMEOUT,
            )
            await _ehlo(client, helo)
    except BaseException:
        client.close()
        raise
    return client


async def _ehlo(client: Client, helo: str) -> None:
    client.write(b"EHLO " + helo.encode() + b"\r\n")
    (ehlo,) = await client.replies(1)
    if not ehlo.startswith(b"250"):
        raise ReplyError(int(ehlo[:3]), ehlo)


async def send_quit(client: Client) -> None:
    try:
        client.write(b"QUIT\r\n")
        await client.replies(1, timeout=5.0)
    except (ConnectionError, asyncio.TimeoutError, OSError):
        pass
    client.close()


# -- messages ------------------------------------------------------------------


def filler(size: int, seed: int = 25) -> bytes:
    """``size`` bytes of text in CRLF lines, none starting with a dot."""
    rng = random.Random(seed)
    alphabet = b"abcdefghijklmnopqrstuvwxyz      ABCDEFGHIJ0123456789,"
    lines, total = [], 0
    while total < size:
        line = bytes(rng.choice(alphabet) for _ in range(LINE))
        lines.append(b"x" + line[1:] + b"\r\n")
        total += LINE + 2
    return b"".join(lines)[: max(size, 2)].rstrip(b"\r\n") + b"\r\n"


class Messages:
    """Builds the pipelined command block and body of message ``n``."""

    def __init__(self, stream: Stream, rng: random.Random, run_tag: str) -> None:
        self.stream = stream
        self.rng = rng
        self.run_tag = run_tag
        weights = [1.0 / (k ** stream.zipf) for k in range(1, len(stream.domains) + 1)]
        self._domain_cum = list(itertools.accumulate(weights))
        self._size_cum = list(itertools.accumulate(w for _, w in stream.sizes))
        self._fillers: dict[int, bytes] = {}

    def _domain(self) -> str:
        point = self.rng.random() * self._domain_cum[-1]
        return self.stream.domains[bisect.bisect_left(self._domain_cum, point)]

    def _size(self) -> int:
        point = self.rng.random() * self._size_cum[-1]
        return self.stream.sizes[bisect.bisect_left(self._size_cum, point)][0]

    def build(self, n: int) -> tuple[bytes, bytes, int]:
        """(MAIL+RCPT+DATA commands, body ending in CRLF.CRLF, recipients)."""
        rcpts, message = self.message(n)
        commands = (
            f"MAIL FROM:<{SENDER}>\r\n"
            + "".join(f"RCPT TO:<{r}>\r\n" for r in rcpts)
            + "DATA\r\n"
        ).encode()
        return commands, message + b".\r\n", len(rcpts)

    def message(self, n: int) -> tuple[list[str], bytes]:
        """(recipients, the RFC 5322 message ending in CRLF) of message ``n``:
        what SMTP sends after DATA (no line starts with a dot), and what the
        HTTP and AMQP generators send as the whole message."""
        rcpts = [f"r{n}.{j}@{self._domain()}" for j in range(self.stream.recipients)]
        head = (
            f"From: Bench <{SENDER}>\r\nTo: <{rcpts[0]}>\r\n"
            + "".join(f"{h}\r\n" for h in self.stream.headers)
            + f"Subject: perf {self.stream.name} {n}\r\n"
            f"Message-ID: <{n}.{self.run_tag}@perf.example>\r\n"
            f"Date: {time.strftime('%a, %d %b %Y %H:%M:%S +0000', time.gmtime())}\r\n"
            "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
        ).encode()
        size = self._size()
        body = self._fillers.get(size)
        if body is None:
            body = self._fillers[size] = filler(size)
        return rcpts, head + body


def recipient_message(address: str) -> int:
    """The message number a generated recipient address belongs to."""
    return int(address[1:address.index(".")])


# -- running streams ----------------------------------------------------------


@dataclass
class Generator:
    host: str
    port: int
    sources: tuple[str, ...] = ("127.0.0.1",)
    seed: int = 1
    ports: tuple[int, ...] = ()  # several servers (a cluster): connections go round robin
    run_tag: str = "run"
    tls: ssl.SSLContext | None = None  # STARTTLS on every connection, checking server_hostname
    server_hostname: str | None = None
    injections: list[Injection] = field(default_factory=list)
    errors: collections.Counter = field(default_factory=collections.Counter)

    def __post_init__(self) -> None:
        self._next_source = itertools.count()
        self._next_port = itertools.count()

    def _source(self) -> str:
        return self.sources[next(self._next_source) % len(self.sources)]

    async def run(self, streams: list[Stream], deadline: float) -> list[Injection]:
        """Inject every stream until its count is sent or ``deadline`` (monotonic)."""
        tasks = []
        for index, stream in enumerate(streams):
            messages = Messages(stream, random.Random(self.seed * 1000 + index), self.run_tag)
            counter = itertools.count()
            if stream.rate:
                loops = [self._open_loop(stream, messages, counter, deadline)]
            else:
                loops = [self._closed_loop(stream, messages, counter, deadline)
                         for _ in range(stream.concurrency)]
            tasks += [_after(stream.start_after, loop) for loop in loops]
        await asyncio.gather(*tasks)
        return self.injections

    def _take(self, stream: Stream, counter) -> bool:
        return next(counter) < stream.messages

    async def _send(self, client: Client, messages: Messages) -> Injection:
        n = len(self.injections)
        commands, body, rcpts = messages.build(n)
        record = Injection(messages.stream.name, rcpts, time.time())
        self.injections.append(record)
        try:
            client.write(commands)
            replies = await client.replies(rcpts + 2)
            data = replies[-1]
            if not data.startswith(b"354"):
                bad = next((r for r in replies if not r.startswith((b"250", b"354"))), data)
                record.code = int(bad[:3])
                self.errors[bad[:3].decode()] += 1
                client.write(b"RSET\r\n")
                await client.replies(1)
            else:
                client.write(body)
                (dot,) = await client.replies(1)
                record.code = int(dot[:3])
                if record.code != 250:
                    self.errors[dot[:3].decode()] += 1
        except (ConnectionError, OSError, asyncio.TimeoutError) as exc:
            record.code = 0
            self.errors[type(exc).__name__] += 1
            client.close()
        record.finished = time.time()
        return record

    async def _open(self) -> Client | None:
        try:
            port = self.ports[next(self._next_port) % len(self.ports)] if self.ports else self.port
            return await connect(self.host, port, self._source(), tls=self.tls,
                                 server_hostname=self.server_hostname)
        except (ConnectionError, OSError, asyncio.TimeoutError, ReplyError) as exc:
            self.errors[f"connect: {exc}"[:60]] += 1
            await asyncio.sleep(0.1)
            return None

    async def _closed_loop(self, stream: Stream, messages: Messages, counter, deadline: float) -> None:
        client, sent = None, 0
        while time.monotonic() < deadline:
            if client is None or client.closed:
                client, sent = await self._open(), 0
                if client is None:
                    continue
            if not self._take(stream, counter):
                break
            record = await self._send(client, messages)
            sent += 1
            if record.code == 421 or client.closed:
                client.close()
                client = None
            elif sent >= stream.per_connection:
                await send_quit(client)
                client = None
        if client is not None:
            await send_quit(client)

    async def _open_loop(self, stream: Stream, messages: Messages, counter, deadline: float) -> None:
        """One message every 1/rate s, each on an idle connection of a pool."""
        idle: list[Client] = []
        running: set[asyncio.Task] = set()

        async def one() -> None:
            client = idle.pop() if idle else None
            if client is None or client.closed:
                client = await self._open()
                if client is None:
                    return
            record = await self._send(client, messages)
            if record.code == 421 or client.closed:
                client.close()
            else:
                idle.append(client)

        start = time.monotonic()
        for k in itertools.count():
            at = start + k / stream.rate
            if at >= deadline or not self._take(stream, counter):
                break
            await asyncio.sleep(max(0.0, at - time.monotonic()))
            task = asyncio.ensure_future(one())
            running.add(task)
            task.add_done_callback(running.discard)
        if running:
            await asyncio.gather(*running)
        for client in idle:
            await send_quit(client)


async def _after(delay: float, coro):
    if delay:
        await asyncio.sleep(delay)
    return await coro


def sources(count: int, network: str = "127.0.1") -> tuple[str, ...]:
    """``count`` loopback source addresses (127.0.1.1, .2, ...): spreads
    client connections over several 4-tuples' worth of ephemeral ports."""
    return tuple(f"{network}.{i}" for i in range(1, count + 1))

