"""Delivery status notifications (pure): the bounce a sender gets back.

Input: the failed (or delayed) recipients of one queued message, each with
the last reply it got, the message's envelope sender, queue id and arrival
time, and the original message (only its header section is used).
Output: a complete RFC 5322 message, as bytes with CRLF line endings: an
RFC 3464 DSN, ``multipart/report; report-type=delivery-status`` (RFC 6522)
with three parts:

1. ``text/plain``: the explanation for a human, one line per recipient
   with the remote reply (for a recipient whose message outlived
   ``max_lifetime``: that it expired, and the last reply);
2. ``message/delivery-status``: the per-message fields (Reporting-MTA,
   X-Queue-ID, Arrival-Date) and one block per recipient (Final-Recipient,
   Action, Status, Remote-MTA, Diagnostic-Code, Last-Attempt-Date);
3. ``text/rfc822-headers`` (``message/global-headers`` when they hold
   UTF-8, RFC 6533): the original header section, never the body.

One notice covers every failed recipient of a message (Postfix sends one
per message and sender, not one per recipient): the caller gathers them.
Like Postfix bounce(8) through cleanup(8), the caller queues the result as a
new message, from the null sender ``<>`` (RFC 5321 4.5.5, RFC 3464 2) so a
bounce can never cause another; ``should_bounce`` says whether a sender may
get one at all.  No clock and no randomness here: ``now`` is passed in, and
the Message-ID and MIME boundary are derived from the inputs, so the same
notice built twice is the same message (a re-queued duplicate is
recognisable).
"""

from __future__ import annotations

import binascii
import datetime
import email.utils
import hashlib
import re
from dataclasses import dataclass

from relay.model import Reply
from relay.outcome.classify import status_code

__all__ = ["FailedRecipient", "build_dsn", "original_headers", "should_bounce", "MAX_HEADERS"]

# The original header section is cut here: a message with megabytes of
# headers must not make a bounce of the same size.
MAX_HEADERS = 64 * 1024
# The remote text quoted in a DSN is cut here (replies may be 4 KiB a line).
MAX_DIAGNOSTIC = 900

ACTIONS = ("failed", "delayed")
CRLF = "\r\n"


@dataclass(frozen=True, slots=True)
class FailedRecipient:
    address: str  # the recipient as given in RCPT TO
    reply: Reply  # the last reply (or made-up local failure) it got
    action: str  # "failed" | "delayed" (RFC 3464 2.3.3)
    last_attempt: float  # wall-clock seconds
    expired: bool = False  # failed because the message outlived max_lifetime


def should_bounce(sender: str) -> bool:
    """Whether a DSN may go to this envelope sender.

    Never to the null sender (RFC 5321 4.5.5: that is what a bounce is sent
    from, and bouncing a bounce loops), nor to MAILER-DAEMON, the name
    mail systems give the null sender.  Addresses such as ``owner-*`` or
    ``*-request`` do get bounces: that is how mailing lists learn of dead
    subscribers.
    """
    address = sender.strip()
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1].strip()
    if not address:
        return False
    local = address.rpartition("@")[0] if "@" in address else address
    return local.strip('"').lower() != "mailer-daemon"


