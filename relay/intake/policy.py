"""Intake policy (pure): parse SMTP paths, decide who may relay where.

Input: the text of a MAIL/RCPT argument, the client's address and whether
it authenticated.  Output: a parsed ``Path`` or a reply from the catalogue.

Paths follow RFC 5321 section 4.1.2 (with RFC 6531's UTF-8 extension), not
RFC 5322's header grammar: a source route (``<@a,@b:user@c>``) is kept
visible so policy can refuse it instead of silently dropping it.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from dataclasses import dataclass

import idna

from relay.intake import replies

# RFC 5321 4.5.3.1: size limits of the parts of a path.
MAX_LOCAL_PART = 64
MAX_DOMAIN = 255
MAX_PATH = 256

_ATEXT = r"A-Za-z0-9!#$%&'*+/=?^_`{|}~\-"
# UTF8-non-ascii (RFC 6532 3.1) without C1 controls and without the lone
# surrogates that stand for undecodable bytes (aiosmtpd's surrogateescape).
_UTF8 = r"\u00a0-\ud7ff\ue000-\U0010FFFF"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?"
_ULABEL = rf"[A-Za-z0-9{_UTF8}](?:[A-Za-z0-9\-{_UTF8}]*[A-Za-z0-9{_UTF8}])?"


def _mailbox_re(utf8: bool) -> re.Pattern:
    atext = _ATEXT + (_UTF8 if utf8 else "")
    qtext = r"\x20\x21\x23-\x5b\x5d-\x7e" + (_UTF8 if utf8 else "")
    label = _ULABEL if utf8 else _LABEL
    dot_string = rf"[{atext}]+(?:\.[{atext}]+)*"
    quoted = rf'"(?:[{qtext}]|\\[\x20-\x7e])*"'
    domain = rf"{label}(?:\.{label})*"
    literal = r"\[[A-Za-z0-9:.\-]+\]"
    route = rf"@{domain}(?:,@{domain})*:"
    return re.compile(
        rf"(?P<route>{route})?(?P<local>{dot_string}|{quoted})@(?P<domain>{domain}|{literal})"
    )


_MAILBOX = {False: _mailbox_re(False), True: _mailbox_re(True)}


@dataclass(frozen=True)
class Path:
    address: str  # local@domain, route removed
    local: str
    domain: str
    route: str  # "" or "@a,@b:"


class PathError(ValueError):
    def __init__(self, reply: str) -> None:
        super().__init__(reply)
        self.reply = reply


def parse_path(text: str, *, utf8: bool) -> tuple[Path | None, str]:
    """Parse ``<path> params`` -> (Path or None for ``<>``, the rest).

    Raises PathError with the reply to send.  A bare mailbox without angle
    brackets is accepted, as most MTAs do.
    """
    text = text.strip()
    if text.startswith("<"):
        end = _closing_bracket(text)
        if end < 0:
            raise PathError(replies.S553_BAD_RCPT)
        inner, rest = text[1:end], text[end + 1 :]
        if rest and not rest.startswith(" "):
            raise PathError(replies.S553_BAD_RCPT)
    else:
        inner, _, rest = text.partition(" ")
    if inner == "":
        return None, rest.strip()
    if not inner.isascii() and not utf8:
        raise PathError(replies.S553_UTF8_NEEDS_SMTPUTF8)
    match = _MAILBOX[utf8].fullmatch(inner)
    if match is None:
        raise PathError(replies.S553_BAD_RCPT)
    local, domain = match.group("local"), match.group("domain")
    octets = len if inner.isascii() else _utf8_length  # the limits are in octets
    if (
        octets(local) > MAX_LOCAL_PART
        or octets(domain) > MAX_DOMAIN
        or octets(inner) + 2 > MAX_PATH
    ):
        raise PathError(replies.S553_BAD_RCPT)
    if domain.startswith("["):
        if not _valid_literal(domain[1:-1]):
            raise PathError(replies.S553_BAD_RCPT)
    else:
        try:  # a label's limit (63 octets) is on its A-label form
            a_labels = routing_domain(domain)
        except BadDomain:
            raise PathError(replies.S553_BAD_RCPT) from None
        if any(len(label) > 63 for label in a_labels.split(".")):
            raise PathError(replies.S553_BAD_RCPT)
    return Path(f"{local}@{domain}", local, domain, match.group("route") or ""), rest.strip()


def _utf8_length(text: str) -> int:
    return len(text.encode("utf-8"))


def _closing_bracket(text: str) -> int:
    """Index of the ">" that closes a path starting with "<", skipping
    quoted strings and quoted pairs (``<"a>b"@x>``); -1 if none."""
    if '"' not in text:  # nearly every path: nothing to skip
        return text.find(">")
    quoted = escaped = False
    for index, char in enumerate(text):
        if escaped:
            escaped = False
        elif char == "\\" and quoted:
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == ">" and not quoted:
            return index
    return -1


def _valid_literal(text: str) -> bool:
    if text.lower().startswith("ipv6:"):
        text = text[5:]
        kind = ipaddress.IPv6Address
    else:
        kind = ipaddress.IPv4Address
    try:
        kind(text)
    except ValueError:
        return False
    return True


@functools.lru_cache(maxsize=4096)
def is_trusted(peer_ip: str, mynetworks: tuple) -> bool:
    """Whether a client address is inside ``intake.mynetworks`` (asked per
    recipient; cached, as parsing the address showed in the profile)."""
    try:
        address = ipaddress.ip_address(peer_ip)
    except ValueError:
        return False
    if address.version == 6 and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in mynetworks)


def check_recipient(path: Path, *, may_relay: bool) -> str | None:
    """The refusal for a recipient, or None when it is accepted.

    The relay has no local domains: every recipient is relayed, so a client
    that is neither in mynetworks nor authenticated may send nowhere, however
    the address is written (source route, percent hack, bang path, quoted
    local part holding ``@`` or ``%``).  Source routes are refused for every
    client: RFC 5321 Appendix C deprecates them, and honouring one would let
    a client pick the next hop.
    """
    if not may_relay:
        return replies.S550_RELAY_DENIED
    if path.route:
        return replies.S550_ROUTE_DENIED
    return None


def relay_trick(path: Path) -> str | None:
    """Name the relay trick an address uses, for the log (None for plain)."""
    if path.route:
        return "source route"
    local = path.local
    if local.startswith('"') and ("@" in local or "%" in local):
        return "quoted local part with @ or %"
    if "%" in local:
        return "percent hack"
    if "!" in local:
        return "bang path"
    return None


class BadDomain(ValueError):
    """A domain that has no valid A-label form."""


@functools.lru_cache(maxsize=65536)
def routing_domain(domain: str) -> str:
    """The lower-cased A-label form of a domain (address literals unchanged).

    Shard routing hashes this form, so one domain written in U-labels or
    A-labels, upper or lower case, always lands in the same slot.
    """
    domain = domain.lower()
    if domain.startswith("[") or domain.isascii():
        return domain
    try:
        return idna.encode(domain, uts46=True).decode("ascii")
    except (idna.IDNAError, UnicodeError) as exc:
        raise BadDomain(str(exc)) from None
