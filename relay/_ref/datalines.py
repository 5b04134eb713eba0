"""A block of DATA lines checked and dot-unstuffed at once: the specification.

Input: ``lines``, DATA lines as the client sent them after ``354`` (each
normally ending in CRLF; the end-of-data line not among them), and
``max_line``, the longest line content allowed (CRLF excluded).
Output: the lines with each one's leading dot removed (RFC 5321 4.5.2), or
None when any of them needs a closer look: a NUL, a CR not followed by LF,
an LF not preceded by CR, or a line longer than ``max_line`` (a last piece
with no CRLF counts as a line).  The caller then reads the block line by
line to find out which verdict applies (relay.intake.data).

This module is readable rather than fast; ``relay/_fast/datalines.pyx``
must return the same for every input (tests/parity).
"""

from __future__ import annotations

__all__ = ["unstuff_clean"]


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
