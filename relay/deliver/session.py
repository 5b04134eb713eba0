"""One outbound SMTP connection (I/O): connect, EHLO, STARTTLS, transactions.

Input: a hop (MX host, IP, port), the source IP to bind, a TLS mode and
timeouts.  Output: per-recipient replies of each transaction; failures as
``DeliveryError(reply, stage)``.  The protocol itself lives in
deliver.smtp_proto; this module only drives it.  ``map_exceptions`` is the
one place that turns OSError, timeouts, ssl.SSLError and protocol errors
into a ``DeliveryError`` with a made-up reply (code 0) and the stage.

Timeouts follow RFC 5321 4.5.3.2 (configurable): connect, each command
reply, and the reply after the final dot, which may take longest.

With ``chunking`` (opt in, per site: ``[shaping] chunking``), a server that offers
PIPELINING and CHUNKING (RFC 3030) gets MAIL, the RCPTs, ``BDAT <size>
LAST`` and the body in one write, and answers them all at once: one round
trip per message instead of two, and no dot-stuffing.  The reply to the
BDAT stands where the reply after the dot would
(``TransactionResult.chunked``).  Why opt in: RFC 3030's own example
waits for the envelope's replies before the first BDAT; pipelining the
body relies on the server reading a BDAT's octets even when it refused the
envelope, which a correct server does (the size is in the command) and a
broken one might not, reading the body as commands.  The body has gone
before any reply is read, so a server may answer MAIL only once the
message is processed: every reply waits as long as the one after the dot,
and a timeout counts as one after the dot (the server may have the
message).  A body over ``CHUNKED_MAX_BODY`` or over the server's SIZE
goes by DATA, which sends it only to a server that took the envelope.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from dataclasses import dataclass, field

from relay.errors import DeliveryError, RemoteProtocolError, TlsUnavailable
from relay.timers import LazyTimer
from relay.model import Reply, Stage
from relay.deliver import smtp_proto


# Bodies up to this go in the one write of a chunked transaction; a larger
# one waits for the envelope's replies (DATA): a refused sender or
# recipients then costs no upload, and its round trip is a small share.
CHUNKED_MAX_BODY = 1024 * 1024


@dataclass(frozen=True)
class Hop:
    host: str  # the MX host name (for TLS verification and logs)
    ip: str
    port: int


@dataclass(frozen=True)
class Timeouts:
    connect: float = 30.0
    command: float = 300.0  # RFC 5321: MAIL 5 min, RCPT 5 min, greeting 5 min
    data: float = 600.0  # RFC 5321: DATA termination 10 min


@dataclass
class TransactionResult:
    """Replies of one transaction: a failure before any RCPT counts for all."""

    mail: Reply | None = None
    rcpt: list[Reply] = field(default_factory=list)
    data: Reply | None = None  # the 354 step (None when chunked)
    dot: Reply | None = None  # after the final dot, or to the BDAT LAST
    chunked: bool = False  # sent with BDAT: no DATA step


class map_exceptions:
    """``with map_exceptions(stage, host):`` turns a failure of the
    connection into a DeliveryError with the reply it stands for.  A class,
    not a generator context manager: it wraps every read and write."""

    __slots__ = ("stage", "host", "timeout_stage")

    def __init__(self, stage: Stage, host: str, timeout_stage: Stage | None = None) -> None:
        self.stage = stage
        self.host = host
        self.timeout_stage = timeout_stage or stage  # where a timeout is reported

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, exc, traceback) -> bool:
        if exc is None or isinstance(exc, DeliveryError):
            return False
        stage, host = self.stage, self.host
        if isinstance(exc, asyncio.TimeoutError):
            raise DeliveryError(Reply(0, "4.4.2", f"timeout at {stage.value}", host),
                                self.timeout_stage) from None
        if isinstance(exc, ssl.SSLError):
            raise TlsUnavailable(
                Reply(0, "4.7.5", f"TLS handshake failed: {exc.reason or exc}", host), Stage.STARTTLS
            ) from None
        if isinstance(exc, ConnectionRefusedError):
            raise DeliveryError(Reply(0, "4.4.1", "connection refused", host), stage) from None
        if isinstance(exc, (OSError, EOFError)):
            text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
            raise DeliveryError(Reply(0, "4.4.2", f"connection lost: {text}", host), stage) from None
        if isinstance(exc, RemoteProtocolError):
            raise DeliveryError(Reply(0, "4.5.0", f"protocol error: {exc}", host), stage) from None
        return False


class ReadDeadline:
    """The timeout of a connection's reads, on one timer for all of them
    (relay.timers.LazyTimer).  On expiry the reading task is cancelled, and
    ``timed_out`` tells that cancellation from any other, as asyncio.timeout
    does (Task.uncancel)."""

    __slots__ = ("_timer", "_task", "_cancelling", "_expired")

    def __init__(self) -> None:
        self._timer = LazyTimer(self._expire)
        self._task: asyncio.Task | None = None
        self._cancelling = 0
        self._expired = False

    def start(self, when: float) -> None:
        """The current task's read must end by ``when`` (loop time)."""
        task = asyncio.current_task()
        self._task, self._cancelling = task, task.cancelling()
        self._timer.set(when)

    def stop(self) -> None:
        self._timer.clear()
        self._task = None

    def timed_out(self) -> bool:
        """Whether the CancelledError being handled came from the deadline."""
        if not self._expired:
            return False
        self._expired = False
        return self._task is not None and self._task.uncancel() <= self._cancelling

    def cancel(self) -> None:
        """The connection is closed: drop the timer, unless a read still
        waits (it ends with the connection, or at its deadline)."""
        if self._task is None:
            self._timer.cancel()

    def _expire(self) -> None:
        if self._task is not None:
            self._expired = True
            self._task.cancel()


