"""A message's class (its lane) and campaign, chosen at intake (pure).

Input: the message's header section, and the class its way in gives: the
listener (``[[listen]] class``), the AUTH user (``[[intake.users]]
class``), the AMQP consumer (``[[amqp.consumer]] class``).  Output:
``Labels(lane, campaign, tenant)``, or ``BadLabel`` with the reply for a
value the relay cannot use.

The first that says something wins: the ``X-Relay-Class`` header, the
listener, the user, a campaign header (``X-Relay-Campaign``: bulk); else
``transactional``.  An unknown ``X-Relay-Class`` is refused rather than
guessed: sent as bulk it could delay a sign-up mail, sent as transactional
it could take the room kept for those.  The headers are stripped before
delivery with every ``X-Relay-*`` field (dispatch.strip_internal_headers).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from relay.model import BULK, LANES, TRANSACTIONAL

MAX_NAME = 64  # characters of a campaign or tenant name (they are labels in /metrics)
_NAME = re.compile(r"[\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?")  # printable ASCII, no edge spaces
_FIELD = re.compile(rb"^x-relay-(class|campaign|tenant)[ \t]*:(.*)$", re.IGNORECASE)

S550_BAD_CLASS = '550 5.6.0 X-Relay-Class must be "transactional" or "bulk"'
S550_BAD_CAMPAIGN = (f"550 5.6.0 X-Relay-Campaign and X-Relay-Tenant must be 1 to {MAX_NAME}"
                     " printable ASCII characters")


class BadLabel(ValueError):
    """A class, campaign or tenant the relay refuses; ``reply`` says why."""

    def __init__(self, reply: str) -> None:
        super().__init__(reply)
        self.reply = reply

    @property
    def text(self) -> str:
        """The reply without its codes (for HTTP and AMQP)."""
        return self.reply.split(" ", 2)[2]


@dataclass(frozen=True, slots=True)
class Labels:
    lane: str = TRANSACTIONAL
    campaign: str = ""
    tenant: str = ""


def header_fields(content: bytes) -> dict[str, str]:
    """The first ``X-Relay-Class/-Campaign/-Tenant`` of the header section,
    unfolded and trimmed, by lower-case suffix (``class``...)."""
    end = content.find(b"\r\n\r\n")
    head = content if end < 0 else content[: end + 2]
    if b"x-relay-" not in head.lower():
        return {}
    unfolded: list[bytes] = []
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and unfolded:
            unfolded[-1] += b" " + line.strip()
        elif line:
            unfolded.append(line)
    found: dict[str, str] = {}
    for line in unfolded:
        match = _FIELD.match(line)
        if match:
            found.setdefault(match.group(1).lower().decode(), match.group(2).strip().decode("latin-1"))
    return found


def valid_name(value: str) -> bool:
    """A campaign or tenant name the relay takes (1 to MAX_NAME printable ASCII)."""
    return len(value) <= MAX_NAME and _NAME.fullmatch(value) is not None


def _name(value: str | None) -> str:
    if value is None or value == "":
        return ""
    if not valid_name(value):
        raise BadLabel(S550_BAD_CAMPAIGN)
    return value


def _lane(value: str) -> str:
    lane = value.strip().lower()
    if lane not in LANES:
        raise BadLabel(S550_BAD_CLASS)
    return lane


def choose(content: bytes, *, listener: str = "", user: str = "",
           declared: dict[str, str | None] | None = None) -> Labels:
    """The labels of one message.  ``declared`` holds values given beside
    the message (an AMQP relay-format ``class`` / ``campaign``): they count
    as its headers and win over them."""
    fields = header_fields(content)
    for key, value in (declared or {}).items():
        if value is not None:
            fields[key] = value
    campaign = _name(fields.get("campaign"))
    tenant = _name(fields.get("tenant"))
    if fields.get("class"):
        lane = _lane(fields["class"])
    elif listener:
        lane = listener
    elif user:
        lane = user
    elif campaign:
        lane = BULK
    else:
        lane = TRANSACTIONAL
    return Labels(lane, campaign, tenant)
