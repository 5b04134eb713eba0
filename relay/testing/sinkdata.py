"""The fake MX's DATA reader: what aiosmtpd's ``smtp_DATA`` reads, a block
at a time instead of a line at a time.

Input: the bytes after the 354, in whatever pieces they arrive.  Output:
the message as aiosmtpd keeps it (``original_content``: dot-unstuffed,
line endings as sent), its verdict, and where in the stream the DATA ended
(what follows is the client's next command).

Why: a benchmark's sinks stand in for receivers on other machines, yet they
share the relay's cores.  aiosmtpd's reader costs a few microseconds per
line (1,400 lines in 100 KB), so the sinks were using a core of their own
and capped what the large scenario could measure.  The rules are
aiosmtpd 1.4's, and tests/unit/testing/test_sinkdata.py checks them against
aiosmtpd itself:

- a line ends in CRLF only (a bare LF or CR is part of the line);
- a line ``.`` CRLF ends the DATA; it is not counted;
- every other line counts towards the size limit, CRLF and stuffing dot
  included; more than the limit in all makes the verdict TOO_MUCH;
- a line over the reader's limit + 2 bytes (CRLF included) overruns
  aiosmtpd's StreamReader: TOO_LONG at once, before its bytes count; one
  over ``line_length_limit`` bytes that does not is counted first, then is
  TOO_LONG;
- the first verdict stays; after one, nothing more is kept.
"""

from __future__ import annotations

import asyncio

NOMINAL, TOO_LONG, TOO_MUCH = "nominal", "too long", "too much"
TERMINATOR = b".\r\n"


class DataCollector:
    """Sans-IO: ``feed(block)`` until it returns the offset in that block
    just past the terminator line."""

    def __init__(self, size_limit: int | None, line_length_limit: int, stream_limit: int) -> None:
        self.size_limit = size_limit or None  # aiosmtpd: 0 or None is no limit
        self.line_length_limit = line_length_limit
        self.overrun_at = stream_limit + 2  # a line longer than this overruns readuntil
        self.state = NOMINAL
        self.size = 0
        self._kept: list[bytes] = []
        self._partial = b""  # the start of a line without its CRLF yet (bounded)
        self._partial_size = 0  # its real length when it was cut to its last byte

    def feed(self, block: bytes) -> int | None:
        if self._partial:
            buffer = self._partial + block
            offset = len(self._partial)  # where block starts in buffer
        else:
            buffer, offset = block, 0
        extra = self._partial_size - len(self._partial) if self._partial_size else 0
        start = 0
        while (end := buffer.find(b"\r\n", start)) >= 0:
            line = buffer[start:end + 2]
            if not extra and line == TERMINATOR:
                return end + 2 - offset
            self._line(line, len(line) + extra)
            extra = 0
            start = end + 2
        rest = buffer[start:]
        if len(rest) + extra > self.overrun_at:
            # Too long already: keep only its last byte (a CR may follow).
            self._partial, self._partial_size = rest[-1:], len(rest) + extra
        else:
            self._partial, self._partial_size = rest, 0
        return None

    def content(self) -> bytes:
        """The message as aiosmtpd keeps it (when the verdict is NOMINAL)."""
        return b"".join(line[1:] if line[:1] == b"." else line for line in self._kept)

    def _line(self, line: bytes, length: int) -> None:
        if length > self.overrun_at:
            if self.state == NOMINAL:
                self.state = TOO_LONG
                self._kept = []
            self.size += length
            return
        self.size += length
        if self.state != NOMINAL:
            return
        if self.size_limit is not None and self.size > self.size_limit:
            self.state, self._kept = TOO_MUCH, []
        elif length > self.line_length_limit:
            self.state, self._kept = TOO_LONG, []
        else:
            self._kept.append(line)


async def read_data(reader: asyncio.StreamReader, collector: DataCollector,
                    block_size: int = 65536) -> bool:
    """Feed ``collector`` from ``reader`` until the terminator; what follows
    it stays in the reader for the next command.  False when the stream
    ended first."""
    while True:
        block = await reader.read(block_size)
        if not block:
            return False
        end = collector.feed(block)
        if end is not None:
            if end < len(block):
                # StreamReader cannot unread: the bytes after the dot go back
                # in front of what it still buffers (a pipelining client's
                # next command).
                reader._buffer[0:0] = block[end:]  # noqa: SLF001
            return True
