"""Shard routing (pure): recipient domain -> slot -> owner worker.

The slot is a stable hash (CRC-32, never Python's per-process ``hash()``)
of the lower-cased A-label domain, modulo a fixed slot count that is
recorded in every spool.  ``owner(slot) = slot % workers``, so one domain's
mail, queues and limits live in exactly one worker.  The key of an AMQP
message (intake.amqp_message.payload_key) has an owner the same way: the
worker that records, in one atomic step, which try of it is being spooled.
"""

from __future__ import annotations

import zlib

from relay.intake.policy import routing_domain
from relay.model import Recipient

SLOT_COUNT = 1024


def slot_of(domain: str) -> int:
    """Slot of a routing domain (already lower-cased A-label)."""
    return zlib.crc32(domain.encode("ascii")) % SLOT_COUNT


def owner_of(slot: int, workers: int) -> int:
    return slot % workers


def key_owner(key: str, workers: int) -> int:
    """The worker that records AMQP message ``key`` (stable across processes)."""
    return zlib.crc32(key.encode("utf-8", "surrogatepass")) % workers


def recipient(address: str, index: int) -> Recipient:
    """Build a routed recipient from an address intake accepted."""
    domain = routing_domain(address.rpartition("@")[2])
    return Recipient(address=address, domain=domain, slot=slot_of(domain), index=index)


def split(recipients: list[Recipient], workers: int) -> dict[int, tuple[Recipient, ...]]:
    """Group recipients by owner worker, keeping their order."""
    parts: dict[int, list[Recipient]] = {}
    for rcpt in recipients:
        parts.setdefault(owner_of(rcpt.slot, workers), []).append(rcpt)
    return {owner: tuple(rcpts) for owner, rcpts in parts.items()}