def build_dsn(
    *,
    reporting_mta: str,
    queue_id: str,
    sender: str,
    arrival: float,
    recipients: list[FailedRecipient],
    original: bytes,
    now: float,
    delayed: bool = False,
) -> bytes:
    """The DSN for ``recipients`` of message ``queue_id`` (see the module
    docstring); ``delayed`` makes it a warning that retries continue."""
    if not recipients:
        raise ValueError("a DSN needs at least one recipient")
    if not should_bounce(sender):
        raise ValueError(f"no DSN may go to {sender!r} (check should_bounce first)")
    for rcpt in recipients:
        if rcpt.action not in ACTIONS:
            raise ValueError(f"DSN action must be one of {ACTIONS}, not {rcpt.action!r}")
    for name, value in [("reporting_mta", reporting_mta), ("queue_id", queue_id), ("sender", sender)]:
        _check_one_line(name, value)
    for rcpt in recipients:
        _check_one_line("address", rcpt.address)

    parts = [
        _human_part(reporting_mta, arrival, recipients, delayed),
        _status_part(reporting_mta, queue_id, arrival, recipients),
        _headers_part(original_headers(original)),
    ]

    # Derived, not random: distinct notices (another message, moment, kind
    # or recipient set) get distinct ids; the same notice gets the same one.
    digest = hashlib.sha256(
        "\0".join(
            [queue_id, repr(now), "delayed" if delayed else "failed"]
            + [rcpt.address for rcpt in recipients]
        ).encode("utf-8")
    ).hexdigest()
    # "=_" cannot occur in quoted-printable text; RFC 2046 allows 70 chars.
    boundary = _boundary(f"=_dsn_{digest[:24]}", parts)
    subject = "Delayed Mail (still being retried)" if delayed else "Undelivered Mail Returned to Sender"
    eight_bit = any(not body.isascii() for _, body in parts)

    head = [
        f"From: Mail Delivery System <MAILER-DAEMON@{reporting_mta}>",
        f"To: <{sender}>",
        f"Subject: {subject}",
        f"Date: {_date(now)}",
        f"Message-ID: <{queue_id}.{digest[16:32]}@{reporting_mta}>",
        "Auto-Submitted: auto-replied",  # RFC 3834 5: no auto-reply to this
        "MIME-Version: 1.0",
        "Content-Type: multipart/report; report-type=delivery-status;",
        f' boundary="{boundary}"',
        f"Content-Transfer-Encoding: {'8bit' if eight_bit else '7bit'}",
    ]
    out = [(CRLF.join(head) + CRLF + CRLF).encode("utf-8")]
    out.append(b"This is a MIME-encapsulated message." + b"\r\n")
    delimiter = f"\r\n--{boundary}\r\n".encode("ascii")
    for part_head, body in parts:
        out += [delimiter, part_head.encode("ascii"), b"\r\n", body]
    out.append(f"\r\n--{boundary}--\r\n".encode("ascii"))
    return b"".join(out)


def original_headers(original: bytes, limit: int = MAX_HEADERS) -> bytes:
    """The header section of ``original`` with CRLF line endings, ending in
    CRLF, without the blank line or anything after it; at most ``limit``
    bytes, cut before a field (never inside one) when it is longer."""
    if original.startswith((b"\r\n", b"\n")):
        return b""  # no header section at all
    end = re.search(rb"\n\r?\n", original)
    head = original[: end.start() + 1] if end else original
    head = head.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    if head and not head.endswith(b"\r\n"):
        head += b"\r\n"
    if len(head) > limit:
        # End at the last line break inside the limit that is followed by a
        # new field: a folded field cut in half would be a different field.
        cut = head.rfind(b"\r\n", 0, limit)
        while cut >= 0 and head[cut + 2 : cut + 3] in (b" ", b"\t"):
            cut = head.rfind(b"\r\n", 0, cut)
        head = head[: cut + 2] if cut >= 0 else b""
    return head


# -- the three parts ---------------------------------------------------------


