"""Per-recipient transitions and the one-DSN-per-round bookkeeping, with
the time passed in (no clock, no spool, no sockets)."""

import sqlite3

from relay.deliver.schedule import RetrySchedule
from relay.model import EVENT_COLUMNS, Event, Reply, Stage
from relay.outcome.transition import Attempt, Rounds, decide
from relay.spool import schema
from relay.spool.format import RecipientState
from relay.spool.store import DueRecipient

NOW = 1_000_000.0
SCHEDULE = RetrySchedule((60, 300, 900), max_lifetime=3600)  # no jitter: exact times
SITE = Attempt("mx.example.net", "127.0.0.9", True, 0.25)


def rcpt(index: int, attempts: int = 0, received: float = NOW - 10, suppressed=None) -> DueRecipient:
    return DueRecipient("Q1", index, f"user{index}@example.net", "example.net", attempts,
                        "sender@example.org", received, False, 100, suppressed)


def ok() -> Reply:
    return Reply(250, "2.0.0", "queued as X", "mx1.example.net")


def test_a_delivered_recipient_counts_its_attempt_and_its_event_names_the_session():
    verdict = decide("Q1", [(rcpt(0, attempts=2), ok(), Stage.DOT)], SITE, NOW, SCHEDULE)
    [update], [event] = verdict.updates, verdict.events
    assert (update.state, update.attempts, update.next_attempt) == (RecipientState.DELIVERED, 3, NOW)
    assert event == Event(NOW, "Q1", "user0@example.net", "mx.example.net", "mx1.example.net",
                          "127.0.0.9", 1, 250, "2.0.0", "queued as X", "delivered", None, 0.25)
    assert verdict.bounced == [] and verdict.suppress == []


def test_a_temporary_failure_follows_the_retry_schedule():
    reply = Reply(451, "4.3.0", "try later", "mx1.example.net")
    verdict = decide("Q1", [(rcpt(0, attempts=0), reply, Stage.RCPT),
                            (rcpt(1, attempts=1), reply, Stage.RCPT)], SITE, NOW, SCHEDULE)
    first, second = verdict.updates
    assert (first.state, first.attempts, first.next_attempt) == (RecipientState.DEFERRED, 1, NOW + 60)
    assert (second.attempts, second.next_attempt) == (2, NOW + 300)
    assert [e.outcome for e in verdict.events] == ["deferred", "deferred"]
    assert verdict.events[0].failure_class is not None


def test_a_message_that_outlived_its_lifetime_bounces_on_a_temporary_failure():
    reply = Reply(451, "4.3.0", "try later", "mx1.example.net")
    verdict = decide("Q1", [(rcpt(0, attempts=4, received=NOW - 3600), reply, Stage.RCPT)],
                     SITE, NOW, SCHEDULE)
    assert verdict.updates[0].state is RecipientState.BOUNCED
    [failed] = verdict.bounced
    assert failed.expired and failed.address == "user0@example.net"
    assert verdict.suppress == []  # an expiry is not a hard recipient failure


def test_a_hard_recipient_bounce_is_reported_and_suppressed_unless_it_already_is():
    reply = Reply(550, "5.1.1", "no such user", "mx1.example.net")
    verdict = decide("Q1", [(rcpt(0), reply, Stage.RCPT),
                            (rcpt(1, suppressed="550 earlier"), reply, Stage.RCPT)],
                     SITE, NOW, SCHEDULE)
    assert [u.state for u in verdict.updates] == [RecipientState.BOUNCED] * 2
    assert [f.expired for f in verdict.bounced] == [False, False]
    assert verdict.suppress == [("user0@example.net", str(reply))]


def test_452_requeues_at_once_without_an_attempt_only_when_others_were_taken():
    too_many = Reply(452, "4.5.3", "too many recipients", "mx1.example.net")
    verdict = decide("Q1", [(rcpt(0), ok(), Stage.DOT), (rcpt(1, attempts=1), too_many, Stage.RCPT)],
                     SITE, NOW, SCHEDULE)
    requeued = verdict.updates[1]
    assert (requeued.state, requeued.attempts, requeued.next_attempt) == (RecipientState.QUEUED, 1, NOW)
    assert verdict.events[1].outcome == "requeued"
    alone = decide("Q1", [(rcpt(1, attempts=1), too_many, Stage.RCPT)], SITE, NOW, SCHEDULE)
    assert alone.updates[0].state is RecipientState.DEFERRED  # or a server refusing all would loop


def test_dropped_recipients_are_final_with_no_dsn():
    reply = Reply(550, "5.7.1", "recipient domain is excluded from delivery", None)
    verdict = decide("Q1", [(rcpt(0), reply, Stage.LOCAL)], Attempt("example.net"), NOW, SCHEDULE,
                     dropped=True)
    assert verdict.updates[0].state is RecipientState.BOUNCED
    assert verdict.events[0].outcome == "dropped" and verdict.events[0].destination == "example.net"
    assert verdict.bounced == [] and verdict.suppress == []


def test_bounces_wait_for_the_last_job_of_their_round_then_go_in_one_dsn():
    rounds = Rounds()
    rounds.claimed("Q1", 3)  # three recipients at two domains: two jobs
    bad = Reply(550, "5.1.1", "no such user", "mx1.example.net")
    first = decide("Q1", [(rcpt(0), bad, Stage.RCPT), (rcpt(1), ok(), Stage.DOT)], SITE, NOW, SCHEDULE)
    rounds.hold("Q1", first.take_bounces())
    assert [e.outcome for e in first.events] == ["delivered"]  # committed now
    assert rounds.done("Q1", 2) is None  # one recipient still out
    second = decide("Q1", [(rcpt(2), bad, Stage.RCPT)], SITE, NOW + 1, SCHEDULE)
    rounds.hold("Q1", second.take_bounces())
    held = rounds.done("Q1", 1)
    assert [f.address for f in held.bounced] == ["user0@example.net", "user2@example.net"]
    assert [e.outcome for e in held.events] == ["bounced", "bounced"]
    assert len(held.suppress) == 2
    assert rounds.done("Q1", 0) is None  # the round is forgotten once done


def test_bounces_with_no_dsn_queued_are_deferred_instead():
    rounds = Rounds()
    rounds.claimed("Q1", 1)
    verdict = decide("Q1", [(rcpt(0), Reply(550, "5.1.1", "no", None), Stage.RCPT)], SITE, NOW,
                     SCHEDULE)
    rounds.hold("Q1", verdict.take_bounces())
    held = rounds.done("Q1", 1)
    held.defer(NOW + 60)
    assert [(u.state, u.next_attempt) for u in held.updates] == [(RecipientState.DEFERRED, NOW + 60)]
    assert [e.outcome for e in held.events] == ["deferred"]
    assert held.bounced == [] and held.suppress == []  # not final: no suppression either


def test_the_event_record_is_stored_under_the_spools_column_names():
    conn = sqlite3.connect(":memory:")
    conn.executescript(schema.SCHEMA)
    stored = [row[1] for row in conn.execute("PRAGMA table_info(event)")]
    assert EVENT_COLUMNS[Event._fields.index("failure_class")] == "class"
    assert len(EVENT_COLUMNS) == len(Event._fields)
    assert set(EVENT_COLUMNS) <= set(stored), set(EVENT_COLUMNS) - set(stored)
