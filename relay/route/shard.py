"""Shard routing (pure): recipient domain -> slot -> owner worker.

The slot is a stable hash (CRC-32, never Python's per-process ``hash()``)
of the lower-cased A-label domain, modulo a fixed slot count that is
recorded in every spool.  In a cluster of ``hosts`` relay hosts
(``[cluster]``), ``host_of(slot) = slot % hosts`` and, on that host,
``owner_of(slot) = (slot // hosts) % workers``; with one host that is
``slot % workers``.  So one domain's mail, queues and limits live in
exactly one worker of one host, and the slots of a host still spread over
all its workers whatever the two counts are.

A domain the operator lists in ``[relay] spread_domains`` is the one
exception: each of its recipients gets a slot of its own, hashed from the
address (lower-cased) but kept on the domain's host, so one very large
domain's mail is stored and delivered by every worker of that host instead
of one (its limits are then split between workers, as a site's are:
deliver.shaping.limits_for).  One address still has exactly one owner, so
its suppression entry and events live with the mail sent to it.
The key of an AMQP message (intake.amqp_message.payload_key) has an owner
worker the same way: the one that records, in one atomic step, which try
of it is being spooled.
"""

from __future__ import annotations

import zlib

from relay.intake.policy import routing_domain
from relay.model import Recipient

SLOT_COUNT = 1024


def slot_of(domain: str) -> int:
    """Slot of a routing domain (already lower-cased A-label)."""
    return zlib.crc32(domain.encode("ascii")) % SLOT_COUNT


def host_of(slot: int, hosts: int) -> int:
    return slot % hosts


def owner_of(slot: int, workers: int, hosts: int = 1) -> int:
    """The worker (on the slot's host) that owns it."""
    return (slot // hosts) % workers


def key_owner(key: str, workers: int) -> int:
    """The worker that records AMQP message ``key`` (stable across processes)."""
    return zlib.crc32(key.encode("utf-8", "surrogatepass")) % workers


def address_slot(address: str, domain: str, spread: frozenset[str] = frozenset(),
                 hosts: int = 1) -> int:
    """Slot of a recipient at routing ``domain``: the domain's, or for a
    spread domain one picked by the address among the domain host's slots."""
    slot = slot_of(domain)
    if domain not in spread:
        return slot
    key = f"{address.rpartition('@')[0]}@{domain}".lower().encode("utf-8", "surrogatepass")
    # host_of(result) == host_of(slot): slot % hosts is kept, the rest is the address's.
    return slot % hosts + hosts * (zlib.crc32(key) % (SLOT_COUNT // hosts))


def recipient(address: str, index: int, spread: frozenset[str] = frozenset(),
              hosts: int = 1) -> Recipient:
    """Build a routed recipient from an address intake accepted."""
    domain = routing_domain(address.rpartition("@")[2])
    return Recipient(address=address, domain=domain,
                     slot=address_slot(address, domain, spread, hosts), index=index)


def split(recipients: list[Recipient], workers: int, hosts: int = 1) -> dict[int, tuple[Recipient, ...]]:
    """Group recipients (all of this host's slots) by owner worker, keeping their order."""
    parts: dict[int, list[Recipient]] = {}
    for rcpt in recipients:
        parts.setdefault(owner_of(rcpt.slot, workers, hosts), []).append(rcpt)
    return {owner: tuple(rcpts) for owner, rcpts in parts.items()}


def split_hosts(recipients: list[Recipient], hosts: int) -> dict[int, list[Recipient]]:
    """Group recipients by the host that owns their slot, keeping their order."""
    groups: dict[int, list[Recipient]] = {}
    for rcpt in recipients:
        groups.setdefault(host_of(rcpt.slot, hosts), []).append(rcpt)
    return groups
