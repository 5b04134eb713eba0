"""DKIM header canonicalization (RFC 6376 section 3.4): the specification.

Input: one header field split at its first colon -- ``name`` exactly as it
appears (any whitespace before the colon included) and ``value``, everything
after the colon up to, not including, the CRLF that ends the field (folding
CRLFs inside it included).
Output: the canonical ``name:value`` line WITHOUT a trailing CRLF.

Why no CRLF: a signer hashes each signed field followed by CRLF, but the
DKIM-Signature field it is creating without one (RFC 6376 section 3.7,
step 2).  Returning the bare line lets one function serve both; the caller
appends ``b"\\r\\n"`` where the RFC wants it.

This module is readable rather than fast; ``relay/_fast/canon.pyx`` must
return the same bytes for every input, valid or not (tests/parity).
"""

from __future__ import annotations

import re

__all__ = ["canon_header_relaxed", "canon_header_simple"]

# WSP is SP / HTAB (RFC 5234 appendix B.1).  Nothing else counts as white
# space here: a bare CR or LF, a VT or a byte >= 0x80 is an ordinary byte.
_WSP = b" \t"

# Unfolding (RFC 5322 section 2.2.3) removes a CRLF only when WSP follows it.
# The look-ahead reads the original value, so this is one pass over it.  Only
# a value holding CRLF CRLF WSP, which no header can (CRLF CRLF ends the
# header block), gets a new fold from it: the first CRLF stays, and now WSP
# follows it (tests/fuzz checks idempotence on every other value).
_FOLD = re.compile(rb"\r\n(?=[ \t])")
_WSP_RUN = re.compile(rb"[ \t]+")


def _check(name: bytes, value: bytes) -> None:
    if not isinstance(name, bytes) or not isinstance(value, bytes):
        raise TypeError("name and value must be bytes")


def canon_header_simple(name: bytes, value: bytes) -> bytes:
    """RFC 6376 section 3.4.1: the field exactly as it appears, no change."""
    _check(name, value)
    return name + b":" + value


def canon_header_relaxed(name: bytes, value: bytes) -> bytes:
    """RFC 6376 section 3.4.2, the steps applied in the RFC's order.

    1. Lower-case the field name (ASCII letters only: names are ASCII).
    2. Unfold: drop each CRLF that is followed by WSP.
    3. Turn every run of WSP into one SP, including WSP on both sides of a
       fold that step 2 removed.
    4. Delete WSP at the end of the value.
    5. Delete WSP before and after the colon (the end of the name, the start
       of the value); keep the colon.
    """
    _check(name, value)
    name = name.lower().rstrip(_WSP)
    value = _FOLD.sub(b"", value)
    value = _WSP_RUN.sub(b" ", value)
    value = value.strip(_WSP)
    return name + b":" + value
