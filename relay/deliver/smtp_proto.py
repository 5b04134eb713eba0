"""SMTP client protocol core (sans-IO): bytes in, replies out; commands out.

Input: what the server sends (``receive_data``).  Output: complete
``Reply`` objects, in order, and the exact bytes of each command or of a
whole pipelined transaction to write.  No sockets, no clock: the session
(deliver.session) does the I/O and the timeouts.

Theory of operation: a reply is one or more lines ``ddd-text`` ending with
a line ``ddd text`` (RFC 5321 4.2.1).  The parser keeps the bytes of an
incomplete line and the lines of an incomplete reply; every complete reply
is queued and handed out by ``next_reply()``.  A server answers most
commands with the same few lines ("250 2.1.5 Ok"), so each parser keeps
the replies of single lines it has seen and hands the same (immutable)
Reply out again.  Commands are built by pure
functions; ``transaction()`` builds MAIL, every RCPT and DATA as one write
for a PIPELINING server (RFC 2920), whose replies then come in that order;
``chunked_transaction()`` ends it with ``BDAT <size> LAST`` instead, for a
server that also offers CHUNKING (RFC 3030): the body follows in the same
write, as it is, and one round trip and the dot-stuffing pass are saved.
Remote errors (a malformed reply, a line too long) raise
``RemoteProtocolError``.
"""

from __future__ import annotations

import collections
import re

from relay import accel
from relay.errors import RemoteProtocolError
from relay.model import Reply

MAX_REPLY_LINE = 4096  # RFC 5321 allows 512; real servers send longer text lines
MAX_REPLY_LINES = 200
SEEN_MAX = 32  # single-line replies a parser remembers (a connection hears few kinds)
# RFC 3463 digits are ASCII: a "5.\u0663.1" is text, not an enhanced code.
_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?: |$)", re.ASCII)


class ReplyParser:
    def __init__(self, host: str | None = None) -> None:
        self.host = host
        self._partial = b""
        self._lines: list[bytes] = []
        self._replies: collections.deque[Reply] = collections.deque()
        self._seen: dict[bytes, Reply] = {}  # a lone final line -> its reply

    def receive_data(self, data: bytes) -> None:
        buffer = self._partial + data if self._partial else data
        start = 0
        while True:
            end = buffer.find(b"\n", start)
            if end < 0:
                break
            # The same limit for a whole line as for a partial one, so that
            # how the bytes arrive never changes the verdict.
            if end - start > MAX_REPLY_LINE:
                raise RemoteProtocolError("reply line too long")
            self._line(buffer[start:end].rstrip(b"\r"))
            start = end + 1
        self._partial = buffer[start:]
        if len(self._partial) > MAX_REPLY_LINE:
            raise RemoteProtocolError("reply line too long")

    def next_reply(self) -> Reply | None:
        return self._replies.popleft() if self._replies else None

    def _line(self, line: bytes) -> None:
        if not self._lines:
            reply = self._seen.get(line)  # only well-formed final lines are in it
            if reply is not None:
                self._replies.append(reply)
                return
        if len(line) < 3 or not line[:3].isdigit() or line[3:4] not in (b" ", b"-", b""):
            raise RemoteProtocolError(f"malformed reply line {line[:80]!r}")
        self._lines.append(line)
        if len(self._lines) > MAX_REPLY_LINES:
            raise RemoteProtocolError("reply has too many lines")
        if line[3:4] == b"-":
            return
        lines, self._lines = self._lines, []
        reply = self._reply(lines)
        if len(lines) == 1 and len(self._seen) < SEEN_MAX:
            self._seen[line] = reply
        self._replies.append(reply)

    def _reply(self, lines: list[bytes]) -> Reply:
        code = int(lines[0][:3])
        texts = [l[4:].decode("utf-8", "replace") for l in lines]
        enhanced = None
        match = _ENHANCED.match(texts[-1])
        if match and match.group(1) == f"{code:03d}"[0]:  # "055" is of class 0, not 5
            enhanced = texts[-1][: match.end()].strip()
            texts = [_without_enhanced(t) for t in texts]
        return Reply(code, enhanced, "\n".join(texts).strip(), self.host)


def _without_enhanced(text: str) -> str:
    """A reply line's text without its own enhanced code (each line may
    write it with a different number of digits)."""
    match = _ENHANCED.match(text)
    return text[match.end():] if match else text


def ehlo_extensions(reply: Reply) -> dict[str, str]:
    """EHLO keywords (upper case) -> their parameters, from the 250 reply."""
    extensions = {}
    for line in reply.text.split("\n")[1:]:
        keyword, _, params = line.strip().partition(" ")
        if keyword:
            extensions[keyword.upper()] = params
    return extensions


def command(verb: str, arg: str = "") -> bytes:
    return (f"{verb} {arg}" if arg else verb).encode("utf-8") + b"\r\n"


def mail_from(sender: str, *, size: int | None, smtputf8: bool, body8bit: bool) -> bytes:
    params = []
    if size is not None:
        params.append(f"SIZE={size}")
    if body8bit:
        params.append("BODY=8BITMIME")
    if smtputf8:
        params.append("SMTPUTF8")
    return command("MAIL", f"FROM:<{sender}>" + "".join(" " + p for p in params))


def rcpt_to(address: str) -> bytes:
    return command("RCPT", f"TO:<{address}>")


def transaction(sender: str, recipients: list[str], *, size: int | None, smtputf8: bool,
                body8bit: bool) -> bytes:
    """MAIL, every RCPT and DATA in one write (PIPELINING)."""
    parts = [mail_from(sender, size=size, smtputf8=smtputf8, body8bit=body8bit)]
    parts += [rcpt_to(r) for r in recipients]
    parts.append(b"DATA\r\n")
    return b"".join(parts)


def chunked_transaction(sender: str, recipients: list[str], body_size: int, *, size: int | None,
                        smtputf8: bool, body8bit: bool) -> bytes:
    """MAIL, every RCPT and the one BDAT of a body of ``body_size`` bytes
    (PIPELINING and CHUNKING); the body is written right after it."""
    parts = [mail_from(sender, size=size, smtputf8=smtputf8, body8bit=body8bit)]
    parts += [rcpt_to(r) for r in recipients]
    parts.append(b"BDAT %d LAST\r\n" % body_size)
    return b"".join(parts)


# The message as sent after 354: dot-stuffed (RFC 5321 4.5.2), ending in
# CRLF "." CRLF (relay._ref.datalines says exactly; in C).
dot_stuffed = accel.dot_stuffed
