"""SMTP sessions: aiosmtpd hooks -> policy -> the worker's accept step.

Input: client connections (from intake.listener).  Output: a
``Transaction`` handed to ``accept`` (injected by the worker: DKIM, routing
and the spool are later stages), and a reply that says what happened to it:
``250 ... queued as ID`` only once every part is durable.

aiosmtpd parses commands and runs the session; ``RelaySMTP`` narrows it
where a production MTA must differ: RFC 5321 paths instead of RFC 5322
headers, our own DATA reader (intake.data: smuggling, bare line endings,
bounded memory, minimum data rate), enhanced status codes on every reply,
connection limits and drain on SIGTERM, and no internal detail in any
error reply.  ``Handler`` holds the decisions (the aiosmtpd hooks).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import re
import ssl
import time
from typing import Awaitable, Callable

import aiosmtpd.smtp
from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword

from relay.accel import whole_lines
from relay.config import Settings
from relay.errors import RelayError
from relay.intake import lane, policy, replies
from relay.intake.auth import Authenticator, FailureLockout
from relay.intake.clients import ClientView
from relay.intake.data import DataReader
from relay.intake.received import protocol_name, received_header
from relay.model import QueueIds, Transaction
from relay.stats.ring import Histogram
from relay.timers import LazyTimer

log = logging.getLogger("relay.intake")

# aiosmtpd logs every command at INFO; our own log says what matters.
logging.getLogger("mail.log").setLevel(logging.WARNING)

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR, "exception": logging.ERROR, "critical": logging.CRITICAL}
_aiosmtpd_sanitized_log = aiosmtpd.smtp.sanitized_log


def _sanitized_log_if_enabled(func, msg, *args, **kwargs) -> None:
    """aiosmtpd's sanitized_log, asked first whether the record would be
    logged at all: it matches every command line against its AUTH pattern
    (twice per command) before the logger drops the record."""
    logger = getattr(func, "__self__", None)
    if isinstance(logger, logging.Logger) and not logger.isEnabledFor(
            _LEVELS.get(func.__name__, logging.CRITICAL)):
        return
    _aiosmtpd_sanitized_log(func, msg, *args, **kwargs)


aiosmtpd.smtp.sanitized_log = _sanitized_log_if_enabled

NULL_SENDER = "<>"  # how an empty reverse-path sits in envelope.mail_from
DATA_WATCH_INTERVAL = 1.0  # seconds between checks of a DATA transfer's progress
FREE_SPACE_CACHE = 1.0  # seconds a statvfs() reading is trusted

Accept = Callable[[Transaction], Awaitable[None]]


class IntakeState:
    """What the sessions of one worker share: settings, limits, counters."""

    def __init__(
        self,
        settings: Settings,
        worker: int,
        accept: Accept,
        tls_context: ssl.SSLContext | None = None,
        clients: ClientView | None = None,
    ) -> None:
        self.worker = worker
        self.accept = accept
        # Ids must differ across a cluster's hosts too: a part from another
        # host is stored under the id its intake gave it.  The generator
        # byte is host * 16 + worker: distinct for up to 16 hosts of up to
        # 16 workers (beyond, ids still differ by time and counter).
        cluster = settings.cluster
        self.queue_ids = QueueIds(cluster.index * 16 + worker % 16 if cluster.hosts > 1 else worker)
        self.sessions: set[RelaySMTP] = set()
        self.connections: collections.Counter[str] = collections.Counter()
        # The other workers' counts per client IP (None: this worker alone).
        self.clients = clients
        self.draining = False
        self.traced: frozenset[str] = frozenset()  # addresses `relayctl trace add` named
        self.counters: collections.Counter[str] = collections.Counter()  # names of stats.ring
        self.data_to_250 = Histogram()
        self.data_bytes = 0  # bytes of DATA held by every session of this worker
        self._free_checked = 0.0
        self._low_disk = False
        self.apply(settings, tls_context)

    def apply(self, settings: Settings, tls_context: ssl.SSLContext | None) -> None:
        """Take new settings (SIGHUP): later sessions see them."""
        self.settings = settings
        self.intake = settings.intake
        self.hostname = settings.hostname
        self.tls_context = tls_context
        self.authenticator = Authenticator(settings.intake.users)
        if self.clients is not None:
            self.clients.horizon = settings.intake.auth_lockout
        self.lockout = FailureLockout(settings.intake.max_auth_failures, settings.intake.auth_lockout,
                                      shared=self.clients)
        self.handler = Handler(self)  # stateless: one for every session

    def admit(self, ip: str) -> str | None:
        """The refusal for a new connection, or None to serve it."""
        if self.draining:
            return replies.S421_SHUTTING_DOWN
        sessions = self.connections[ip]
        if self.clients is not None:
            sessions += self.clients.other_sessions(ip)
        if sessions >= self.intake.max_connections_per_ip:
            self.counters["rejected_connection_limit"] += 1
            return replies.S421_TOO_MANY_CONNECTIONS
        if self.lockout.is_locked(ip):
            self.counters["rejected_auth_lockout"] += 1
            return replies.S421_AUTH_LOCKED
        return None

    def low_disk(self) -> bool:
        now = time.monotonic()
        if now - self._free_checked > FREE_SPACE_CACHE:
            self._free_checked = now
            try:
                stat = os.statvfs(self.settings.relay.spool_dir)
                self._low_disk = stat.f_bavail * stat.f_frsize < self.intake.min_free_space
            except OSError:
                self._low_disk = True
        return self._low_disk

    async def authenticate(self, session, mechanism: str, auth_data) -> AuthResult:
        if mechanism not in ("PLAIN", "LOGIN") or not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        ip = session.peer[0]
        loop = asyncio.get_running_loop()
        if await self.authenticator.check_async(auth_data.login, auth_data.password, loop):
            return AuthResult(success=True, auth_data=auth_data.login.decode("utf-8"))
        self.lockout.failed(ip)
        self.counters["rejected_auth"] += 1
        user = auth_data.login.decode("utf-8", "replace")[:64]
        log.warning("AUTH %s failed for user %r from [%s]", mechanism, user, ip)
        if self.lockout.is_locked(ip):
            log.warning("AUTH: [%s] locked out for %.0fs after %d failures",
                        ip, self.lockout.lockout, self.lockout.max_failures)
        return AuthResult(success=False, handled=False)

    def drain(self) -> None:
        """SIGTERM: refuse new sessions, let the ones in flight finish."""
        self.draining = True
        for session in list(self.sessions):
            session.drain()

    def user_class(self, name) -> str:
        """The class ``[[intake.users]]`` gives an AUTH user's mail ("": none)."""
        for user in self.intake.users:
            if user.name == name:
                return user.class_
        return ""

    def factory(self, lane: str = "") -> RelaySMTP:
        """A session; ``lane``: the class of its listener (``[[listen]] class``)."""
        intake = self.intake
        return RelaySMTP(
            self.handler,
            state=self,
            lane=lane,
            data_size_limit=intake.max_message_size,
            enable_SMTPUTF8=True,
            hostname=self.hostname,
            ident="ESMTP relay",
            tls_context=self.tls_context,
            timeout=intake.idle_timeout,
            auth_require_tls=True,
            # Never called: RelaySMTP._authenticate takes over, so that the
            # check can await scrypt on an executor.
            authenticator=_never_called,
        )


