"""DKIM body canonicalization and body hash (RFC 6376 sections 3.4.3-3.4.4, 3.7): the specification.

Input: the message body (the bytes after the blank line that ends the
header), fed in chunks of any size through ``BodyHasher.update``; a chunk may
end anywhere, even between the CR and the LF of a CRLF or inside a run of
white space.
Output: ``digest()``, the raw hash of the canonical body (the ``bh=`` value
before base64), and ``length``, how many canonical bytes were hashed (the
``l=`` value).

Theory of operation.  Both algorithms are a stream of tokens -- CRLF, a run
of WSP, a run of other bytes, a bare CR -- and a little held-back state:

* ``_crlfs``: line ends seen since the last content.  Empty lines at the end
  of the body are ignored (3.4.3, 3.4.4), and we cannot know that a CRLF is
  trailing until the body ends, so CRLFs are counted, not hashed, and
  released in front of the next content.  At the end the body gets exactly
  one CRLF: "simple" converts ``*CRLF`` at the end to one CRLF, and adds one
  to a body that has none, even an empty one (3.4.3); "relaxed" adds one
  only to a non-empty body (3.4.4), so an empty body, or one made only of
  empty or blank lines, canonicalizes to nothing.
* ``_sp`` ("relaxed" only): a WSP run seen on the current line.  It becomes
  one SP if content follows on the same line, and disappears if the line
  ends (3.4.4 a: trailing WSP ignored, runs reduced to one SP).  Removing
  the WSP first and the empty lines second is the order RFC 6376 adopted
  from RFC 4871 erratum 1384, so a line holding only WSP is an empty line.
* ``_cr``: a chunk that ends with CR, which may be the first half of a CRLF;
  the next chunk (or the end of the body) decides.

Lines are delimited by CRLF only.  The relay hands us CRLF-normalised mail,
but for any other input a bare CR or a bare LF is an ordinary byte (never
white space, never a line end), and ``relay/_fast/bodyhash.pyx`` must agree
byte for byte (tests/parity).

A body whose last line has no CRLF gets one (3.4.3, 3.4.4 b); with
"relaxed", WSP at the end of that unterminated line is removed first, as on
any line.  (dkimpy keeps one SP there; such a body cannot arrive over SMTP,
whose DATA always ends with CRLF.)

``limit`` caps the hashed canonical bytes (the signer's ``l=``, 3.5); the
canonicalization itself is unchanged.  ``length`` counts only bytes already
released; held-back bytes are not counted until they are released.
"""

from __future__ import annotations

import hashlib
import re

__all__ = ["BodyHasher"]

ALGORITHMS = ("sha256", "sha1")  # RFC 6376 section 3.3; we sign only sha256
CANONICALIZATIONS = ("simple", "relaxed")

# CRLF first, so that a CR followed by LF is never taken as a bare CR.
_TOKEN = re.compile(rb"\r\n|[ \t]+|[^ \t\r]+|\r")


class BodyHasher:
    """Streaming canonicalizer + hash of one body, for one (algo, canon, limit)."""

    def __init__(self, algo: str = "sha256", canon: str = "simple", limit: int | None = None):
        if algo not in ALGORITHMS:
            raise ValueError(f"unknown body hash algorithm {algo!r}")
        if canon not in CANONICALIZATIONS:
            raise ValueError(f"unknown body canonicalization {canon!r}")
        if limit is not None and limit < 0:
            raise ValueError("limit must be >= 0 or None")
        self._hash = hashlib.new(algo)
        self._relaxed = canon == "relaxed"
        self._limit = limit
        self._crlfs = 0  # line ends held back (maybe trailing empty lines)
        self._sp = False  # a WSP run held back (relaxed)
        self._cr = False  # a chunk ended with CR: maybe half a CRLF
        self._content = False  # any content released: decides relaxed's final CRLF
        self._digest: bytes | None = None
        self.length = 0  # canonical bytes hashed so far (l=)

    def update(self, chunk) -> None:
        """Feed the next piece of the body (bytes, bytearray or memoryview)."""
        if self._digest is not None:
            raise ValueError("BodyHasher.update() after digest()")
        data = memoryview(chunk).tobytes()  # any buffer, as _fast takes; not an int or str
        if self._cr:
            data = b"\r" + data
            self._cr = False
        if data.endswith(b"\r"):
            self._cr = True
            data = data[:-1]
        for match in _TOKEN.finditer(data):
            token = match.group()
            if token == b"\r\n":
                self._line_end()
            elif token[0] in b" \t" and self._relaxed:
                self._sp = True
            else:
                self._text(token)

    def digest(self) -> bytes:
        """End of body: release what the rules keep, return the raw digest."""
        if self._digest is None:
            if self._cr:  # the body ended with a bare CR: it is content
                self._cr = False
                self._text(b"\r")
            # One CRLF ends the canonical body: always for "simple" (also
            # the empty body, 3.4.3), only a non-empty one for "relaxed".
            if self._content or not self._relaxed:
                self._emit(b"\r\n")
            self._digest = self._hash.digest()
        return self._digest

    # -- the token rules -------------------------------------------------

    def _line_end(self) -> None:
        self._crlfs += 1
        self._sp = False  # WSP at the end of a line is ignored (3.4.4 a)

    def _text(self, token: bytes) -> None:
        # Content proves that the held-back line ends were not trailing.
        if self._crlfs:
            self._emit(b"\r\n" * self._crlfs)
            self._crlfs = 0
        if self._sp:
            self._emit(b" ")  # a WSP run inside a line becomes one SP (3.4.4 a)
            self._sp = False
        self._emit(token)
        self._content = True

    def _emit(self, data: bytes) -> None:
        if self._limit is not None:
            data = data[: max(0, self._limit - self.length)]
        if data:
            self._hash.update(data)
            self.length += len(data)
