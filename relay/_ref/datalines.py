"""DATA's lines, in and out: the specification of the passes over a body.

``unstuff_clean(lines, max_line)``, intake: ``lines``, DATA lines as the
client sent them after ``354`` (each normally ending in CRLF; the
end-of-data line not among them), and ``max_line``, the longest line
content allowed (CRLF excluded).  Output: the lines with each one's leading
dot removed (RFC 5321 4.5.2), or None when any of them needs a closer look:
a NUL, a CR not followed by LF, an LF not preceded by CR, or a line longer
than ``max_line`` (a last piece with no CRLF counts as a line).  The caller
then reads the block line by line to find out which verdict applies
(relay.intake.data).

``whole_lines(buffer)``, intake: how many bytes at the start of ``buffer``
(bytes or bytearray; a line starts there) are whole lines a block may
take: up to the end of data (CRLF "." CRLF) if it is there, else up to the
last CRLF.

``dot_stuffed(body)``, delivery: the message as sent after 354, each line
that starts with a dot given another (RFC 5321 4.5.2), ending in CRLF "."
CRLF.  The body's lines already end in CRLF (intake made sure); one that
does not end in CRLF gets it.

This module is readable rather than fast; ``relay/_fast/datalines.pyx``
must return the same for every input (tests/parity).
"""

from __future__ import annotations

__all__ = ["dot_stuffed", "unstuff_clean", "whole_lines"]


def unstuff_clean(lines: bytes, max_line: int) -> bytes | None:
    """``lines`` dot-unstuffed, or None when a line is not clean text."""
    if not isinstance(lines, bytes):
        raise TypeError("lines must be bytes")
    if max_line < 0:
        raise ValueError("max_line must be >= 0")
    crlf = lines.count(b"\r\n")
    if (b"\0" in lines or lines.count(b"\r") != crlf or lines.count(b"\n") != crlf
            or max(map(len, lines.split(b"\r\n"))) > max_line):
        return None
    # The first line's dot has no CRLF before it.
    unstuffed = lines.replace(b"\r\n.", b"\r\n")
    return unstuffed[1:] if unstuffed[:1] == b"." else unstuffed


def whole_lines(buffer: bytes | bytearray) -> int:
    """Bytes of whole lines at the start of ``buffer``, the end of data included."""
    if buffer[:3] == b".\r\n":
        return 3
    last = buffer.rfind(b"\r\n")
    if last < 0:
        return 0
    end = buffer.find(b"\r\n.\r\n", 0, last + 2)
    return end + 5 if end >= 0 else last + 2


def dot_stuffed(body: bytes) -> bytes:
    """``body`` dot-stuffed and terminated, as sent after 354."""
    if not isinstance(body, bytes):
        raise TypeError("body must be bytes")
    if body.startswith(b"."):
        body = b"." + body
    body = body.replace(b"\r\n.", b"\r\n..")
    if not body.endswith(b"\r\n"):
        body += b"\r\n"
    return body + b".\r\n"