class SmtpSession:
    def __init__(self, hop: Hop, *, helo_name: str, source_ip: str | None,
                 timeouts: Timeouts, chunking: bool = False) -> None:
        self.hop = hop
        self.helo_name = helo_name
        self.source_ip = source_ip
        self.timeouts = timeouts
        self.chunking = chunking  # use BDAT where CHUNKING and PIPELINING are offered
        self.tls = False
        self.extensions: dict[str, str] = {}
        self.messages_sent = 0
        self.usable = False
        self.idle_since = 0.0
        self._parser = smtp_proto.ReplyParser(hop.host)
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._deadline = ReadDeadline()

    # -- opening ------------------------------------------------------------

    async def open(self, tls_mode: str, tls_context: ssl.SSLContext | None) -> None:
        """Connect, greet, EHLO and STARTTLS as ``tls_mode`` asks.

        tls_mode: "none" (never), "opportunistic" (if offered; a failed
        handshake raises TlsUnavailable so the caller may retry in
        plaintext), "required" / "verify" (STARTTLS or fail; verify also
        checks the certificate against the MX host name)."""
        hop = self.hop
        with map_exceptions(Stage.CONNECT, hop.host):
            self._reader, self._writer = await asyncio.wait_for(
                asyncio.open_connection(
                    hop.ip, hop.port,
                    local_addr=(self.source_ip, 0) if self.source_ip else None,
                ),
                self.timeouts.connect,
            )
        greeting = await self._read(Stage.GREETING, self.timeouts.command)
        if greeting.code != 220:
            raise DeliveryError(greeting, Stage.GREETING)
        await self._ehlo()
        if tls_mode != "none":
            if "STARTTLS" in self.extensions:
                await self._starttls(tls_context, verify=tls_mode == "verify")
            elif tls_mode in ("required", "verify"):
                raise TlsUnavailable(Reply(0, "4.7.4", "STARTTLS not offered", hop.host), Stage.EHLO)
        self.usable = True
        self.idle_since = time.monotonic()

    async def _ehlo(self) -> None:
        self._write(smtp_proto.command("EHLO", self.helo_name))
        reply = await self._read(Stage.EHLO, self.timeouts.command)
        if reply.code == 250:
            self.extensions = smtp_proto.ehlo_extensions(reply)
            return
        self._write(smtp_proto.command("HELO", self.helo_name))
        reply = await self._read(Stage.EHLO, self.timeouts.command)
        if reply.code != 250:
            raise DeliveryError(reply, Stage.EHLO)
        self.extensions = {}

    async def _starttls(self, context: ssl.SSLContext | None, verify: bool) -> None:
        self._write(smtp_proto.command("STARTTLS"))
        reply = await self._read(Stage.STARTTLS, self.timeouts.command)
        if reply.code != 220:
            raise TlsUnavailable(reply, Stage.STARTTLS)
        if context is None:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        try:
            await asyncio.wait_for(
                self._writer.start_tls(context, server_hostname=self.hop.host if verify else None),
                self.timeouts.connect,
            )
        except (OSError, EOFError, asyncio.TimeoutError) as exc:
            # Any failed handshake (a reset or a timeout as much as a bad
            # certificate) is a TLS failure: opportunistic mode may retry
            # in plaintext, required/verify never do.
            reason = getattr(exc, "reason", None) or str(exc) or type(exc).__name__
            raise TlsUnavailable(
                Reply(0, "4.7.5", f"TLS handshake failed: {reason}", self.hop.host), Stage.STARTTLS
            ) from None
        self.tls = True
        self._parser = smtp_proto.ReplyParser(self.hop.host)
        await self._ehlo()

    # -- transactions -------------------------------------------------------

    async def send(self, sender: str, recipients: list[str], body: bytes,
                   smtputf8: bool) -> TransactionResult:
        """One transaction.  Raises DeliveryError only when the connection
        itself failed (then no recipient's fate is known)."""
        result = TransactionResult()
        size = len(body) if "SIZE" in self.extensions else None
        body8bit = "8BITMIME" in self.extensions and not body.isascii()
        utf8 = smtputf8 and "SMTPUTF8" in self.extensions
        self.usable = False  # until the transaction ends cleanly
        if self._goes_chunked(body):
            return await self._send_chunked(result, sender, recipients, body, size, utf8, body8bit)
        if "PIPELINING" in self.extensions:
            self._write(smtp_proto.transaction(sender, recipients, size=size, smtputf8=utf8,
                                               body8bit=body8bit))
            result.mail = await self._read(Stage.MAIL, self.timeouts.command)
            for _ in recipients:
                result.rcpt.append(await self._read(Stage.RCPT, self.timeouts.command))
            result.data = await self._read(Stage.DATA, self.timeouts.command)
        else:
            self._write(smtp_proto.mail_from(sender, size=size, smtputf8=utf8, body8bit=body8bit))
            result.mail = await self._read(Stage.MAIL, self.timeouts.command)
            if result.mail.code != 250:
                await self._reset()
                return result
            for address in recipients:
                self._write(smtp_proto.rcpt_to(address))
                result.rcpt.append(await self._read(Stage.RCPT, self.timeouts.command))
            if not any(r.code in (250, 251) for r in result.rcpt):
                await self._reset()
                return result
            self._write(b"DATA\r\n")
            result.data = await self._read(Stage.DATA, self.timeouts.command)
        if result.data.code != 354:
            await self._reset()
            return result
        accepted = result.mail.code == 250 and any(r.code in (250, 251) for r in result.rcpt)
        # A server that said 354 must get a message; with no recipient
        # accepted it can only be refused, so send an empty one.
        self._write(smtp_proto.dot_stuffed(body) if accepted else b".\r\n")
        await self._drain(Stage.DOT)  # a big body waits for the socket, not in our buffer
        result.dot = await self._read(Stage.DOT, self.timeouts.data)
        self.messages_sent += 1
        self.usable = True
        self.idle_since = time.monotonic()
        return result

    def _goes_chunked(self, body: bytes) -> bool:
        """Whether this body goes in one write with its envelope (BDAT)."""
        if not (self.chunking and "CHUNKING" in self.extensions and "PIPELINING" in self.extensions):
            return False
        limit = self.extensions.get("SIZE", "")
        too_big = limit.isascii() and limit.isdigit() and 0 < int(limit) < len(body)
        return len(body) <= CHUNKED_MAX_BODY and not too_big

    async def _send_chunked(self, result: TransactionResult, sender: str, recipients: list[str],
                            body: bytes, size: int | None, utf8: bool,
                            body8bit: bool) -> TransactionResult:
        """MAIL, RCPTs, ``BDAT <size> LAST`` and the body in one write.  The
        body goes even if MAIL or every RCPT is refused: the server reads
        the octets the BDAT announces and refuses the BDAT too."""
        result.chunked = True
        commands = smtp_proto.chunked_transaction(sender, recipients, len(body), size=size,
                                                  smtputf8=utf8, body8bit=body8bit)
        self._write_all((commands, body))
        try:
            await self._drain(Stage.DOT)
        except DeliveryError as lost:
            raise self._said_before_closing() or lost from None
        wait = self.timeouts.data
        result.mail = await self._read(Stage.MAIL, wait, timeout_stage=Stage.DOT)
        for _ in recipients:
            result.rcpt.append(await self._read(Stage.RCPT, wait, timeout_stage=Stage.DOT))
        result.dot = await self._read(Stage.DOT, wait)
        self.messages_sent += 1
        if result.dot.code // 100 != 2:
            # A refused BDAT ends the transaction, but servers differ on
            # what state it leaves: RSET says for sure.
            await self._reset()
            return result
        self.usable = True
        self.idle_since = time.monotonic()
        return result

    def _said_before_closing(self) -> DeliveryError | None:
        """The server's reply to MAIL, if it sent one before it closed the
        connection under our body (a 421, a refused sender): that reply,
        not the reset, is the verdict.  A reader whose connection broke
        raises before it hands out what it holds, hence its buffer."""
        buffered = bytes(self._reader._buffer)  # noqa: SLF001 - see _parser_has_data
        try:
            self._parser.receive_data(buffered)
        except RemoteProtocolError:
            return None
        reply = self._parser.next_reply()
        if reply is None or reply.code // 100 == 2:  # an accepted sender explains nothing
            return None
        return DeliveryError(reply, Stage.MAIL)

    async def _reset(self) -> None:
        """RSET after a refused transaction.  Its failure only makes the
        connection unusable: the replies already read stay the verdict."""
        try:
            self._write(b"RSET\r\n")
            reply = await self._read(Stage.MAIL, self.timeouts.command)
        except DeliveryError:
            self.close()
            return
        self.usable = reply.code == 250
        self.idle_since = time.monotonic()

    @property
    def alive(self) -> bool:
        """Still connected, as far as can be told without a round trip
        (a server that closed an idle connection has sent its FIN)."""
        return (
            self.usable and self._writer is not None and not self._writer.is_closing()
            and not self._reader.at_eof() and not self._parser_has_data()
        )

    def _parser_has_data(self) -> bool:
        # Bytes from an idle server are a 421 or garbage: not reusable.
        return bool(self._reader._buffer)  # noqa: SLF001 - StreamReader has no public peek

    async def quit(self) -> None:
        """Polite close: QUIT, and do not wait long for the 221."""
        if self._writer is None:
            return
        try:
            if not self._writer.is_closing():
                self._write(b"QUIT\r\n")
                await asyncio.wait_for(self._read(Stage.LOCAL, 2.0), 2.0)
        except (DeliveryError, asyncio.TimeoutError):
            pass
        self.close()

    def close(self) -> None:
        self.usable = False
        self._deadline.cancel()
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    # -- I/O ----------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        with map_exceptions(Stage.LOCAL, self.hop.host):
            if self._writer is None or self._writer.is_closing():
                raise ConnectionResetError("connection closed")
            self._writer.write(data)

    def _write_all(self, parts: tuple[bytes, ...]) -> None:
        """Several buffers in one write: uvloop (the workers' loop) sends
        them with one writev and no copy; asyncio's own loop joins them."""
        with map_exceptions(Stage.LOCAL, self.hop.host):
            if self._writer is None or self._writer.is_closing():
                raise ConnectionResetError("connection closed")
            self._writer.writelines(parts)

    async def _drain(self, stage: Stage) -> None:
        with map_exceptions(stage, self.hop.host):
            if self._writer.transport.get_write_buffer_size() == 0:
                return  # all of it is in the kernel's buffer: nothing to wait for
            # asyncio.timeout, not wait_for: no task per call (3.11's wait_for makes one).
            async with asyncio.timeout(self.timeouts.data):
                await self._writer.drain()

    async def _read(self, stage: Stage, timeout: float, timeout_stage: Stage | None = None) -> Reply:
        with map_exceptions(stage, self.hop.host, timeout_stage):
            deadline = asyncio.get_running_loop().time() + timeout
            while True:
                reply = self._parser.next_reply()
                if reply is not None:
                    if reply.code == 421:  # the server is closing: the site failed
                        self.close()
                        raise DeliveryError(reply, stage)
                    return reply
                if deadline <= asyncio.get_running_loop().time():
                    raise asyncio.TimeoutError
                self._deadline.start(deadline)
                try:
                    data = await self._reader.read(65536)
                except asyncio.CancelledError:
                    if self._deadline.timed_out():
                        raise asyncio.TimeoutError from None
                    raise
                finally:
                    self._deadline.stop()
                if not data:
                    raise EOFError("connection closed by server")
                self._parser.receive_data(data)
