"""A fault-injecting TCP proxy, to put between the relay and an SMTP sink.

Job: make a healthy server look broken at one exact moment of an SMTP
session, so the tests can check what the relay does about it (asyncpg's
``_testbase/fuzzer.py`` is the model: a proxy whose behaviour is switched
from the test).  Input: the address it forwards to, and a ``Fault`` set at
any time (``proxy.fault = Fault(...)``; ``None`` lets everything pass).
Output: a listening socket on 127.0.0.0/8 and counts of what it did.

Theory of operation.  Each accepted connection opens one to the target and
copies bytes both ways.  It takes the fault in force when it was accepted,
so clearing the fault lets a stalled connection stay stalled (the relay
must give up on it by itself) while the next connection passes.  A fault
is *armed* by the client: from the start (``after=None``, the greeting),
or once the client has sent the ``after`` bytes (``DOT``, the end of DATA;
``STARTTLS``).  Armed, it lets ``skip_lines`` more lines from the server
through, then *hits* the next bytes the server sends:

``RESET``    the client connection is reset (RST), the server's reply dropped
``STALL``    ``keep`` bytes of the reply go through ("25"), then nothing,
             either way, until the client closes
``REPLACE``  ``data`` goes to the client instead of the reply, then as STALL

The server always receives what the client sent: a fault after ``DOT`` hits
a message the server has already accepted, which is where at-least-once
delivery makes its duplicates.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import struct
from dataclasses import dataclass

from relay.testing.fakenet import LOOPBACK, _Service

__all__ = ["DOT", "Fault", "FaultProxy", "REPLACE", "RESET", "STALL", "STARTTLS"]

DOT = b"\r\n.\r\n"  # the end of DATA (dot-stuffing keeps it out of the body)
STARTTLS = b"STARTTLS\r\n"

RESET = "reset"
STALL = "stall"
REPLACE = "replace"
ACTIONS = (RESET, STALL, REPLACE)

CHUNK = 65536


@dataclass(frozen=True)
class Fault:
    """What goes wrong, and when (see the module docstring)."""

    action: str
    after: bytes | None = None  # client bytes that arm it; None: armed from the start
    skip_lines: int = 0  # server lines let through once armed
    keep: int = 0  # STALL: bytes of the hit reply let through
    data: bytes = b""  # REPLACE: what the client gets instead

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"Fault.action must be one of {ACTIONS}, not {self.action!r}")


class _Connection:
    def __init__(self, fault: Fault | None, client: asyncio.StreamWriter) -> None:
        self.fault = fault
        self.client = client
        self.server: asyncio.StreamWriter | None = None
        self.armed = fault is not None and fault.after is None
        self.skip = fault.skip_lines if fault else 0
        self.hit = False
        self._tail = b""  # the client's last bytes, for a pattern split across reads

    def saw_from_client(self, data: bytes) -> None:
        if self.fault is None or self.armed:
            return
        seen = self._tail + data
        if self.fault.after in seen:
            self.armed = True
        self._tail = seen[-len(self.fault.after):]


class FaultProxy(_Service):
    """``FaultProxy(("127.0.0.10", 2525))``; ``with proxy: ...`` runs it in a thread."""

    def __init__(self, target: tuple[str, int], host: str = "127.0.0.1", port: int = 0) -> None:
        if ipaddress.ip_address(host) not in LOOPBACK or ipaddress.ip_address(target[0]) not in LOOPBACK:
            raise ValueError("the fault proxy listens on and forwards to 127.0.0.0/8 only")
        self.target = target
        self.host = host
        self.port = port
        self.fault: Fault | None = None
        self.connections = 0  # accepted
        self.hits = 0  # connections on which the fault struck
        self._server: asyncio.AbstractServer | None = None
        self._open: set[_Connection] = set()
        self._tasks: set[asyncio.Task] = set()

    @property
    def address(self) -> str:
        """``host:port``, as ``[routes]`` wants it."""
        return f"{self.host}:{self.port}"

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        self._server.close()
        for conn in list(self._open):
            self._abort(conn)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    # -- on the proxy's loop -------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._tasks.add(asyncio.current_task())
        conn = _Connection(self.fault, writer)
        self.connections += 1
        self._open.add(conn)
        try:
            try:
                server_reader, conn.server = await asyncio.open_connection(*self.target)
            except OSError:
                self._abort(conn)  # the target is down: refuse, as it would
                return
            await asyncio.gather(
                self._upstream(conn, reader), self._downstream(conn, server_reader),
            )
        finally:
            self._open.discard(conn)
            self._close(conn)
            self._tasks.discard(asyncio.current_task())

    async def _upstream(self, conn: _Connection, reader: asyncio.StreamReader) -> None:
        """Client -> server, watching for the bytes that arm the fault."""
        with contextlib.suppress(OSError):
            while data := await reader.read(CHUNK):
                conn.saw_from_client(data)  # armed before the server can answer
                if conn.server.is_closing():
                    break
                conn.server.write(data)
                await conn.server.drain()
        self._close(conn)  # the client gave up (or reset): so does the server side

    async def _downstream(self, conn: _Connection, reader: asyncio.StreamReader) -> None:
        """Server -> client, where the fault strikes."""
        with contextlib.suppress(OSError):
            while data := await reader.read(CHUNK):
                if conn.hit:
                    continue  # stalled: swallowed
                if conn.armed:
                    data = self._skip_lines(conn, data)
                    if data:
                        self._strike(conn, data)
                        if conn.fault.action == RESET:
                            return
                        continue
                    continue
                conn.client.write(data)
                await conn.client.drain()
        if not conn.hit:
            self._close(conn)  # the server closed: so does the client side

    def _skip_lines(self, conn: _Connection, data: bytes) -> bytes:
        while conn.skip and data:
            end = data.find(b"\n")
            if end < 0:
                conn.client.write(data)
                return b""
            conn.client.write(data[: end + 1])
            data = data[end + 1:]
            conn.skip -= 1
        return data

    def _strike(self, conn: _Connection, data: bytes) -> None:
        conn.hit = True
        self.hits += 1
        fault = conn.fault
        if fault.action == RESET:
            self._abort(conn)
        elif fault.action == STALL:
            conn.client.write(data[: fault.keep])
        else:
            conn.client.write(fault.data)

    def _abort(self, conn: _Connection) -> None:
        """Reset the client connection (SO_LINGER 0 makes the close an RST)."""
        sock = conn.client.get_extra_info("socket")
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.client.transport.abort()
        if conn.server is not None:
            conn.server.transport.abort()

    @staticmethod
    def _close(conn: _Connection) -> None:
        conn.client.close()
        if conn.server is not None:
            conn.server.close()
