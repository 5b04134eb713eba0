"""The fake internet: an authoritative DNS server and a farm of SMTP sinks on loopback.

Job: give the test suite and the perf harness real servers for the relay's
delivery engine to talk to, without any network beyond 127.0.0.0/8.
Input: zones and sink behaviours, set from Python and changeable at any
time.  Output: real DNS over UDP and TCP on one port, real SMTP (STARTTLS
included) on many loopback addresses sharing one port, and a record of
everything each server was asked and received.

``FakeDNS``
    Authoritative for a few apexes (``example``, ``test``, ...).  Names
    with records answer them, names without the asked type answer
    NOERROR/NODATA, unknown names under an apex answer NXDOMAIN (both with
    the apex SOA in the authority section, for negative caching), names
    outside every apex are REFUSED.  Per-name faults override all that:
    NXDOMAIN, SERVFAIL, or no answer at all.  A UDP answer larger than 512
    bytes (or the query's EDNS size) is truncated with TC set, so a
    resolver retries over TCP, which answers in full.  Messages are parsed
    and rendered by dnspython; only the lookup is ours.

``SinkFarm`` / ``Sink``
    One SMTP server per loopback address (127.0.0.10, 127.0.0.11, ...), all
    on the farm's port, which is what ``[deliver] mx_port`` points at.
    Each sink has a ``Behaviour`` (replies by pattern at MAIL/RCPT/DATA,
    421 after K messages, slow greeting and replies, a drop in DATA, a 554
    greeting, STARTTLS good, bad or absent, PIPELINING on or off) and can
    be taken down (its listening socket closed, so connections are
    refused) and brought back.  What each sink accepted is kept as
    ``Received`` records, byte-exact.

``FakeInternet``
    Both of the above, with helpers that create an MX domain in one call.

Why aiosmtpd (and where it is narrowed): aiosmtpd already is a correct
SMTP server whose DATA reader keeps the bytes as sent (dot-unstuffed, CRLF
kept, bare LF and 8-bit data untouched) and whose handler hooks return
reply strings, which is exactly what the reply rules need.  The few
behaviours a handler cannot express are small overrides in ``_SinkSMTP``:
``push`` (delays; a 421 closes the connection, as RFC 5321 3.8 says),
``data_received`` (the drop after N bytes of DATA), ``_handle_client``
(a 5xx greeting, after which only QUIT is served, RFC 5321 3.1),
``smtp_STARTTLS`` (the abort and 454 modes) and ``smtp_DATA`` (aiosmtpd's
rules, read a block at a time: relay.testing.sinkdata).  ``push`` also
holds the replies to pipelined commands and writes them together, as a
production MX does: the sinks stand in for other machines, yet share the
benchmarks' cores.  A protocol of our own would have duplicated aiosmtpd's
command parser to gain nothing.

Runtime: each service runs either on the caller's event loop
(``await x.start()`` / ``await x.stop()``, or ``async with``) or on a
private loop in a background thread (``x.start_in_thread()`` /
``x.stop_thread()``, or ``with``), because the relay under test runs in
other processes and much test code is synchronous.  Every public method is
synchronous and safe from any thread (one editing thread at a time): zone
entries and behaviours are immutable values swapped whole, and the few
operations that touch the loop (opening and closing listening sockets) run
on it and are waited for.  Listening sockets are bound and listening as
soon as a sink is added, so a connection made right after ``add_sink()``
is queued in the backlog rather than refused.

``smtp_BDAT`` serves CHUNKING (RFC 3030) where ``Behaviour.chunking``
offers it, as the large providers' MXes do; aiosmtpd has no BDAT.

Not served: AUTH, BINARYMIME, IPv6 sinks, CNAME chasing (a CNAME is
answered as is).  A line over 1000 octets in DATA gets aiosmtpd's
``500 Line too long`` after the data, as a strict MX would answer.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import datetime
import errno
import ipaddress
import itertools
import logging
import os
import re
import shutil
import socket
import ssl
import tempfile
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.MX
import dns.rdtypes.ANY.TXT
import dns.rdtypes.IN.A
import dns.rdtypes.IN.AAAA
import dns.rrset
from aiosmtpd.smtp import DATA_SIZE_DEFAULT, MISSING, SMTP, TLSSetupException, syntax

from relay.testing.sinkdata import NOMINAL, TOO_LONG, DataCollector, read_data

__all__ = [
    "Behaviour",
    "FakeDNS",
    "FakeInternet",
    "Received",
    "Rule",
    "Sink",
    "SinkFarm",
]

log = logging.getLogger("relay.testing.fakenet")

LOOPBACK = ipaddress.ip_network("127.0.0.0/8")
CALL_TIMEOUT = 30.0  # seconds a cross-thread call into a service's loop may take
LISTEN_BACKLOG = 1024
ACCEPT_BURST = 64  # connections accepted per readiness event before yielding

# -- DNS ---------------------------------------------------------------------

DEFAULT_APEXES = ("example", "test", "invalid", "example.com", "example.net", "example.org")
NXDOMAIN = "nxdomain"
SERVFAIL = "servfail"
TIMEOUT = "timeout"
UDP_PLAIN_LIMIT = 512  # RFC 1035 4.2.1: UDP without EDNS
TCP_LIMIT = 65535
TXT_CHUNK = 255  # RFC 1035 3.3.14: one character-string

_IN = dns.rdataclass.IN

# -- SMTP reply catalogue (aiosmtpd testing/statuscodes.py style) -------------

S220_TLS_READY = "220 2.0.0 Ready to start TLS"
S221_BYE = "221 2.0.0 Bye"
S250_OK = "250 2.0.0 OK"
S250_SENDER_OK = "250 2.1.0 Sender OK"
S250_RCPT_OK = "250 2.1.5 Recipient OK"
S421_NO_SERVICE = "421 4.3.2 Service not available, closing channel"
S421_TOO_MANY_MESSAGES = "421 4.7.0 Too many messages on this connection, try later"
S451_TRY_LATER = "451 4.3.0 Try later"
S451_SINK_ERROR = "451 4.3.0 Error in the fake sink"
S454_TLS_UNAVAILABLE = "454 4.7.0 TLS not available due to temporary reason"
S503_ONLY_QUIT = "503 5.5.1 Bad sequence of commands: no service here, only QUIT"
S550_NO_SUCH_USER = "550 5.1.1 No such user"
S554_NO_SERVICE = "554 5.7.1 No SMTP service here"

# STARTTLS modes of a sink (Behaviour.tls).
TLS_OFF = "off"  # STARTTLS not offered
TLS_ON = "on"  # offered, certificate signed by the farm's test CA
TLS_WRONG_CERT = "wrong-cert"  # offered, certificate signed by another CA
TLS_ABORT = "abort"  # offered, "220 Ready" then the connection is dropped
TLS_UNAVAILABLE = "unavailable"  # offered, answered 454
TLS_MODES = (TLS_OFF, TLS_ON, TLS_WRONG_CERT, TLS_ABORT, TLS_UNAVAILABLE)

RULE_STAGES = ("MAIL", "RCPT", "DATA")
_REPLY = re.compile(r"^[2-5][0-9][0-9]( |$)")


# -- runtime: the caller's loop or a thread of our own --------------------------


class _LoopThread:
    """An event loop running forever in a daemon thread."""

    def __init__(self, loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None) -> None:
        self.loop = (loop_factory or asyncio.new_event_loop)()
        self.thread = threading.Thread(target=self._run, name="fakenet", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run(self, coro, timeout: float = CALL_TIMEOUT):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        async def cancel_the_rest() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        self.run(cancel_the_rest())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(CALL_TIMEOUT)
        self.loop.close()


class _Service:
    """Start/stop on the caller's loop or in a thread; calls into that loop."""

    _loop: asyncio.AbstractEventLoop | None = None
    _loop_thread_id: int | None = None
    _own_thread: _LoopThread | None = None

    async def start(self):
        if self._loop is not None:
            raise RuntimeError(f"{type(self).__name__} is already running")
        self._loop = asyncio.get_running_loop()
        self._loop_thread_id = threading.get_ident()
        await self._start()
        return self

    async def stop(self) -> None:
        if self._loop is None:
            return
        try:
            await self._stop()
        finally:
            self._loop = self._loop_thread_id = None

    def start_in_thread(self, loop_factory=None):
        """Run on a private loop in a daemon thread (e.g. ``uvloop.new_event_loop``)."""
        thread = _LoopThread(loop_factory)
        try:
            thread.run(self.start())
        except BaseException:
            thread.close()
            raise
        self._own_thread = thread
        return self

    def stop_thread(self) -> None:
        thread, self._own_thread = self._own_thread, None
        if thread is None:
            return
        try:
            thread.run(self.stop())
        finally:
            thread.close()

    @property
    def running(self) -> bool:
        return self._loop is not None

    def __enter__(self):
        return self.start_in_thread()

    def __exit__(self, *exc_info) -> None:
        self.stop_thread()

    async def __aenter__(self):
        return await self.start()

    async def __aexit__(self, *exc_info) -> None:
        await self.stop()

    def _in_loop_thread(self) -> bool:
        return threading.get_ident() == self._loop_thread_id

    def _in_loop(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Call ``fn(*args)`` on the service's loop and return its result.

        Not running, or already on the loop's thread: a plain call.  From any
        other thread: scheduled on the loop and waited for, so the caller
        sees the effect (a socket closed, say) when this returns.
        """
        loop = self._loop
        if loop is None or self._in_loop_thread():
            return fn(*args)
        done: concurrent.futures.Future = concurrent.futures.Future()

        def call() -> None:
            if not done.set_running_or_notify_cancel():
                return
            try:
                done.set_result(fn(*args))
            except BaseException as exc:  # handed to the waiting thread
                done.set_exception(exc)

        loop.call_soon_threadsafe(call)
        return done.result(CALL_TIMEOUT)

    async def _start(self) -> None:
        raise NotImplementedError

    async def _stop(self) -> None:
        raise NotImplementedError


# -- FakeDNS -----------------------------------------------------------------


def _name(text: str | dns.name.Name) -> dns.name.Name:
    if isinstance(text, dns.name.Name):
        return text if text.is_absolute() else text.concatenate(dns.name.root)
    return dns.name.from_text(text.rstrip(".") + ".")


def _key(name: dns.name.Name) -> str:
    """How a name appears in the query counters: lower case, no final dot."""
    return name.to_text(omit_final_dot=True).lower()


class FakeDNS(_Service):
    """An authoritative DNS server for synthetic domains, UDP and TCP on one port.

    ``dns.start_in_thread()`` (or ``await dns.start()``), then
    ``dns.address == ("127.0.0.1", port)``; the relay's ``[dns]
    nameservers`` entry is ``dns.nameserver``.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        apexes: Iterable[str] = DEFAULT_APEXES,
        negative_ttl: int = 5,
    ) -> None:
        if ipaddress.ip_address(host) not in LOOPBACK:
            raise ValueError(f"FakeDNS binds to 127.0.0.0/8 only, not {host}")
        self.host = host
        self.port = port
        self.negative_ttl = negative_ttl  # short: tests change zones and re-ask
        # name -> {rdtype: RRset}.  The outer dicts change by single (atomic)
        # item assignments; a node and its RRsets are replaced, never mutated,
        # so the loop thread can render an answer while another thread edits.
        self._records: dict[dns.name.Name, dict[int, dns.rrset.RRset]] = {}
        self._faults: dict[dns.name.Name, str] = {}
        self._apexes: dict[dns.name.Name, dns.rrset.RRset] = {}  # apex -> its SOA
        # Owner names and their ancestors up to the apex: a name in between
        # (an empty non-terminal) answers NODATA, not NXDOMAIN (RFC 8020).
        self._existing: set[dns.name.Name] = set()
        self.queries: collections.Counter[tuple[str, str]] = collections.Counter()
        self.transports: collections.Counter[str] = collections.Counter()  # "udp" / "tcp"
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.AbstractServer | None = None
        self._tcp_writers: set[asyncio.StreamWriter] = set()
        for apex in apexes:
            self.add_apex(apex)

    # -- zone content ---------------------------------------------------------

    def add_apex(self, apex: str) -> None:
        """Become authoritative for ``apex`` and everything below it."""
        name = _name(apex)
        if name == dns.name.root:
            raise ValueError("the root cannot be an apex")
        text = name.to_text()
        soa = dns.rrset.from_text(
            name, self.negative_ttl, _IN, dns.rdatatype.SOA,
            f"ns.{text} hostmaster.{text} 1 3600 600 86400 {self.negative_ttl}",
        )
        self._apexes[name] = soa
        self._existing.add(name)

    def add_mx(self, domain: str, exchanges: Sequence[tuple[int, str]], ttl: int = 300) -> None:
        """Add MX records ``[(preference, host), ...]`` (a null MX is replaced)."""
        name = self._in_zone(domain)
        rdatas = [
            dns.rdtypes.ANY.MX.MX(_IN, dns.rdatatype.MX, int(preference), _name(host))
            for preference, host in exchanges
        ]
        current = self._records.get(name, {}).get(dns.rdatatype.MX)
        if current is not None and any(rd.exchange == dns.name.root for rd in current):
            self.remove(name, "MX")
        self._add(name, dns.rdatatype.MX, rdatas, ttl)

    def add_null_mx(self, domain: str, ttl: int = 300) -> None:
        """``MX 0 .`` (RFC 7505): the domain accepts no mail.  Replaces other MX."""
        name = self._in_zone(domain)
        self.remove(name, "MX")
        null = dns.rdtypes.ANY.MX.MX(_IN, dns.rdatatype.MX, 0, dns.name.root)
        self._add(name, dns.rdatatype.MX, [null], ttl)

    def add_a(self, host: str, ip: str, ttl: int = 300) -> None:
        self._add(self._in_zone(host), dns.rdatatype.A, [dns.rdtypes.IN.A.A(_IN, dns.rdatatype.A, ip)], ttl)

    def add_aaaa(self, host: str, ip: str, ttl: int = 300) -> None:
        rdata = dns.rdtypes.IN.AAAA.AAAA(_IN, dns.rdatatype.AAAA, ip)
        self._add(self._in_zone(host), dns.rdatatype.AAAA, [rdata], ttl)

    def add_txt(self, name: str, text: str | bytes, ttl: int = 300) -> None:
        """One TXT record; text longer than 255 bytes becomes several strings."""
        data = text.encode() if isinstance(text, str) else bytes(text)
        chunks = [data[i : i + TXT_CHUNK] for i in range(0, len(data), TXT_CHUNK)] or [b""]
        rdata = dns.rdtypes.ANY.TXT.TXT(_IN, dns.rdatatype.TXT, chunks)
        self._add(self._in_zone(name), dns.rdatatype.TXT, [rdata], ttl)

    def add_record(self, name: str, rdtype: str, text: str, ttl: int = 300) -> None:
        """Any other record, from its presentation form (``add_record(n, "CNAME", "x.test.")``)."""
        kind = dns.rdatatype.from_text(rdtype)
        self._add(self._in_zone(name), kind, [dns.rdata.from_text(_IN, kind, text)], ttl)

    def remove(self, name: str | dns.name.Name, rdtype: str | None = None) -> None:
        """Drop the records of ``name`` (of one type, or all) and its fault."""
        key = _name(name)
        node = dict(self._records.get(key, {}))
        if rdtype is None:
            node.clear()
            self.clear_fault(key)
        else:
            node.pop(dns.rdatatype.from_text(rdtype), None)
        if node:
            self._records[key] = node
        else:
            self._records.pop(key, None)
            self._reindex()

    def set_nxdomain(self, name: str) -> None:
        """Answer NXDOMAIN for ``name``, whatever records it has."""
        self._set_fault(name, NXDOMAIN)

    def set_servfail(self, name: str) -> None:
        self._set_fault(name, SERVFAIL)

    def set_timeout(self, name: str) -> None:
        """Never answer queries for ``name`` (UDP or TCP)."""
        self._set_fault(name, TIMEOUT)

    def clear_fault(self, name: str | dns.name.Name) -> None:
        self._faults.pop(_name(name), None)

    def query_count(self, name: str, rdtype: str = "MX") -> int:
        return self.queries[(_key(_name(name)), rdtype.upper())]

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    @property
    def nameserver(self) -> str:
        """``host:port``, as ``[dns] nameservers`` takes it."""
        return f"{self.host}:{self.port}"

    def _set_fault(self, name: str, fault: str) -> None:
        self._faults[_name(name)] = fault

    def _apex_of(self, name: dns.name.Name) -> dns.name.Name | None:
        apexes = self._apexes
        while name != dns.name.root:
            if name in apexes:
                return name
            name = name.parent()
        return None

    def _in_zone(self, text: str) -> dns.name.Name:
        name = _name(text)
        if self._apex_of(name) is None:
            raise ValueError(f"{text} is under no apex of this server; add_apex() first")
        return name

    def _add(self, name: dns.name.Name, rdtype: int, rdatas: list, ttl: int) -> None:
        node = self._records.get(name, {})
        rrset = dns.rrset.RRset(name, _IN, rdtype)
        for rdata in node.get(rdtype, ()):
            rrset.add(rdata)
        for rdata in rdatas:
            rrset.add(rdata)
        rrset.ttl = ttl  # the last add sets the TTL of the whole set
        self._records[name] = {**node, rdtype: rrset}
        self._mark_existing(name, self._existing)

    def _mark_existing(self, name: dns.name.Name, existing: set[dns.name.Name]) -> None:
        apex = self._apex_of(name)
        while name != apex and name != dns.name.root and name not in existing:
            existing.add(name)
            name = name.parent()

    def _reindex(self) -> None:
        # Names only shrink on remove(): rebuild, then swap in whole.
        existing = set(self._apexes)
        for name in list(self._records):
            self._mark_existing(name, existing)
        self._existing = existing

    # -- answering ------------------------------------------------------------

    def _answer(self, query: dns.message.Message) -> dns.message.Message | None:
        """The response to one parsed query, or None to stay silent."""
        response = dns.message.make_response(query)
        if query.opcode() != dns.opcode.QUERY:
            response.set_rcode(dns.rcode.NOTIMP)
            return response
        if len(query.question) != 1:
            response.set_rcode(dns.rcode.FORMERR)
            return response
        question = query.question[0]
        name, rdtype = question.name, question.rdtype
        self.queries[(_key(name), dns.rdatatype.to_text(rdtype))] += 1
        fault = self._faults.get(name)
        if fault == TIMEOUT:
            return None
        if fault == SERVFAIL:
            response.set_rcode(dns.rcode.SERVFAIL)
            return response
        apex = self._apex_of(name)
        if apex is None and fault != NXDOMAIN:
            response.set_rcode(dns.rcode.REFUSED)  # not our zone, and we do not recurse
            return response
        response.flags |= dns.flags.AA
        node = self._records.get(name, {})
        if apex == name:
            node = {dns.rdatatype.SOA: self._apexes[apex], **node}
        if fault == NXDOMAIN or (not node and name not in self._existing):
            response.set_rcode(dns.rcode.NXDOMAIN)
        elif rdtype == dns.rdatatype.ANY:
            response.answer.extend(node.values())
        elif rdtype in node:
            response.answer.append(node[rdtype])
        elif dns.rdatatype.CNAME in node:
            response.answer.append(node[dns.rdatatype.CNAME])
        if not response.answer and apex is not None:
            # NXDOMAIN or NODATA: the SOA lets resolvers cache the negative
            # answer (RFC 2308 3).
            response.authority.append(self._apexes[apex])
        return response

    def _respond(self, wire: bytes, transport: str) -> bytes | None:
        self.transports[transport] += 1
        try:
            query = dns.message.from_wire(wire)
            response = self._answer(query)
        except dns.exception.DNSException:
            return _formerr(wire)
        if response is None:
            return None
        if transport == "tcp":
            limit = TCP_LIMIT
        else:
            limit = max(UDP_PLAIN_LIMIT, query.payload) if query.edns >= 0 else UDP_PLAIN_LIMIT
        # Too big: the renderer drops what does not fit and sets TC, so the
        # resolver asks again over TCP (RFC 7766).
        return response.to_wire(max_size=limit, prefer_truncation=True)

    # -- servers --------------------------------------------------------------

    async def _start(self) -> None:
        loop = asyncio.get_running_loop()
        # UDP and TCP must share a port number: bind UDP first (port 0 lets
        # the kernel choose), then TCP on the same number, and try again on
        # the rare clash with someone else's TCP socket.
        for _ in range(20):
            udp, _protocol = await loop.create_datagram_endpoint(
                lambda: _DNSDatagram(self), local_addr=(self.host, self.port)
            )
            port = udp.get_extra_info("sockname")[1]
            try:
                tcp = await asyncio.start_server(self._serve_tcp, self.host, port, reuse_address=True)
            except OSError as exc:
                udp.close()
                if self.port or exc.errno != errno.EADDRINUSE:
                    raise
                continue
            self._udp, self._tcp, self.port = udp, tcp, port
            return
        raise OSError(errno.EADDRINUSE, "no port free for both UDP and TCP")

    async def _stop(self) -> None:
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
        for writer in list(self._tcp_writers):
            writer.close()
        if self._tcp is not None:
            await self._tcp.wait_closed()
        self._udp = self._tcp = None

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._tcp_writers.add(writer)
        try:
            while True:  # RFC 7766: several queries may share a connection
                size = int.from_bytes(await reader.readexactly(2), "big")
                reply = self._respond(await reader.readexactly(size), "tcp")
                if reply is not None:
                    writer.write(len(reply).to_bytes(2, "big") + reply)
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._tcp_writers.discard(writer)
            writer.close()


