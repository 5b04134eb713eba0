"""What each recipient becomes after an attempt, and when a DSN goes (pure).

Input: one job's recipients, each with the reply that decided it and the
stage it came at, the time (passed in), the retry schedule and what is
known of the session.  Output: a ``Verdict`` — per recipient the spool
update and the event committed together, the recipients a DSN must
report, and the addresses to put on the suppression list.

The rules, in order: a 2xx delivers; a reply classify() calls permanent
bounces (hard recipient failures are suppressed from then on); a 452
"too many recipients" while others of the transaction were taken goes
back in the queue at once (RFC 5321 4.5.3.1.10) without an attempt;
anything else defers to the next step of the schedule, or bounces when
the message outlived its lifetime.

One DSN per message per round (``Rounds``): the recipients of a message
claimed together may be sent in several jobs (one per domain), and the
sender gets one notice for all of them, as Postfix sends one per message.
So bounces wait in memory until the last job of the round has its
outcome; a crash meanwhile leaves them claimed, to be tried again after
the restart.  When no DSN could be queued, the waiting bounces are
deferred instead (``HeldBounces.defer``): nobody bounces without telling
the sender.
"""

from __future__ import annotations

import collections
import dataclasses

from relay.deliver.schedule import RetrySchedule
from relay.model import Event, Reply, Stage
from relay.outcome.bounce import FailedRecipient
from relay.outcome.classify import Action, FailureClass, classify
from relay.spool.format import RecipientState
from relay.spool.store import DueRecipient, RecipientUpdate


@dataclasses.dataclass
class Verdict:
    """One job's outcomes, ready to commit (and, for bounces, to report)."""

    updates: list = dataclasses.field(default_factory=list)  # of RecipientUpdate
    events: list = dataclasses.field(default_factory=list)  # of Event, one per update
    bounced: list = dataclasses.field(default_factory=list)  # of FailedRecipient, for the DSN
    suppress: list = dataclasses.field(default_factory=list)  # of (address, reply)

    def take_bounces(self) -> "Verdict":
        """Split off the bounced recipients (to wait for the round's DSN)."""
        keep = [i for i, e in enumerate(self.events) if e.outcome != "bounced"]
        moved = [i for i, e in enumerate(self.events) if e.outcome == "bounced"]
        taken = Verdict([self.updates[i] for i in moved], [self.events[i] for i in moved],
                        self.bounced, self.suppress)
        self.updates = [self.updates[i] for i in keep]
        self.events = [self.events[i] for i in keep]
        self.bounced, self.suppress = [], []
        return taken

    def add(self, other: "Verdict") -> None:
        self.updates += other.updates
        self.events += other.events
        self.bounced += other.bounced
        self.suppress += other.suppress

    def defer(self, retry: float) -> None:
        """No DSN went out: the bounced recipients wait for ``retry`` instead."""
        self.updates = [dataclasses.replace(u, state=RecipientState.DEFERRED, next_attempt=retry)
                        if u.state is RecipientState.BOUNCED else u for u in self.updates]
        self.events = [e._replace(outcome="deferred") if e.outcome == "bounced" else e
                       for e in self.events]
        self.bounced, self.suppress = [], []


@dataclasses.dataclass(frozen=True)
class Attempt:
    """What is known of the session an outcome came from."""

    destination: str  # the site's name, or the domain when it was not resolved
    source_ip: str | None = None
    tls: bool = False
    latency: float = 0.0


def next_state(rcpt: DueRecipient, reply: Reply, action: Action, now: float, some_accepted: bool,
               schedule: RetrySchedule) -> tuple[RecipientState, float, int, str]:
    """(state, next attempt, attempts, event outcome) after one reply."""
    if action is Action.DELIVERED:
        return RecipientState.DELIVERED, now, rcpt.attempts + 1, "delivered"
    if action is Action.BOUNCED:
        return RecipientState.BOUNCED, now, rcpt.attempts + 1, "bounced"
    if reply.code == 452 and reply.enhanced in (None, "4.5.3") and some_accepted:
        # Too many recipients for one transaction: the rest go in the next
        # transaction, not after a retry delay.  Only when others were
        # taken: a server that refuses every recipient so is deferred like
        # any 4xx, or it would loop.
        return RecipientState.QUEUED, now, rcpt.attempts, "requeued"
    attempts = rcpt.attempts + 1
    next_attempt = schedule.next_attempt(attempts, rcpt.received, now)
    if next_attempt is None:
        return RecipientState.BOUNCED, now, attempts, "bounced"
    return RecipientState.DEFERRED, next_attempt, attempts, "deferred"


def decide(queue_id: str, outcomes: list[tuple[DueRecipient, Reply, Stage]], attempt: Attempt,
           now: float, schedule: RetrySchedule, dropped: bool = False) -> Verdict:
    """Every recipient's new state and event.  ``dropped``: final with no
    DSN and no attempt counted as a bounce to report (domain exclusion)."""
    verdict = Verdict()
    some_accepted = any(reply.code in (250, 251) for _, reply, _ in outcomes)
    for rcpt, reply, stage in outcomes:
        outcome = classify(reply, stage)
        state, next_attempt, attempts, label = next_state(
            rcpt, reply, outcome.action, now, some_accepted, schedule)
        if dropped:
            state, label = RecipientState.BOUNCED, "dropped"
        elif label == "bounced":
            # A reply that would only defer bounces when the message expired.
            expired = outcome.action is not Action.BOUNCED
            verdict.bounced.append(FailedRecipient(rcpt.address, reply, "failed", now, expired))
            if (outcome.hard and outcome.failure_class is FailureClass.RECIPIENT
                    and not rcpt.suppressed):
                verdict.suppress.append((rcpt.address, str(reply)))
        verdict.updates.append(RecipientUpdate(rcpt.queue_id, rcpt.index, state, attempts,
                                               next_attempt, str(reply)))
        verdict.events.append(Event(
            now, queue_id, rcpt.address, attempt.destination, reply.mx, attempt.source_ip,
            int(attempt.tls), reply.code, reply.enhanced, reply.text, label,
            outcome.failure_class.value if outcome.failure_class else None,
            round(attempt.latency, 4), rcpt.lane, rcpt.campaign,
        ))
    return verdict


class Rounds:
    """Per message: its claimed recipients still without an outcome, and
    the bounces waiting for the last of them (one DSN per round)."""

    def __init__(self) -> None:
        self._left: collections.Counter[str] = collections.Counter()
        self._bounces: dict[str, Verdict] = {}

    def claimed(self, queue_id: str, count: int) -> None:
        self._left[queue_id] += count

    def hold(self, queue_id: str, bounces: Verdict) -> None:
        """Keep a job's bounces until its round is complete."""
        self._bounces.setdefault(queue_id, Verdict()).add(bounces)

    def done(self, queue_id: str, count: int) -> Verdict | None:
        """``count`` recipients of a message have their outcome (or left
        memory); the bounces held for it once none of its round is left."""
        left = self._left[queue_id] - count
        if left > 0:
            self._left[queue_id] = left
            return None
        self._left.pop(queue_id, None)
        return self._bounces.pop(queue_id, None)