def _human_part(
    reporting_mta: str, arrival: float, recipients: list[FailedRecipient], delayed: bool
) -> tuple[str, bytes]:
    lines = [f"This is the mail system at host {reporting_mta}.", ""]
    if delayed:
        lines += [
            "####### THIS IS A WARNING ONLY.  YOU DO NOT NEED TO RESEND YOUR MESSAGE. #######",
            "",
            "Your message could not be delivered to one or more recipients yet.",
            "The mail system will keep trying until the message expires.",
        ]
    else:
        lines += [
            "Your message could not be delivered to one or more recipients.",
            "The reasons are below; the headers of your message are attached.",
        ]
    for action, heading in (("failed", "Delivery failed, no further attempts:"),
                            ("delayed", "Delivery delayed, still being retried:")):
        group = [rcpt for rcpt in recipients if rcpt.action == action]
        if not group:
            continue
        lines += ["", heading, ""]
        for rcpt in group:
            if rcpt.expired:
                lines.append(f"<{rcpt.address}>: {_expired(arrival, rcpt)}; the last attempt:"
                             f" {_explain(rcpt.reply)}")
            else:
                lines.append(f"<{rcpt.address}>: {_explain(rcpt.reply)}")
    text = CRLF.join(lines) + CRLF
    data = text.encode("utf-8")
    if data.isascii() and max(len(line) for line in lines) <= 998:
        return (
            "Content-Type: text/plain; charset=us-ascii\r\n"
            "Content-Description: Notification\r\n",
            data,
        )
    # Non-ASCII addresses or replies: quoted-printable keeps the part 7-bit
    # (b2a_qp keeps the CRLF line endings it finds).
    return (
        "Content-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: quoted-printable\r\n"
        "Content-Description: Notification\r\n",
        binascii.b2a_qp(data, istext=True),
    )


def _explain(reply: Reply) -> str:
    text = _one_line(reply.text)
    if reply.code == 0:
        where = f" talking to {reply.mx}" if reply.mx else ""
        return f"delivery failed{where}: {text}"
    if reply.mx:
        return f"host {reply.mx} said: {_one_line(str(reply))}"
    return _one_line(str(reply))


def _expired(arrival: float, rcpt: FailedRecipient) -> str:
    return f"message expired after {_age(rcpt.last_attempt - arrival)} in the queue"


def _age(seconds: float) -> str:
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size:
            count = round(seconds / size)
            return f"{count} {unit}{'s' if count != 1 else ''}"
    count = max(round(seconds), 0)
    return f"{count} second{'s' if count != 1 else ''}"


def _status_part(
    reporting_mta: str, queue_id: str, arrival: float, recipients: list[FailedRecipient]
) -> tuple[str, bytes]:
    blocks = [
        [
            f"Reporting-MTA: dns; {reporting_mta}",
            # Original-Envelope-Id is only for an ENVID the client gave
            # (RFC 3461 4.4); the queue id is ours, hence an X- field.
            f"X-Queue-ID: {queue_id}",
            f"Arrival-Date: {_date(arrival)}",
        ]
    ]
    for rcpt in recipients:
        reply = rcpt.reply
        block = [
            f"Final-Recipient: {_address_field(rcpt.address)}",
            f"Action: {rcpt.action}",
            f"Status: {status_code(reply)}",
        ]
        if reply.mx:
            block.append(f"Remote-MTA: dns; {_ascii(reply.mx)}")
        # "smtp" only for what an SMTP server said (RFC 3464 2.3.6); a
        # local failure (code 0, or DNS with no host) is described in our
        # own words, as Postfix does with "X-Postfix".  So is expiry: the
        # last reply was a deferral, the failure is ours.  The Status stays
        # the last reply's 4.x.x, as Postfix keeps it.
        if rcpt.expired:
            last = _one_line(str(reply) if reply.code else reply.text)
            last += f" from {reply.mx}" if reply.mx else ""
            block.append(_fold("Diagnostic-Code", f"X-Relay; {_ascii(_expired(arrival, rcpt))},"
                                                  f" last reply: {_ascii(last)}"))
        elif reply.code != 0 and reply.mx:
            block.append(_fold("Diagnostic-Code", f"smtp; {_ascii(_one_line(str(reply)))}"))
        else:
            block.append(_fold("Diagnostic-Code", f"X-Relay; {_ascii(_one_line(reply.text))}"))
        block.append(f"Last-Attempt-Date: {_date(rcpt.last_attempt)}")
        blocks.append(block)
    text = CRLF.join(CRLF.join(block) + CRLF for block in blocks)
    return (
        "Content-Type: message/delivery-status\r\n"
        "Content-Description: Delivery report\r\n",
        text.encode("ascii"),
    )