class _DNSDatagram(asyncio.DatagramProtocol):
    def __init__(self, server: FakeDNS) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        reply = self.server._respond(data, "udp")
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply, addr)


def _formerr(wire: bytes) -> bytes | None:
    """A bare FORMERR header for a query too broken to parse (RFC 1035 4.1.1)."""
    if len(wire) < 12 or wire[2] & 0x80:  # no ID to echo, or a response: never answer those
        return None
    flags = dns.flags.QR | (int.from_bytes(wire[2:4], "big") & dns.flags.RD) | dns.rcode.FORMERR
    return wire[:2] + flags.to_bytes(2, "big") + bytes(8)


# -- sink behaviour ------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """A reply chosen by pattern: ``Rule(r"^bounce", "550 5.1.1 No such user")``.

    ``pattern`` is searched (``re.search``) in the sender at MAIL, in the
    recipient at RCPT, and in each accepted recipient at the end of DATA
    (the rule applies when any matches).  A 2xx reply accepts, with that text.
    """

    pattern: str
    reply: str
    at: str = "RCPT"
    _regex: re.Pattern = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.at not in RULE_STAGES:
            raise ValueError(f"Rule.at must be one of {RULE_STAGES}, not {self.at!r}")
        _check_reply(self.reply)
        object.__setattr__(self, "_regex", re.compile(self.pattern))

    def matches(self, text: str) -> bool:
        return self._regex.search(text) is not None


@dataclass(frozen=True)
class Behaviour:
    """What a sink does.  Frozen: change a sink with ``sink.configure(**changes)``.

    ``tls``, ``smtputf8`` and ``max_size`` apply from the next connection
    (``tls`` also from the next EHLO); everything else from the next reply.
    """

    greeting: str | None = None  # None: "220 <name> ESMTP fakenet"; 5xx refuses, 421 closes
    greeting_delay: float = 0.0  # seconds before the greeting
    reply_delay: float = 0.0  # seconds before every later reply
    data_delay: float = 0.0  # more seconds before the reply to the end of DATA
    # Rule objects, (pattern, reply[, at]) tuples, or {pattern: reply} for RCPT.
    rules: tuple[Rule, ...] = ()
    max_messages: int | None = None  # per connection; then MAIL gets 421 and the connection closes
    max_connections: int | None = None  # open at once; the next ones get a 421 greeting
    max_recipients: int | None = None  # per transaction; later RCPTs get 452 4.5.3
    drop_in_data: int | None = None  # drop the connection after reading this many DATA bytes
    tls: str = TLS_OFF  # one of TLS_MODES
    pipelining: bool = True
    chunking: bool = False  # offer CHUNKING (BDAT); from the next EHLO
    smtputf8: bool = True
    max_size: int | None = DATA_SIZE_DEFAULT  # SIZE; None: no limit, not advertised

    def __post_init__(self) -> None:
        object.__setattr__(self, "rules", _rules(self.rules))
        if self.tls not in TLS_MODES:
            raise ValueError(f"Behaviour.tls must be one of {TLS_MODES}, not {self.tls!r}")
        if self.greeting is not None:
            _check_reply(self.greeting)
        for name in ("greeting_delay", "reply_delay", "data_delay"):
            if getattr(self, name) < 0:
                raise ValueError(f"Behaviour.{name} must not be negative")
        for name in ("max_messages", "drop_in_data", "max_recipients", "max_connections"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"Behaviour.{name} must not be negative")

    def reply_for(self, stage: str, *texts: str) -> str | None:
        """The reply of the first rule of ``stage`` matching any of ``texts``."""
        for rule in self.rules:
            if rule.at == stage and any(rule.matches(text) for text in texts):
                return rule.reply
        return None


def _rules(rules) -> tuple[Rule, ...]:
    if isinstance(rules, Mapping):
        return tuple(Rule(pattern, reply) for pattern, reply in rules.items())
    return tuple(rule if isinstance(rule, Rule) else Rule(*rule) for rule in rules)


def _check_reply(reply: str) -> None:
    if not _REPLY.match(reply):
        raise ValueError(f"not an SMTP reply (three digits 2xx-5xx, then a space): {reply!r}")


@dataclass(frozen=True)
class Received:
    """One message a sink accepted (answered 2xx at the end of DATA)."""

    mail_from: str  # "" for the null sender <>
    rcpt_tos: tuple[str, ...]  # the recipients accepted in this transaction
    data: bytes  # exactly as sent after DATA: dot-unstuffed, line endings kept; b"" if not kept
    peer_ip: str  # the client's source address
    tls: bool  # the transaction ran under STARTTLS
    connection_id: int  # unique in the farm
    sink_ip: str = ""
    helo: str = ""  # the EHLO/HELO name the client gave
    size: int = 0  # len(data), also when the data is not kept
    chunked: bool = False  # sent with BDAT rather than DATA


# -- test PKI --------------------------------------------------------------------


class TestPKI:
    """A test CA and server certificates signed by it (or by a rogue CA)."""

    def __init__(self, directory: str | None = None) -> None:
        self._given_directory = directory
        self._directory: str | None = directory
        self._lock = threading.Lock()
        self._cas: dict[bool, tuple[Any, Any]] = {}  # trusted? -> (cert, key)
        self._contexts: dict[tuple, ssl.SSLContext] = {}
        self._serial = itertools.count(1)

    @property
    def directory(self) -> str:
        if self._directory is None:
            self._directory = tempfile.mkdtemp(prefix="fakenet-pki-")
        return self._directory

    @property
    def ca_cert_path(self) -> str:
        with self._lock:
            self._ca(trusted=True)
            return os.path.join(self.directory, "ca.crt")

    def server_context(self, names: tuple[str, ...], ip: str, trusted: bool) -> ssl.SSLContext:
        key = (names, ip, trusted)
        with self._lock:
            context = self._contexts.get(key)
            if context is None:
                context = self._contexts[key] = self._make_context(names, ip, trusted)
            return context

    def cleanup(self) -> None:
        with self._lock:
            if self._directory is not None and self._given_directory is None:
                shutil.rmtree(self._directory, ignore_errors=True)
            self._directory = self._given_directory
            self._cas.clear()
            self._contexts.clear()

    def _ca(self, trusted: bool):
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        if trusted in self._cas:
            return self._cas[trusted]
        key = ec.generate_private_key(ec.SECP256R1())
        common_name = "fakenet test CA" if trusted else "fakenet rogue CA"
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            _cert_builder(name, name, key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(ca=True), critical=True)
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256())
        )
        if trusted:  # the rogue CA stays in memory: nobody may trust it
            with open(os.path.join(self.directory, "ca.crt"), "wb") as file:
                file.write(cert.public_bytes(serialization.Encoding.PEM))
        self._cas[trusted] = (cert, key)
        return cert, key

    def issue(self, names: tuple[str, ...], ip: str, trusted: bool = True) -> tuple[str, str]:
        """A server certificate for ``names`` and ``ip`` signed by the test CA
        (the rogue one if not ``trusted``): (PEM chain file, PEM key file)."""
        with self._lock:
            return self._issue(names, ip, trusted)

    def _make_context(self, names: tuple[str, ...], ip: str, trusted: bool) -> ssl.SSLContext:
        cert_path, key_path = self._issue(names, ip, trusted)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert_path, key_path)
        return context

    def _issue(self, names: tuple[str, ...], ip: str, trusted: bool) -> tuple[str, str]:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        ca_cert, ca_key = self._ca(trusted)
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0] if names else ip)])
        alt_names = [x509.DNSName(n) for n in names] + [x509.IPAddress(ipaddress.ip_address(ip))]
        ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        cert = (
            _cert_builder(subject, ca_cert.subject, key.public_key())
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(ca=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
            )
            .sign(ca_key, hashes.SHA256())
        )
        # load_cert_chain() reads files only.
        stem = os.path.join(self.directory, f"server-{next(self._serial)}")
        with open(stem + ".crt", "wb") as file:
            file.write(cert.public_bytes(serialization.Encoding.PEM))
        with open(stem + ".key", "wb") as file:
            file.write(
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
        return stem + ".crt", stem + ".key"


def _cert_builder(subject, issuer, public_key):
    from cryptography import x509

    now = datetime.datetime.now(datetime.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
    )


def _key_usage(ca: bool):
    from cryptography import x509

    return x509.KeyUsage(
        digital_signature=not ca, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=ca, crl_sign=ca,
        encipher_only=False, decipher_only=False,
    )


# -- sinks ---------------------------------------------------------------------


class Sink:
    """One SMTP server on ``ip:farm.port``: its behaviour and what it saw."""

    def __init__(self, farm: SinkFarm, ip: str, behaviour: Behaviour, hostnames: Iterable[str]) -> None:
        self.farm = farm
        self.ip = ip
        self.hostnames: tuple[str, ...] = tuple(hostnames)
        self._behaviour = behaviour
        self.received: list[Received] = []
        self.connections_opened = 0
        self.peak_sessions = 0  # the most sessions served at once (421s to extra ones excluded)
        self.busy_refusals = 0  # connections refused with 421 over max_connections
        # connection id -> messages accepted on that connection
        self.transactions: collections.Counter[int] = collections.Counter()
        self.peer_ips: collections.Counter[str] = collections.Counter()  # client IP -> connections
        self._handler = _SinkHandler(self)
        self._sessions: set[_SinkSMTP] = set()
        self._sock: socket.socket | None = None
        self._registered = False
        self._wanted = False  # listening is what the test asked for

    def __repr__(self) -> str:
        return f"<Sink {self.ip}:{self.port} listening={self.listening} received={len(self.received)}>"

    @property
    def port(self) -> int:
        return self.farm.port

    @property
    def hostname(self) -> str:
        """The name in the greeting and EHLO reply (the first MX name, else the IP)."""
        return self.hostnames[0] if self.hostnames else self.ip

    @property
    def behaviour(self) -> Behaviour:
        return self._behaviour

    @behaviour.setter
    def behaviour(self, behaviour: Behaviour) -> None:
        if not isinstance(behaviour, Behaviour):
            raise TypeError("a sink's behaviour is a Behaviour")
        self._behaviour = behaviour

    def configure(self, **changes: Any) -> Behaviour:
        """Change some fields of the behaviour: ``sink.configure(reply_delay=0.5)``."""
        self._behaviour = dataclasses.replace(self._behaviour, **changes)
        return self._behaviour

    def add_hostname(self, name: str) -> None:
        """Another name this host answers to (greeting, certificate SAN)."""
        if name not in self.hostnames:
            self.hostnames += (name,)

    @property
    def listening(self) -> bool:
        return self._wanted

    def start_listening(self) -> None:
        """Open the listening socket (again): connections are accepted."""
        self._wanted = True
        self.farm._in_loop(self._listen)

    def stop_listening(self, drop_connections: bool = True) -> None:
        """The host is down: connections are refused; open ones are dropped."""
        self._wanted = False
        self.farm._in_loop(self._close, drop_connections)

    def reset(self) -> None:
        """Forget what was received and counted (not the behaviour)."""
        with self.farm._changed:
            self.received.clear()
            self.connections_opened = 0
            self.transactions.clear()
            self.peer_ips.clear()

    def wait_received(self, count: int, timeout: float = 10.0) -> list[Received]:
        """Block until this sink holds ``count`` messages; from a thread other than the farm's loop."""
        return self.farm._wait(lambda: self.received, count, timeout)

    @property
    def active_connections(self) -> int:
        return len(self._sessions)

    # -- on the farm's loop -------------------------------------------------------

    def _listen(self) -> None:
        if self._sock is None:
            self._sock = self.farm._bind(self.ip)
        loop = self.farm._loop
        if loop is not None and not self._registered:
            loop.add_reader(self._sock.fileno(), self.farm._accept, self)
            self._registered = True

    def _close(self, drop_connections: bool) -> None:
        if self._sock is not None:
            if self._registered and self.farm._loop is not None:
                self.farm._loop.remove_reader(self._sock.fileno())
            self._sock.close()
        self._sock, self._registered = None, False
        if drop_connections:
            for session in list(self._sessions):
                session.drop()

    def _tls_context(self) -> ssl.SSLContext | None:
        mode = self._behaviour.tls
        if mode == TLS_OFF:
            return None
        # abort/unavailable never reach a handshake; a context only makes
        # aiosmtpd offer STARTTLS.
        return self.farm._pki.server_context(self.hostnames, self.ip, trusted=mode != TLS_WRONG_CERT)


