"""The DATA transfer (sans-IO): lines in, a message or a refusal out.

Input: the lines the client sends after ``354``, each ending in CRLF as the
reader split them (``feed_line``), runs of such lines already buffered
(``feed_block``, sized by ``relay.accel.whole_lines``), and the pieces of lines too long
to buffer (``feed_overrun``).  Output: ``finish()`` -> (reply or None, body).

Theory of operation: the only end of data is CRLF "." CRLF (RFC 5321
4.1.1.4), which the reader sees as a line that is exactly ``.\\r\\n`` at the
start of a line.  Anything else that looks like an end (``\\n.\\n``,
``\\r.\\r``, ``\\r\\n.\\n``, ...) is data; a bare CR or LF inside a line is
refused (``550 5.5.2``) or rewritten as CRLF, per
``intake.bare_line_endings`` — so a receiver that would take such a
sequence as an end never gets one from us (SMTP smuggling).  NUL is always
refused.  The first problem found is the verdict; from then on data is
dropped as it arrives, so memory stays bounded whatever the client sends,
and the reply is given after the final dot (RFC 5321 4.2.5).

``feed_block`` is the fast path: the lines a client has already sent are
taken in one call instead of one ``readuntil`` and one ``feed_line`` each
(a 10 KB message is ~150 lines).  It gives exactly what feeding its lines
one by one gives: a block of clean body lines is checked and unstuffed in
one pass (relay.accel.unstuff_clean, in C), and anything else (headers, a
verdict, a NUL, a bare CR or LF, a long line, the size limit) goes line by
line.
"""

from __future__ import annotations

import re

from relay.accel import unstuff_clean
from relay.intake import replies

# RFC 5321 4.5.3.1.6: a text line is at most 1000 octets with its CRLF.
MAX_TEXT_LINE = 998

_ANY_LINE_END = re.compile(rb"\r\n|\r|\n")


class DataReader:
    def __init__(self, *, max_size: int, normalize: bool, max_received: int,
                 reader_limit: int = 1001) -> None:
        # reader_limit: the stream reader's (aiosmtpd's line_length_limit): a
        # longer line reaches feed_overrun when lines are read one by one, and
        # feed_block treats it the same way.
        self._reader_limit = reader_limit
        self._max_size = max_size
        self._normalize = normalize
        self._max_received = max_received
        self._body = bytearray()
        self._size = 0
        self._received = 0
        self._in_headers = True
        self._mid_line = False  # inside a line whose start was fed by feed_overrun
        self.verdict: str | None = None

    def feed_line(self, line: bytes) -> bool:
        """Take one line ending in CRLF; True when it was the end of data."""
        if self._mid_line:
            # The tail of an over-long line: never an end marker.
            self._mid_line = False
            self._refuse(replies.S500_LINE_TOO_LONG)
            return False
        if line == b".\r\n":
            return True
        if line[:1] == b".":
            line = line[1:]  # RFC 5321 4.5.2 transparency
        self._size += len(line)
        if self.verdict is not None:
            return False
        if self._size > self._max_size:
            self._refuse(replies.S552_TOO_BIG)
            return False
        content = line[:-2]
        if b"\0" in line:
            self._refuse(replies.S550_NUL)
            return False
        if b"\r" in content or b"\n" in content:
            if not self._normalize:
                self._refuse(replies.S550_BARE_LINE_ENDING)
                return False
            # Each piece between bare line ends is a line of its own: the
            # limits and the header checks apply to it as to any line.
            for piece in _ANY_LINE_END.split(content):
                if not self._keep(piece + b"\r\n"):
                    return False
            return False
        self._keep(line)
        return False

    def feed_block(self, block: bytes) -> bool:
        """Take whole CRLF lines at once (as ``whole_lines`` cut them): the
        same as reading them one by one (``feed_line``, or ``feed_overrun``
        for a line over the reader's limit); True when the last was the end
        of data."""
        ended, start = self._feed_lines(block, until_body=True)
        rest = block[start:] if start else block
        if ended or not rest:
            return ended
        ended = rest == b".\r\n" or rest.endswith(b"\r\n.\r\n")
        lines = rest[:-3] if ended else rest
        # RFC 5321 4.5.2: each line's leading dot goes.
        unstuffed = unstuff_clean(lines, min(MAX_TEXT_LINE, self._reader_limit))
        if unstuffed is None or self._size + len(unstuffed) > self._max_size:
            return self._feed_lines(rest)[0]  # a problem somewhere: find it as feed_line would
        self._size += len(unstuffed)
        self._body += unstuffed
        return ended

    def _feed_lines(self, block: bytes, until_body: bool = False) -> tuple[bool, int]:
        """``feed_line`` for each line of ``block`` (with ``until_body``, only
        while the fast path cannot take them: headers, a verdict, the tail of
        an over-long line); (end of data seen, where it stopped)."""
        start = 0
        while start < len(block):
            if until_body and not (self._in_headers or self._mid_line or self.verdict is not None):
                break
            cut = block.index(b"\r\n", start) + 2
            if cut - start - 2 > self._reader_limit:  # as readuntil would hand it over
                self.feed_overrun(block[start:cut - 2])
                self.feed_line(b"\r\n")  # the tail of a long line: never the end
            elif self.feed_line(block[start:cut]):
                return True, cut
            start = cut
        return False, start

    def _keep(self, line: bytes) -> bool:
        """Check one CRLF line and keep it; False once a verdict is reached."""
        if len(line) - 2 > MAX_TEXT_LINE:
            self._refuse(replies.S500_LINE_TOO_LONG)
            return False
        if self._in_headers:
            self._check_header(line)
            if self.verdict is not None:
                return False
        self._body += line
        return True

    def feed_overrun(self, piece: bytes) -> None:
        """Take a piece of a line longer than the reader buffers."""
        self._mid_line = True
        self._size += len(piece)
        self._refuse(replies.S500_LINE_TOO_LONG)

    def finish(self) -> tuple[str | None, bytes]:
        """The refusal, or None and the message (dot-unstuffed, CRLF lines)."""
        if self.verdict is not None:
            return self.verdict, b""
        body = bytes(self._body)
        self._body = bytearray()
        return None, body

    def _check_header(self, line: bytes) -> None:
        if line == b"\r\n":
            self._in_headers = False
        elif line[:9].lower() == b"received:":
            self._received += 1
            if self._received > self._max_received:
                self._refuse(replies.S554_LOOP)

    def _refuse(self, reply: str) -> None:
        if self.verdict is None:
            self.verdict = reply
        self._body = bytearray()  # drop what was kept: memory stays bounded