def _never_called(*args) -> AuthResult:
    raise AssertionError("RelaySMTP._authenticate replaces aiosmtpd's authenticator call")


_TRACE_HEADER = re.compile(rb"^x-relay-trace:[ \t]*1[ \t]*$", re.IGNORECASE | re.MULTILINE)


def wants_trace(content: bytes, recipients: list[str], traced: frozenset[str]) -> bool:
    """Trace this message: it asks for it in its header, or a recipient is traced."""
    end = content.find(b"\r\n\r\n")
    head = content if end < 0 else content[: end + 2]
    if b"-trace:" in head.lower() and _TRACE_HEADER.search(head.replace(b"\r\n", b"\n")):
        return True
    return bool(traced) and any(r.lower() in traced for r in recipients)


class Handler:
    """The aiosmtpd hooks: the decisions of a session."""

    def __init__(self, state: IntakeState) -> None:
        self.state = state

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        capabilities = [line for line in responses[:-1]]
        if not self.state.intake.users:
            capabilities = [line for line in capabilities if not line.startswith("250-AUTH")]
        capabilities += ["250-PIPELINING", "250-ENHANCEDSTATUSCODES", "250 HELP"]
        return capabilities

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        state = self.state
        if state.draining:
            server.close_after_reply = True
            return replies.S421_SHUTTING_DOWN
        if state.low_disk():
            state.counters["rejected_low_disk"] += 1
            return replies.S452_LOW_DISK
        if address != NULL_SENDER and not address.isascii() and "SMTPUTF8" not in mail_options:
            return replies.S553_UTF8_NEEDS_SMTPUTF8
        path = server.last_path
        envelope.mail_from = path.address if path is not None else NULL_SENDER
        envelope.mail_options.extend(mail_options)
        return replies.S250_SENDER_OK

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        state = self.state
        if len(envelope.rcpt_tos) >= state.intake.max_recipients:
            state.counters["rejected_too_many_recipients"] += 1
            return replies.S452_TOO_MANY_RCPTS
        path = server.last_path
        if path is None:  # RCPT TO:<>
            return replies.S553_BAD_RCPT
        if not path.address.isascii() and not envelope.smtp_utf8:
            return replies.S553_UTF8_NEEDS_SMTPUTF8
        may_relay = session.authenticated or policy.is_trusted(
            session.peer[0], state.intake.mynetworks
        )
        refusal = policy.check_recipient(path, may_relay=may_relay)
        if refusal is not None:
            state.counters["rejected_relay"] += 1
            trick = policy.relay_trick(path)
            log.warning(
                "refused RCPT <%s> from [%s]%s", path.address, session.peer[0],
                f" ({trick})" if trick else "",
            )
            return refusal
        try:
            policy.routing_domain(path.domain)
        except policy.BadDomain:
            return replies.S553_BAD_DOMAIN
        envelope.rcpt_tos.append(path.address)
        return replies.S250_RCPT_OK

    async def handle_DATA(self, server, session, envelope):
        state = self.state
        queue_id = state.queue_ids.next()
        now = time.time()
        received = received_header(
            helo=session.host_name or "unknown",
            peer_ip=session.peer[0],
            hostname=state.hostname,
            protocol=protocol_name(
                session.extended_smtp, session.ssl is not None, bool(session.authenticated)
            ),
            queue_id=queue_id,
            recipients=envelope.rcpt_tos,
            when=now,
        )
        sender = "" if envelope.mail_from == NULL_SENDER else envelope.mail_from
        try:
            labels = lane.choose(
                envelope.content, listener=server.lane,
                user=state.user_class(session.auth_data) if session.authenticated else "",
            )
        except lane.BadLabel as exc:
            state.counters["rejected_data"] += 1
            return exc.reply
        transaction = Transaction(
            queue_id=queue_id,
            sender=sender,
            recipients=tuple(envelope.rcpt_tos),
            body=received + envelope.content,
            received_at=now,
            smtputf8=envelope.smtp_utf8,
            trace=wants_trace(envelope.content, envelope.rcpt_tos, state.traced),
            lane=labels.lane,
            campaign=labels.campaign,
            tenant=labels.tenant,
        )
        try:
            await state.accept(transaction)
        except RelayError as exc:
            state.counters["rejected_spool"] += 1
            log.warning("%s: not accepted: %s", queue_id, exc)
            return replies.S451_TRY_AGAIN
        state.counters["accepted_messages"] += 1
        state.counters["accepted_recipients"] += len(envelope.rcpt_tos)
        state.counters[f"accepted_{labels.lane}"] += len(envelope.rcpt_tos)
        state.counters["accepted_bytes"] += len(transaction.body)
        log.info(
            "%s: accepted from=<%s> nrcpt=%d size=%d client=[%s] class=%s%s%s",
            queue_id, sender, len(envelope.rcpt_tos), len(transaction.body), session.peer[0],
            labels.lane, f" campaign={labels.campaign}" if labels.campaign else "",
            " trace" if transaction.trace else "",
        )
        return replies.queued(queue_id)