class _SinkHandler:
    """aiosmtpd hooks: replies chosen by the sink's behaviour."""

    def __init__(self, sink: Sink) -> None:
        self.sink = sink

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        # aiosmtpd offers AUTH after STARTTLS; an MX does not.
        keywords = [line[4:] for line in responses if not line[4:].startswith("AUTH")]
        behaviour = self.sink.behaviour
        if behaviour.pipelining:
            keywords.insert(len(keywords) - 1, "PIPELINING")  # before aiosmtpd's closing HELP
        if behaviour.chunking:
            keywords.insert(len(keywords) - 1, "CHUNKING")
        server.chunking = behaviour.chunking
        return [f"250-{k}" for k in keywords[:-1]] + [f"250 {keywords[-1]}"]

    async def handle_HELO(self, server, session, envelope, hostname):
        session.host_name = hostname
        server.chunking = False  # no extensions after HELO
        return f"250 {server.hostname}"

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        behaviour = self.sink.behaviour
        if behaviour.max_messages is not None and server.messages >= behaviour.max_messages:
            return S421_TOO_MANY_MESSAGES
        reply = behaviour.reply_for("MAIL", "" if address == "<>" else address)
        if reply is not None and reply[0] != "2":
            return reply
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return reply or S250_SENDER_OK

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        limit = self.sink.behaviour.max_recipients
        if limit is not None and len(envelope.rcpt_tos) >= limit:
            return "452 4.5.3 Too many recipients"
        reply = self.sink.behaviour.reply_for("RCPT", address)
        if reply is not None and reply[0] != "2":
            return reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return reply or S250_RCPT_OK

    async def handle_DATA(self, server, session, envelope):
        sink = self.sink
        reply = sink.behaviour.reply_for("DATA", *envelope.rcpt_tos)
        if reply is not None and reply[0] != "2":
            return reply
        data = envelope.original_content or b""
        received = Received(
            mail_from="" if envelope.mail_from == "<>" else envelope.mail_from,
            rcpt_tos=tuple(envelope.rcpt_tos),
            data=data if sink.farm.keep_data else b"",
            peer_ip=server.peer_ip,
            tls=session.ssl is not None,
            connection_id=server.connection_id,
            sink_ip=sink.ip,
            helo=session.host_name or "",
            size=len(data),
            chunked=server.chunked_message,
        )
        server.messages += 1
        sequence = sink.farm._record(sink, received)
        return reply or f"250 2.0.0 OK queued as {sequence}"

    async def handle_exception(self, error: Exception) -> str:
        if isinstance(error, TLSSetupException):
            # A client that refuses our certificate (TLS_WRONG_CERT) or hangs
            # up mid-handshake is a scenario here, not a fault.
            log.debug("sink %s: TLS handshake failed: %r", self.sink.ip, error.__cause__)
        else:
            log.error("sink %s: error in a session", self.sink.ip, exc_info=error)
        return S451_SINK_ERROR


