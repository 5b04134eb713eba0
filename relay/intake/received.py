"""The Received: trace header the relay prepends (RFC 5321 4.4), pure."""

from __future__ import annotations

import email.utils
import functools
import re

_UNSAFE = re.compile(r"[^\x21-\x7e]")


@functools.lru_cache(maxsize=4)
def date_of_second(second: int) -> str:
    """RFC 5322 date of a second, local time: once a second, not once a
    message (formatdate showed in the profile; it has no sub-second part)."""
    return email.utils.formatdate(second, localtime=True)


def received_header(
    *,
    helo: str,
    peer_ip: str,
    hostname: str,
    protocol: str,
    queue_id: str,
    recipients: list[str],
    when: float,
) -> bytes:
    """``Received: from HELO ([ip]) by host with PROTO id QID [for <rcpt>]; date``."""
    helo = _UNSAFE.sub("?", helo)[:255] or "unknown"
    address = f"IPv6:{peer_ip}" if ":" in peer_ip else peer_ip
    lines = [
        f"Received: from {helo} ([{address}])",
        f"\tby {hostname} (relay) with {protocol} id {queue_id}",
    ]
    date = date_of_second(int(when))
    if len(recipients) == 1 and recipients[0].isascii():
        lines.append(f"\tfor <{_UNSAFE.sub('?', recipients[0])}>; {date}")
    else:
        lines[-1] += ";"
        lines.append(f"\t{date}")
    return ("\r\n".join(lines) + "\r\n").encode("ascii", "replace")


def protocol_name(esmtp: bool, tls: bool, authenticated: bool) -> str:
    """RFC 3848 WITH protocol types: SMTP, ESMTP, ESMTPS, ESMTPA, ESMTPSA."""
    if not esmtp:
        return "SMTP"
    return "ESMTP" + ("S" if tls else "") + ("A" if authenticated else "")
