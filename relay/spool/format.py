"""Spool records (pure): the format version and the states of messages and
recipients, as stored in the ``state`` columns."""

from __future__ import annotations

import enum

# Recorded in every spool file; relay.spool.schema migrates older files.
FORMAT_VERSION = 5


class MessageState(enum.IntEnum):
    HELD = 0  # part of a multi-owner transaction, waiting for the decision
    ACTIVE = 1  # ready for delivery


class RecipientState(enum.IntEnum):
    QUEUED = 0
    DEFERRED = 1
    DELIVERED = 2
    BOUNCED = 3
    SENDING = 4  # claimed by the delivery loop; back to QUEUED at restart
    QUARANTINED = 5  # its delivery crashed deliver.quarantine_after times: never claimed
    # Kept by the operator (relayctl suspend DOMAIN): never claimed until
    # released; its attempts are unchanged.
    HELD = 6


# The recipient table's ``lane`` column: the lanes as small integers, so
# the due index stays small (relay.model.LANES by position).
LANE_CODES = {"transactional": 0, "bulk": 1}
LANE_NAMES = {code: name for name, code in LANE_CODES.items()}