async def _settled(result):
    """An AuthResult, awaiting it first when it is our coroutine."""
    return await result if asyncio.iscoroutine(result) else result


# Replies never held back for pipelining: the client must see them before it
# sends more, or aiosmtpd closes the connection right after them (a held
# reply would be lost with the connection).
_SENT_AT_ONCE = (
    b"220", b"221", b"3", b"421",
    b"502 5.5.1 Too many unrecognized commands",  # aiosmtpd's BOGUS_LIMIT goodbye
)


class RelaySMTP(SMTP):
    """aiosmtpd's session, narrowed to what a production relay must do."""

    def __init__(self, handler: Handler, *, state: IntakeState, lane: str = "", **kwargs) -> None:
        super().__init__(handler, **kwargs)
        self.state = state
        self.lane = lane  # the listener's class ("" = none)
        self.last_path: policy.Path | None = None
        self.close_after_reply = False
        self._refused = False
        self._counted_ip: str | None = None
        self._raw_250 = False  # EHLO/HELO lines carry no enhanced code
        self._held_replies: list[bytes] = []  # replies to pipelined commands, not sent yet
        self._in_transaction = False
        self._data_watch: asyncio.TimerHandle | None = None
        self._bytes_in = 0  # every byte received, partial lines included
        self._data_started = 0.0
        self._data_start_bytes = 0
        self._data_seen = 0
        self._idle = LazyTimer(self._timeout_cb)  # the idle limit; _reset_timeout moves it

    # -- connection life ----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.transport is None:  # the TCP connection (not STARTTLS' second call)
            ip = (transport.get_extra_info("peername") or ("?",))[0]
            refusal = self.state.admit(ip)
            if refusal is not None:
                self._refused = True
                transport.write(refusal.encode("ascii") + b"\r\n")
                transport.close()
                return
            self._counted_ip = ip
            self.state.connections[ip] += 1
            if self.state.clients is not None:
                self.state.clients.set_sessions(ip, self.state.connections[ip])
            self.state.sessions.add(self)
            self.state.counters["connections"] += 1
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        if self._refused:
            return
        self._stop_data_watch()
        if self._counted_ip is not None:
            ip, self._counted_ip = self._counted_ip, None
            self.state.connections[ip] -= 1
            if self.state.clients is not None:
                self.state.clients.set_sessions(ip, max(self.state.connections[ip], 0))
            if self.state.connections[ip] <= 0:
                del self.state.connections[ip]
            self.state.sessions.discard(self)
        super().connection_lost(error)

    def data_received(self, data: bytes) -> None:
        self._bytes_in += len(data)
        super().data_received(data)

    def drain(self) -> None:
        """Close now if idle; otherwise after the transaction in flight."""
        if self._in_transaction or (self.envelope is not None and self.envelope.mail_from):
            self.close_after_reply = True
        else:
            self._close_with(replies.S421_SHUTTING_DOWN)

    def _close_with(self, reply: str) -> None:
        if self.transport is not None and not self.transport.is_closing():
            held, self._held_replies = b"".join(self._held_replies), []
            self.transport.write(held + reply.encode("ascii") + b"\r\n")
            self.transport.close()

    # -- replies ------------------------------------------------------------

    async def push(self, status) -> None:
        """Send a reply.  While the client has pipelined more complete
        commands, replies are held and go out together with the last one
        (one write instead of one per command, as Postfix's smtpd does);
        replies the client must see before it sends more (220, 3xx) and
        those after which aiosmtpd hangs up (221, 421, its 502 for too many
        unknown commands) always go at once: ``_SENT_AT_ONCE``."""
        if isinstance(status, str):
            if not (self._raw_250 and status.startswith("250")):
                status = replies.enhance(status)
            # Client text that aiosmtpd decoded with surrogateescape must not
            # make a reply fail to encode (an internal error per command).
            status = status.encode("utf-8", "replace")
        self._held_replies.append(status + b"\r\n")
        if status[3:4] == b"-":
            return  # a line of a multi-line reply: the rest follows at once
        if not status.startswith(_SENT_AT_ONCE) and self._pipelined():
            return
        await self._flush_replies()
        if self.close_after_reply and not self._in_transaction and self.transport is not None:
            if not status.startswith(b"421"):
                self._held_replies.append(replies.S421_SHUTTING_DOWN.encode() + b"\r\n")
                await self._flush_replies()
            self.transport.close()

    def _pipelined(self) -> bool:
        # StreamReader has no public peek; a complete line in its buffer is a
        # command the client sent without waiting for this reply.
        return b"\n" in self._reader._buffer

    async def _flush_replies(self) -> None:
        data, self._held_replies = b"".join(self._held_replies), []
        if self.transport is None or self.transport.is_closing():
            return
        self._writer.write(data)
        await self._writer.drain()

    async def handle_exception(self, error: Exception) -> str:
        # aiosmtpd would answer "500 Error: (Type) text": never show internals.
        log.exception("internal error in session from %s", self.session and self.session.peer)
        self._in_transaction = False
        self._set_post_data_state()
        return replies.S451_TRY_AGAIN

    async def smtp_EHLO(self, hostname: str) -> None:
        self._raw_250 = True
        try:
            await super().smtp_EHLO(hostname)
        finally:
            self._raw_250 = False

    async def smtp_HELO(self, hostname: str) -> None:
        self._raw_250 = True
        try:
            await super().smtp_HELO(hostname)
        finally:
            self._raw_250 = False

    # aiosmtpd's auth_PLAIN / auth_LOGIN parse the credentials, then return
    # self._authenticate(...) synchronously; ours returns a coroutine, which
    # these overrides await, so the scrypt check never blocks the loop.
    def _authenticate(self, mechanism: str, auth_data):
        return self.state.authenticate(self.session, mechanism, auth_data)

    async def auth_PLAIN(self, _, args):
        return await _settled(await super().auth_PLAIN(_, args))

    async def auth_LOGIN(self, _, args):
        return await _settled(await super().auth_LOGIN(_, args))

    def _hung_up(self) -> bool:
        """The connection is closing (QUIT, a goodbye, a drop) while
        commands the client pipelined are still buffered.  aiosmtpd's loop
        goes on reading them until it next waits for the network, so the
        verbs that change state check this first: nothing is accepted once
        no reply can reach the client (which would then send it again)."""
        return self.transport is None or self.transport.is_closing()

    async def smtp_AUTH(self, arg: str) -> None:
        if self._hung_up():
            return
        ip = self.session.peer[0]
        if self.state.lockout.is_locked(ip):
            await self.push(replies.S421_AUTH_LOCKED)
            self.transport.close()
            return
        await super().smtp_AUTH(arg)
        if self.state.lockout.is_locked(ip) and self.transport is not None:
            await self.push(replies.S421_AUTH_LOCKED)
            self.transport.close()

    # -- paths --------------------------------------------------------------

    def _getaddr(self, arg: str):
        """RFC 5321 path parsing (aiosmtpd uses RFC 5322's header grammar,
        which silently drops source routes)."""
        try:
            path, rest = policy.parse_path(arg, utf8=True)
        except policy.PathError:
            self.last_path = None
            return None, None
        self.last_path = path
        if path is None:
            return NULL_SENDER, rest
        return path.address, rest

    async def smtp_MAIL(self, arg: str | None) -> None:
        if self._hung_up():
            return
        await super().smtp_MAIL(arg)
        if self.envelope is not None and self.envelope.mail_from:
            self._in_transaction = True

    async def smtp_RCPT(self, arg: str | None) -> None:
        if self._hung_up():
            return
        await super().smtp_RCPT(arg)

    async def smtp_RSET(self, arg: str) -> None:
        self._in_transaction = False
        await super().smtp_RSET(arg)

    # -- DATA ---------------------------------------------------------------

    async def smtp_DATA(self, arg: str) -> None:
        if self._hung_up():
            return
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        if not self.envelope.rcpt_tos:
            await self.push("503 5.5.1 Need RCPT command")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        state = self.state
        intake = state.intake
        if state.data_bytes >= intake.max_data_memory:
            # Backpressure: the client retries later; memory does not grow.
            state.counters["rejected_memory"] += 1
            await self.push(replies.S451_LOW_MEMORY)
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        reader = DataReader(
            max_size=intake.max_message_size,
            normalize=intake.bare_line_endings == "normalize",
            max_received=intake.max_received_headers,
            reader_limit=self.line_length_limit,
        )
        self._start_data_watch()
        held = 0  # what this session adds to state.data_bytes, given back below
        try:
            try:
                while self.transport is not None:
                    try:
                        line = await self._reader.readuntil(b"\r\n")
                    except asyncio.LimitOverrunError as exc:
                        line = await self._reader.read(exc.consumed)
                        reader.feed_overrun(line)
                        held += len(line)
                        state.data_bytes += len(line)
                        continue
                    held += len(line)
                    state.data_bytes += len(line)
                    if reader.feed_line(line):
                        break
                    # The lines that arrived with it, in one call (the reader's
                    # buffer: see _pipelined); readexactly returns at once.
                    size = whole_lines(self._reader._buffer)
                    if size:
                        block = await self._reader.readexactly(size)
                        held += size
                        state.data_bytes += size
                        if reader.feed_block(block):
                            break
            finally:
                self._stop_data_watch()
            verdict, body = reader.finish()
            if verdict is None:
                ended = time.monotonic()
                self.envelope.content = self.envelope.original_content = body
                verdict = await self._call_handler_hook("DATA")
                state.data_to_250.observe(time.monotonic() - ended)
            else:
                state.counters["rejected_data"] += 1
        finally:
            state.data_bytes -= held
        self._set_post_data_state()
        self._in_transaction = False
        await self.push(verdict)

    def _start_data_watch(self) -> None:
        self._data_start_bytes = self._data_seen = self._bytes_in
        self._data_started = self.loop.time()
        self._data_watch = self.loop.call_later(DATA_WATCH_INTERVAL, self._check_data_progress)

    def _stop_data_watch(self) -> None:
        if self._data_watch is not None:
            self._data_watch.cancel()
            self._data_watch = None

    def _check_data_progress(self) -> None:
        """Every second of DATA: keep the idle timer fed while bytes arrive,
        and drop a client slower than intake.min_data_rate."""
        intake = self.state.intake
        elapsed = self.loop.time() - self._data_started
        if self._bytes_in > self._data_seen:
            self._data_seen = self._bytes_in
            self._reset_timeout()
        if (
            intake.min_data_rate
            and elapsed > intake.data_rate_grace
            and (self._bytes_in - self._data_start_bytes) / elapsed < intake.min_data_rate
        ):
            log.warning("dropping %s: DATA slower than %d B/s", self.session.peer, intake.min_data_rate)
            self.state.counters["rejected_slow_data"] += 1
            self._data_watch = None
            self._close_with(replies.S421_TOO_SLOW)
            return
        self._data_watch = self.loop.call_later(DATA_WATCH_INTERVAL, self._check_data_progress)

    def _reset_timeout(self, duration: float | None = None) -> None:
        """The idle limit starts again (aiosmtpd calls this for every
        command, and made a new timer each time): one timer for the session,
        in the attribute aiosmtpd cancels when the connection goes."""
        self._idle.set(self.loop.time() + (duration or self._timeout_duration))
        self._timeout_handle = self._idle

    def _timeout_cb(self) -> None:
        # aiosmtpd closes silently; RFC 5321 4.5.3.2 wants a 421 first.
        self._close_with(replies.S421_IDLE)
        super()._timeout_cb()