_BDAT_ARGS = re.compile(r"([0-9]{1,18})(?: +(LAST))?", re.IGNORECASE)


class _Bdat:
    """One transaction's BDAT chunks; a new envelope (RSET, MAIL, the
    end of a message) starts a new one."""

    __slots__ = ("envelope", "chunks", "read", "failed")

    def __init__(self, envelope: object) -> None:
        self.envelope = envelope
        self.chunks: list[bytes] = []
        self.read = 0  # octets of every chunk so far, refused ones too
        self.failed: str | None = None  # the reply that failed the transaction


class _SinkSMTP(SMTP):
    """aiosmtpd's session with the behaviours a handler cannot express."""

    def __init__(self, sink: Sink, connection_id: int, loop: asyncio.AbstractEventLoop) -> None:
        behaviour = sink.behaviour
        super().__init__(
            sink._handler,
            hostname=sink.hostname,
            ident="ESMTP fakenet",
            tls_context=sink._tls_context(),
            data_size_limit=behaviour.max_size,
            enable_SMTPUTF8=behaviour.smtputf8,
            loop=loop,
        )
        self.sink = sink
        self.connection_id = connection_id
        self.peer_ip = ""
        self.messages = 0  # accepted on this connection
        self._greeted = False
        self._continued = False  # the last line pushed was "NNN-...": no delay before the next
        self._in_data = False  # between our 354 and the reply to the end of DATA
        self._data_left: int | None = None  # DATA bytes still allowed before the drop
        self._held: list[bytes] = []  # replies to pipelined commands, written together
        self.chunking = False  # CHUNKING offered in this session's last EHLO
        self._bdat = _Bdat(None)  # the BDAT transaction under way, if its envelope is current
        self.chunked_message = False  # the message the DATA hook sees came by BDAT

    # -- connection life ------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.transport is None:  # the TCP connection, not STARTTLS' second call
            self.peer_ip = (transport.get_extra_info("peername") or ("",))[0]
            self.sink._sessions.add(self)
            self.sink.farm._opened(self.sink, self)
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        self.sink._sessions.discard(self)
        super().connection_lost(error)

    def drop(self) -> None:
        """Cut the connection without a word (no QUIT, no TLS close_notify)."""
        transport = self._original_transport or self.transport
        if transport is not None:
            transport.abort()

    def data_received(self, data: bytes) -> None:
        if self._in_data and self._data_left is not None:
            if len(data) >= self._data_left:
                super().data_received(data[: self._data_left])
                self.drop()
                return
            self._data_left -= len(data)
        super().data_received(data)

    # -- replies --------------------------------------------------------------

    async def push(self, status) -> None:
        text = status.decode("utf-8", "replace") if isinstance(status, bytes) else status
        behaviour = self.sink.behaviour
        if not self._greeted:
            self._greeted = True
            if behaviour.greeting is not None:
                status = text = behaviour.greeting
            delay = behaviour.greeting_delay
        elif self._continued:
            delay = 0.0  # one delay per reply, not per line of a multi-line reply
        else:
            delay = behaviour.reply_delay + (behaviour.data_delay if self._in_data else 0.0)
        self._continued = text[3:4] == "-"
        self._in_data = False
        if delay:
            if self._held:  # what is answered already goes out before the wait
                await self._write_held()
            await asyncio.sleep(delay)
        if self.transport is None or self.transport.is_closing():
            return  # dropped while we waited: nobody to answer
        code = text[:3]
        if code == "354":  # counted from here: the client may send as soon as it reads this
            self._in_data = True
            self._data_left = behaviour.drop_in_data
        await self._write_reply(status, hold=code not in ("354", "421"))
        if code == "354" and self._data_left == 0:
            self.drop()
        elif code == "421" and not self._continued:
            # RFC 5321 3.8: 421 means the server is closing the channel.
            self.transport.close()

    async def _write_reply(self, status: str | bytes, hold: bool) -> None:
        """aiosmtpd's push, except that the reply waits while the client's
        next command is already here (RFC 2920 pipelining): a transaction of
        100 RCPTs gets its replies in one write, not 100."""
        if isinstance(status, str):
            status = status.encode("utf-8" if self.enable_SMTPUTF8 else "ascii")
        self._held.append(status + b"\r\n")
        if hold and b"\n" in self._reader._buffer:  # noqa: SLF001 - StreamReader has no peek
            return
        await self._write_held()

    async def _write_held(self) -> None:
        data, self._held = b"".join(self._held), []
        if self.transport is None or self.transport.is_closing():
            return
        self._writer.write(data)
        await self._writer.drain()

    async def _handle_client(self) -> None:
        sink = self.sink
        limit = sink.behaviour.max_connections
        if limit is not None and len(sink._sessions) > limit:
            sink._sessions.discard(self)  # refused: not one of the sessions served
            sink.busy_refusals += 1
            await self.push("421 4.7.0 Too many connections, try again later")
            return
        sink.peak_sessions = max(sink.peak_sessions, len(sink._sessions))
        greeting = self.sink.behaviour.greeting
        if greeting is None or greeting[0] == "2":
            await super()._handle_client()
            return
        await self.push(greeting)  # a 421 closes in push()
        # RFC 5321 3.1: after a 554 greeting, wait for QUIT and answer 503
        # to anything else.
        try:
            while self.transport is not None and not self.transport.is_closing():
                line = await self._reader.readuntil()
                if line.strip().upper() == b"QUIT":
                    await self.push(S221_BYE)
                    self.transport.close()
                    return
                await self.push(S503_ONLY_QUIT)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            if self.transport is not None:
                self.transport.close()

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        """aiosmtpd's DATA, read a block at a time (relay.testing.sinkdata
        says why and checks that it reads what aiosmtpd reads)."""
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if self._bdat.envelope is self.envelope:  # RFC 3030 2: no DATA in a BDAT transaction
            await self.push("503 5.5.1 Error: BDAT transaction in progress")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        collector = DataCollector(self.data_size_limit, self.line_length_limit,
                                  self._reader._limit)  # noqa: SLF001 - the limit readuntil overruns at
        try:
            ended = await read_data(self._reader, collector)
        except asyncio.CancelledError:  # the connection went during DATA (eof_received)
            self._writer.close()
            raise
        if not ended:
            self._writer.close()
            return
        if collector.state != NOMINAL:
            await self.push("500 Line too long (see RFC5321 4.5.3.1.6)" if collector.state == TOO_LONG
                            else "552 Error: Too much mail data")
            self._set_post_data_state()
            return
        self.envelope.content = self.envelope.original_content = collector.content()
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()
        await self.push("250 OK" if status is MISSING else status)

    @syntax("BDAT chunk-size [LAST]", when="chunking")
    async def smtp_BDAT(self, arg: str) -> None:
        """RFC 3030's BDAT: read the chunk, whatever the verdict, then
        answer; the last one ends the transaction as the dot ends DATA.
        A refused chunk fails the transaction: later chunks of it are read
        and refused the same way until RSET or a new MAIL."""
        if not self.chunking:
            await self.push('500 Error: command "BDAT" not recognized')
            return
        words = _BDAT_ARGS.fullmatch(arg.strip())
        if words is None:
            await self.push("501 5.5.4 Syntax: BDAT chunk-size [LAST]")
            return  # the chunk's size is unknown: what follows is read as commands
        size, last = int(words[1]), words[2] is not None
        bdat = self._bdat if self._bdat.envelope is self.envelope else _Bdat(self.envelope)
        self._bdat = bdat
        drop_after = self.sink.behaviour.drop_in_data  # counted over the whole message, as in DATA
        try:
            if drop_after is not None and bdat.read + size >= drop_after:
                await self._reader.readexactly(drop_after - bdat.read)
                self.drop()
                return
            chunk = await self._reader.readexactly(size)
        except (asyncio.IncompleteReadError, ConnectionError):
            self._writer.close()
            return
        bdat.read += size
        self._in_data = last  # the end of the message gets data_delay, as the dot does
        if await self.check_helo_needed():
            return
        if self.envelope.mail_from is None:  # no transaction to fail
            await self.push("503 5.5.1 Error: need MAIL command")
            return
        if bdat.failed is None:
            if not self.envelope.rcpt_tos:
                bdat.failed = "554 5.5.1 Error: no valid recipients"
            elif self.data_size_limit and bdat.read > self.data_size_limit:
                bdat.failed = "552 5.3.4 Error: message too large"
        if bdat.failed is not None:
            bdat.chunks = []
            await self.push(bdat.failed)
            return
        bdat.chunks.append(chunk)
        if not last:
            await self.push(f"250 2.0.0 {size} octets received")
            return
        self.envelope.content = self.envelope.original_content = b"".join(bdat.chunks)
        self.chunked_message = True
        try:
            status = await self._call_handler_hook("DATA")
        finally:
            self.chunked_message = False
        self._set_post_data_state()
        await self.push("250 OK" if status is MISSING else status)

    async def smtp_EHLO(self, hostname: str) -> None:
        if self._tls_protocol is None:  # a STARTTLS mode set since the connection opened
            self.tls_context = self.sink._tls_context()
        await super().smtp_EHLO(hostname)

    async def smtp_STARTTLS(self, arg: str) -> None:
        mode = self.sink.behaviour.tls
        if arg or self._tls_protocol is not None or mode in (TLS_ON, TLS_WRONG_CERT):
            if not arg and self._tls_protocol is None:
                self.chunking = False  # RFC 3207: nothing from before TLS holds; EHLO again
            await super().smtp_STARTTLS(arg)
        elif mode == TLS_ABORT:
            await self.push(S220_TLS_READY)
            self.drop()
        else:  # TLS_UNAVAILABLE, or TLS_OFF since this connection's EHLO
            await self.push(S454_TLS_UNAVAILABLE)


