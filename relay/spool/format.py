"""Spool records (pure): states, and a part's envelope as plain data.

The envelope form is what one worker sends another when it hands over a
part: versioned, JSON-ready, with the body travelling beside it unchanged.
"""

from __future__ import annotations

import enum

from relay.errors import CorruptEntry
from relay.model import Part, Recipient

FORMAT_VERSION = 1


class MessageState(enum.IntEnum):
    HELD = 0  # part of a multi-owner transaction, waiting for the decision
    ACTIVE = 1  # ready for delivery


class RecipientState(enum.IntEnum):
    QUEUED = 0
    DEFERRED = 1
    DELIVERED = 2
    BOUNCED = 3


def envelope_of(part: Part) -> dict:
    """The envelope of a part as plain data (the body travels beside it)."""
    return {
        "v": FORMAT_VERSION,
        "id": part.queue_id,
        "from": part.sender,
        "at": part.received_at,
        "utf8": part.smtputf8,
        "coord": part.coordinator,
        "rcpt": [[r.address, r.domain, r.slot, r.index] for r in part.recipients],
    }


def part_from(envelope: dict, body: bytes) -> Part:
    try:
        if envelope["v"] != FORMAT_VERSION:
            raise CorruptEntry(f"unknown part format version {envelope['v']!r}")
        return Part(
            queue_id=envelope["id"],
            sender=envelope["from"],
            recipients=tuple(Recipient(a, d, s, i) for a, d, s, i in envelope["rcpt"]),
            body=body,
            received_at=envelope["at"],
            smtputf8=envelope["utf8"],
            coordinator=envelope["coord"],
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise CorruptEntry(f"undecodable part envelope: {exc}") from None
