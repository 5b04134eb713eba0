"""The reply catalogue of the SMTP intake, and enhanced status codes.

Every reply the relay sends carries an RFC 3463 enhanced status code
(ENHANCEDSTATUSCODES is offered).  Replies written by aiosmtpd itself lack
them; ``enhance()`` rewrites those by their text, or gives the default code
of the reply's class, so the catalogue here is the single place that says
what a client sees.
"""

from __future__ import annotations

import functools
import re

S221_BYE = "221 2.0.0 Bye"
S250_OK = "250 2.0.0 OK"
S250_SENDER_OK = "250 2.1.0 Sender OK"
S250_RCPT_OK = "250 2.1.5 Recipient OK"
S421_SHUTTING_DOWN = "421 4.3.2 Service shutting down, try again later"
S421_TOO_MANY_CONNECTIONS = "421 4.7.0 Too many connections from your address"
S421_AUTH_LOCKED = "421 4.7.0 Too many failed authentications, try again later"
S421_IDLE = "421 4.4.2 Idle timeout, closing connection"
S421_TOO_SLOW = "421 4.4.2 Data rate too slow, closing connection"
S451_TRY_AGAIN = "451 4.3.0 Temporary failure, try again later"
S451_LOW_MEMORY = "451 4.3.1 Insufficient system resources, try again later"
S452_LOW_DISK = "452 4.3.1 Insufficient system storage, try again later"
S452_TOO_MANY_RCPTS = "452 4.5.3 Too many recipients"
S501_BAD_SENDER = "501 5.1.7 Bad sender address syntax"
S550_RELAY_DENIED = "550 5.7.1 Relaying denied"
S550_ROUTE_DENIED = "550 5.7.1 Source routes are not accepted"
S550_BARE_LINE_ENDING = "550 5.5.2 Bare CR or LF in message data is not allowed"
S550_NUL = "550 5.6.0 NUL character in message data is not allowed"
S552_TOO_BIG = "552 5.3.4 Message size exceeds fixed maximum message size"
S553_BAD_RCPT = "553 5.1.3 Bad recipient address syntax"
S553_BAD_DOMAIN = "553 5.1.2 Bad destination domain"
S553_UTF8_NEEDS_SMTPUTF8 = "553 5.6.7 Non-ASCII address requires SMTPUTF8"
S554_LOOP = "554 5.4.6 Too many Received headers: mail loop detected"
S500_LINE_TOO_LONG = "500 5.5.2 Line too long"
S530_AUTH_REQUIRED = "530 5.7.0 Authentication required"


def queued(queue_id: str) -> str:
    return f"250 2.0.0 OK queued as {queue_id}"


# aiosmtpd's own replies (matched by their start) -> ours.
_REWRITES: tuple[tuple[str, str], ...] = (
    ("250 OK", S250_OK),
    ("221 Bye", S221_BYE),
    ("500 Command line too long", S500_LINE_TOO_LONG),
    ("500 Line too long", S500_LINE_TOO_LONG),
    ("500 Error: bad syntax", "500 5.5.2 Syntax error"),
    ("500 Error: strict ASCII mode", "500 5.6.7 Non-ASCII command without SMTPUTF8"),
    ("500 Error: command", "500 5.5.1 Command not recognized"),
    ("501 Syntax: MAIL", "501 5.5.4 Syntax: MAIL FROM:<address>"),
    ("501 Syntax: RCPT", "501 5.5.4 Syntax: RCPT TO:<address>"),
    ("501 Error: SMTPUTF8 disabled", "501 5.5.4 SMTPUTF8 is not enabled"),
    ("501 Error: BODY", "501 5.5.4 BODY must be 7BIT or 8BITMIME"),
    ("503 Error: nested MAIL", "503 5.5.1 Nested MAIL command"),
    ("503 Error: need MAIL", "503 5.5.1 Need MAIL command"),
    ("503 Error: need RCPT", "503 5.5.1 Need RCPT command"),
    ("503 Error: send HELO", "503 5.5.1 Send HELO/EHLO first"),
    ("503 Already authenticated", "503 5.5.1 Already authenticated"),
    ("552 Error: message size exceeds", S552_TOO_BIG),
    ("552 Error: Too much mail data", S552_TOO_BIG),
    ("553 5.1.3 Error: malformed address", "553 5.1.3 Malformed address"),
    ("502 Could not VRFY", "502 5.5.4 Could not VRFY that address"),  # theirs echoes it
    ("555 MAIL FROM parameters", "555 5.5.4 MAIL FROM parameters not recognized"),
    ("555 RCPT TO parameters", "555 5.5.4 RCPT TO parameters not recognized"),
    ("530 5.7.0 Authentication required", S530_AUTH_REQUIRED),
    ("554 Command refused due to lack of security", "554 5.7.0 TLS negotiation failed"),
)

# Default enhanced code by reply code, for anything else.
_DEFAULTS = {
    "211": "2.0.0", "214": "2.0.0", "221": "2.0.0", "235": "2.7.0", "250": "2.0.0",
    "252": "2.0.0", "421": "4.3.0", "450": "4.2.0", "451": "4.3.0", "452": "4.3.1",
    "454": "4.7.0", "500": "5.5.2", "501": "5.5.4", "502": "5.5.1", "503": "5.5.1",
    "504": "5.5.4", "530": "5.7.0", "534": "5.7.9", "535": "5.7.8", "538": "5.7.11",
    "550": "5.0.0", "552": "5.3.4", "553": "5.1.3", "554": "5.0.0", "555": "5.5.4",
}

_HAS_ENHANCED = re.compile(r"^\d{3}[ -][245]\.\d{1,3}\.\d{1,3}( |$)")


@functools.lru_cache(maxsize=1024)
def enhance(reply: str) -> str:
    """Our catalogue's wording for aiosmtpd's replies; an enhanced status
    code for any other one-line reply that has none.  Cached: the same few
    replies come back for every command (a 250 with a queue id is a miss)."""
    for start, ours in _REWRITES:
        if reply.startswith(start):
            return ours
    if _HAS_ENHANCED.match(reply):
        return reply
    code, sep, text = reply[:3], reply[3:4], reply[4:]
    default = _DEFAULTS.get(code)
    if default is None or sep not in (" ", "-"):
        return reply
    return f"{code}{sep}{default} {text}".rstrip()