class SinkFarm(_Service):
    """Many sinks, one per loopback address, all on one port.

    ``port=0`` lets the kernel choose it when the first sink is added;
    every later sink then uses the same number.
    """

    def __init__(self, port: int = 0, *, keep_data: bool = True, pki_directory: str | None = None) -> None:
        self.port = port
        self.keep_data = keep_data  # False: Received.data is b"" (perf runs), size still counted
        self.sinks: dict[str, Sink] = {}
        self.received: list[Received] = []  # every sink's, in order of arrival
        self._pki = TestPKI(pki_directory)
        self._connection_ids = itertools.count(1)
        self._changed = threading.Condition()
        self._tasks: set[asyncio.Task] = set()

    def add_sink(
        self,
        ip: str,
        behaviour: Behaviour | None = None,
        *,
        hostnames: Iterable[str] = (),
        listening: bool = True,
    ) -> Sink:
        """A new sink on ``ip`` (in 127.0.0.0/8), listening at once unless told otherwise."""
        if ipaddress.ip_address(ip) not in LOOPBACK:
            raise ValueError(f"sinks bind to 127.0.0.0/8 only, not {ip}")
        if ip in self.sinks:
            raise ValueError(f"there is already a sink on {ip}")
        sink = Sink(self, ip, behaviour or Behaviour(), hostnames)
        if listening:
            sink.start_listening()
        self.sinks[ip] = sink
        return sink

    def sink(self, ip: str) -> Sink:
        return self.sinks[ip]

    def choose_port(self) -> int:
        """Fix the farm's port now (before any sink exists, e.g. to write a config)."""
        if not self.port:
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                self.port = probe.getsockname()[1]
        return self.port

    @property
    def ca_cert_path(self) -> str:
        """PEM file of the test CA that signs the sinks' certificates (TLS_ON).

        Made on first use, removed (and the CA forgotten) when the farm stops.
        """
        return self._pki.ca_cert_path

    def client_context(self, check_hostname: bool = True) -> ssl.SSLContext:
        """A client context that trusts the test CA only (and verifies the sinks' names)."""
        context = ssl.create_default_context(cafile=self.ca_cert_path)
        context.check_hostname = check_hostname
        return context

    def wait_received(self, count: int, timeout: float = 10.0) -> list[Received]:
        """Block until all sinks together hold ``count`` messages; not from the farm's loop."""
        return self._wait(lambda: self.received, count, timeout)

    def reset(self) -> None:
        with self._changed:
            self.received.clear()
        for sink in self.sinks.values():
            sink.reset()

    # -- internals ----------------------------------------------------------------

    def _bind(self, ip: str) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            # A sink brought back up must rebind while old connections sit in TIME_WAIT.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((ip, self.port))
            sock.listen(LISTEN_BACKLOG)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        if not self.port:
            self.port = sock.getsockname()[1]
        return sock

    def _accept(self, sink: Sink) -> None:
        loop = self._loop
        for _ in range(ACCEPT_BURST):
            if sink._sock is None:
                return
            try:
                conn, _address = sink._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: leave them in the backlog
                log.warning("sink %s: accept failed: %s", sink.ip, exc)
                return
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            task = loop.create_task(self._serve(sink, conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _serve(self, sink: Sink, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        connection_id = next(self._connection_ids)
        try:
            await loop.connect_accepted_socket(lambda: _SinkSMTP(sink, connection_id, loop), conn)
        except OSError:
            conn.close()

    def _opened(self, sink: Sink, session: _SinkSMTP) -> None:
        with self._changed:
            sink.connections_opened += 1
            sink.peer_ips[session.peer_ip] += 1
            self._changed.notify_all()

    def _record(self, sink: Sink, received: Received) -> int:
        with self._changed:
            sink.received.append(received)
            sink.transactions[received.connection_id] += 1
            self.received.append(received)
            self._changed.notify_all()
            return len(self.received)

    def _wait(self, records: Callable[[], list], count: int, timeout: float) -> list[Received]:
        if self._in_loop_thread():
            raise RuntimeError("wait_received() would block the farm's own loop; call it from another thread")
        with self._changed:
            if not self._changed.wait_for(lambda: len(records()) >= count, timeout):
                raise TimeoutError(f"{len(records())} of {count} messages received after {timeout}s")
            return list(records())

    async def _start(self) -> None:
        self.choose_port()
        for sink in self.sinks.values():
            if sink._wanted:
                sink._listen()

    async def _stop(self) -> None:
        for sink in self.sinks.values():
            sink._close(drop_connections=True)
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.sleep(0)  # let the dropped sessions see connection_lost()
        self._pki.cleanup()


# -- the bundle --------------------------------------------------------------------


class FakeInternet(_Service):
    """A FakeDNS and a SinkFarm on one loop, with helpers for MX domains.

    ``with FakeInternet() as net: net.add_domain("d1.example",
    mx_ips=["127.0.0.10", "127.0.0.11"], preferences=[10, 20])`` creates
    the sinks (if missing), ``mx1.d1.example`` / ``mx2.d1.example`` A
    records and the MX records.  Point the relay at it with
    ``net.config_overrides()``.
    """

    def __init__(
        self,
        *,
        dns_host: str = "127.0.0.1",
        dns_port: int = 0,
        mx_port: int = 0,
        apexes: Iterable[str] = DEFAULT_APEXES,
        keep_data: bool = True,
    ) -> None:
        self.dns = FakeDNS(dns_host, dns_port, apexes=apexes)
        self.farm = SinkFarm(mx_port, keep_data=keep_data)

    def add_host(self, name: str, ip: str, behaviour: Behaviour | None = None, ttl: int = 300) -> Sink:
        """An A record ``name -> ip`` and the sink on ``ip``.

        The sink is created with ``behaviour`` if missing; an existing sink
        keeps its own (change it with ``sink.configure()``).
        """
        sink = self.farm.sinks.get(ip) or self.farm.add_sink(ip, behaviour)
        sink.add_hostname(name.rstrip("."))
        self.dns.add_a(name, ip, ttl=ttl)
        return sink

    def add_domain(
        self,
        domain: str,
        mx_ips: Sequence[str],
        preferences: Sequence[int] | None = None,
        *,
        behaviour: Behaviour | None = None,
        ttl: int = 300,
    ) -> list[Sink]:
        """MX records for ``domain``: ``mx{i}.{domain}`` on each IP, preferences 10, 20, ... by default."""
        if preferences is None:
            preferences = [10 * (i + 1) for i in range(len(mx_ips))]
        if len(preferences) != len(mx_ips):
            raise ValueError("one preference per MX address")
        domain = domain.rstrip(".")
        sinks, exchanges = [], []
        for index, (ip, preference) in enumerate(zip(mx_ips, preferences), start=1):
            host = f"mx{index}.{domain}"
            sinks.append(self.add_host(host, ip, behaviour, ttl))
            exchanges.append((preference, host))
        self.dns.add_mx(domain, exchanges, ttl=ttl)
        return sinks

    @property
    def nameserver(self) -> str:
        return self.dns.nameserver

    @property
    def mx_port(self) -> int:
        return self.farm.choose_port()

    def config_overrides(self) -> dict:
        """The relay settings that send its deliveries here (``[dns]``, ``[deliver]``)."""
        return {"dns": {"nameservers": [self.nameserver]}, "deliver": {"mx_port": self.mx_port}}

    async def _start(self) -> None:
        await self.dns.start()
        try:
            await self.farm.start()
        except BaseException:
            await self.dns.stop()
            raise

    async def _stop(self) -> None:
        try:
            await self.farm.stop()
        finally:
            await self.dns.stop()