def _headers_part(headers: bytes) -> tuple[str, bytes]:
    if headers.isascii():
        kind, encoding = "text/rfc822-headers", "7bit"
    else:
        kind, encoding = "message/global-headers", "8bit"  # RFC 6533 3.3: UTF-8 headers
    return (
        f"Content-Type: {kind}\r\n"
        f"Content-Transfer-Encoding: {encoding}\r\n"
        "Content-Description: Undelivered Message Headers\r\n",
        headers,
    )


# -- field helpers -------------------------------------------------------------


def _address_field(address: str) -> str:
    """RFC 3464 2.3.2 address: ``rfc822;`` when ASCII, else RFC 6533's
    ``utf-8;`` with utf-8-addr-xtext, which keeps the part 7-bit."""
    if address.isascii():
        return f"rfc822; {address}"
    return f"utf-8; {_embedded_unicode(address, keep=_QCHAR)}"


# RFC 6533 QCHAR: printable ASCII except "+", "=" and "\".
_QCHAR = frozenset(chr(c) for c in range(0x21, 0x7F)) - {"+", "=", "\\"}
_PRINTABLE = frozenset(chr(c) for c in range(0x20, 0x7F)) - {"\\"}


def _embedded_unicode(text: str, keep: frozenset[str]) -> str:
    # RFC 6533 EmbeddedUnicodeChar: \x{HEXPOINT}, upper case, no leading 0.
    return "".join(ch if ch in keep else f"\\x{{{ord(ch):X}}}" for ch in text)


def _ascii(text: str) -> str:
    """Text for a 7-bit field: other characters as RFC 6533 \\x{...},
    cut again to MAX_DIAGNOSTIC (escapes make it longer), never inside an
    escape, so a field line stays under RFC 5322's 998 characters."""
    text = _embedded_unicode(text, keep=_PRINTABLE)
    if len(text) > MAX_DIAGNOSTIC:
        text = text[: MAX_DIAGNOSTIC - 3]
        if text.rfind("\\x{") > text.rfind("}"):
            text = text[: text.rfind("\\x{")]
        text += "..."
    return text


def _one_line(text: str) -> str:
    """A remote reply as one line: its lines joined, control characters
    blanked (the text came off the wire), and cut to MAX_DIAGNOSTIC."""
    text = " ".join(line.strip() for line in text.splitlines())
    text = "".join(" " if (ord(ch) < 0x20 or ord(ch) == 0x7F) else ch for ch in text)
    text = re.sub(r"\s+", " ", text).strip()
    if len(text) > MAX_DIAGNOSTIC:
        text = text[: MAX_DIAGNOSTIC - 3] + "..."
    return text


def _fold(name: str, value: str, width: int = 78) -> str:
    """``name: value``, folded at spaces (RFC 5322 2.2.3) to ``width``
    where the words allow; a word too long for any line stays whole."""
    lines: list[str] = []
    line = f"{name}:"
    for word in value.split(" "):
        if len(line) + 1 + len(word) > width and line.strip() and not line.endswith(":"):
            lines.append(line)
            line = ""
        line += f" {word}"
    lines.append(line)
    return CRLF.join(lines)


def _check_one_line(name: str, value: str) -> None:
    # These come from our own records; a line break would forge fields.
    if "\r" in value or "\n" in value:
        raise ValueError(f"{name} contains a line break: {value!r}")


def _boundary(base: str, parts: list[tuple[str, bytes]]) -> str:
    # The boundary must not occur in any part (RFC 2046 5.1.1); the quoted
    # headers are the sender's text, so check rather than hope.
    boundary, n = base, 0
    while any(f"--{boundary}".encode("ascii") in body for _, body in parts):
        n += 1
        boundary = f"{base}.{n}"
    return boundary


def _date(timestamp: float) -> str:
    # UTC: the output must not depend on the host's time zone.
    return email.utils.format_datetime(datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc))

