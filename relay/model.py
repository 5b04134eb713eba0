"""Frozen records that flow between the stages: recipients and spool parts.

A transaction accepted at intake is split by shard slot into parts; each
part holds the recipients one owner worker is responsible for, and the
whole message body (stored once per part).
"""

from __future__ import annotations

import enum
import itertools
import os
import time
from dataclasses import dataclass
from typing import NamedTuple

# A message's class: its lane at every step of delivery.  Transactional
# mail (sign-ups, receipts) goes before bulk mail (campaigns).
TRANSACTIONAL = "transactional"
BULK = "bulk"
LANES = (TRANSACTIONAL, BULK)


@dataclass(frozen=True, slots=True)
class Recipient:
    address: str  # as the client wrote it in RCPT TO (without angle brackets)
    domain: str  # lower-cased A-label routing domain
    slot: int  # shard slot of the domain
    index: int  # position in the transaction, unique within a queue id


@dataclass(frozen=True, slots=True)
class Part:
    """The share of one transaction that one owner worker stores and delivers."""

    queue_id: str
    sender: str  # envelope sender; "" for <>
    recipients: tuple[Recipient, ...]
    body: bytes
    received_at: float  # wall-clock seconds
    smtputf8: bool = False
    trace: bool = False  # log every step of its delivery (X-Relay-Trace, relayctl trace)
    lane: str = TRANSACTIONAL  # its class (intake.lane)
    campaign: str = ""  # X-Relay-Campaign; "" for none
    tenant: str = ""  # X-Relay-Tenant; "" for none
    # Worker that coordinates a transaction split across several owners.
    # None: the only part, stored ready for delivery.  Otherwise the part
    # is stored held until that coordinator's decision releases it.
    coordinator: int | None = None


@dataclass(frozen=True, slots=True)
class Transaction:
    """One message accepted at intake, before it is split by owner."""

    queue_id: str
    sender: str
    recipients: tuple[str, ...]
    body: bytes
    received_at: float
    smtputf8: bool = False
    trace: bool = False
    lane: str = TRANSACTIONAL
    campaign: str = ""
    tenant: str = ""


class QueueIds:
    """Unique, time-ordered queue ids: 13 hex digits of microseconds,
    2 of the generator (worker, or host and worker in a cluster), 3 of a
    counter that starts at a random point."""

    def __init__(self, worker: int) -> None:
        self._worker = worker & 0xFF
        self._counter = itertools.count(int.from_bytes(os.urandom(2), "big"))

    def next(self) -> str:
        micros = time.time_ns() // 1000
        return f"{micros:013X}{self._worker:02X}{next(self._counter) & 0xFFF:03X}"

    @staticmethod
    def made_at(queue_id: str) -> float:
        """When an id was made (epoch seconds): intake makes one when a
        message has arrived, before it is signed and stored."""
        return int(queue_id[:13], 16) / 1e6


@dataclass(frozen=True, slots=True)
class Reply:
    """An SMTP reply from a remote server (or one we made up for a local
    failure such as a refused connection, with code 0)."""

    code: int
    enhanced: str | None  # "5.1.1", or None when the server sent none
    text: str
    mx: str | None = None  # the host that said it

    @property
    def transient(self) -> bool:
        return self.code < 500

    def __str__(self) -> str:
        enhanced = f"{self.enhanced} " if self.enhanced else ""
        return f"{self.code} {enhanced}{self.text}"


class Stage(enum.Enum):
    """Where in an SMTP delivery a reply (or a local failure) happened."""

    CONNECT = "connect"
    GREETING = "greeting"
    EHLO = "ehlo"
    STARTTLS = "starttls"
    MAIL = "mail"
    RCPT = "rcpt"
    DATA = "data"  # the reply to DATA itself (354 expected)
    DOT = "dot"  # the reply after the final dot
    LOCAL = "local"  # no server reply: DNS, refused, timeout, TLS failure


class Event(NamedTuple):
    """One recipient's outcome (or an operator's act on it), as committed
    with its state change and written to ``delivery-N.jsonl``.  The fields
    follow the spool's ``event`` columns in order (spool.store.EVENT_COLUMNS,
    where ``failure_class`` is the column ``class``), so a record is stored
    as it is."""

    time: float
    queue_id: str
    recipient: str
    destination: str | None  # the site (MX set) or the domain
    mx: str | None  # the host that gave the reply
    source_ip: str | None
    tls: int  # 1 when the session was encrypted
    code: int  # the reply's code (0: no reply, e.g. a connection failure)
    enhanced: str | None
    text: str | None
    outcome: str  # delivered | deferred | bounced | requeued | dropped | deleted | crashed | quarantined
    failure_class: str | None  # outcome.classify.FailureClass value
    latency: float  # seconds the transaction took
    # The message's class (named lane: ``class`` is the failure class) and campaign.
    lane: str = TRANSACTIONAL
    campaign: str = ""

    @classmethod
    def local(cls, now: float, queue_id: str, recipient: str, destination: str | None,
              text: str, outcome: str, failure_class: str | None = None,
              lane: str = TRANSACTIONAL, campaign: str = "") -> "Event":
        """An outcome decided here, with no reply from any server."""
        return cls(now, queue_id, recipient, destination, None, None, 0, 0, None, text, outcome,
                   failure_class, 0.0, lane, campaign)


# Event's names as stored (the spool's event columns) and logged (JSON).
EVENT_COLUMNS = tuple("class" if name == "failure_class" else name for name in Event._fields)
