"""relay.cli.spoolread: the summaries relayctl's read verbs build from spool
rows (pure: no files, no clock)."""

from __future__ import annotations

import pytest

from relay.cli import spoolread
from relay.cli.spoolread import (
    BUCKETS, Event, FailureRow, MessagePart, RecipientRow, WaitingRow, address_pattern,
    age_bucket, failure_report, latest_destinations, message_view, newest_first, queue_shape,
)
from relay.spool.format import MessageState, RecipientState

NOW = 1_700_000_000.0
MIN = 60.0


def event(when: float, recipient: str = "a@x.example", outcome: str = "deferred", worker: int = 0,
          queue_id: str = "Q1", code: int = 451) -> Event:
    return Event(worker, when, queue_id, recipient, "mx.x.example", "mx.x.example", "192.0.2.1",
                 True, code, "4.7.1", "later", outcome, "recipient", 0.1)


# -- age buckets and the queue shape --------------------------------------


def test_buckets_are_qshapes():
    assert BUCKETS == ("0-5m", "5-10m", "10-20m", "20-40m", "40-80m", "80-160m", "160-320m",
                       "320m+")


@pytest.mark.parametrize("age, bucket", [
    (-30, 0), (0, 0), (5 * MIN - 1, 0), (5 * MIN, 1), (10 * MIN, 2), (39 * MIN, 3),
    (80 * MIN, 5), (319 * MIN, 6), (320 * MIN, 7), (10 * 86400, 7),
])
def test_age_bucket_bounds_are_low_inclusive(age, bucket):
    assert age_bucket(age) == bucket


def test_queue_shape_counts_per_domain_and_age_largest_first():
    rows = [
        WaitingRow("b.example", False, NOW - 1 * MIN, 3),
        WaitingRow("a.example", False, NOW - 1 * MIN),
        WaitingRow("a.example", False, NOW - 7 * MIN, 2),
        WaitingRow("c.example", False, NOW - 400 * MIN),
        WaitingRow("b.example", True, NOW - 1 * MIN, 5),  # held: counted apart
        WaitingRow("h.example", True, NOW, 1),
    ]
    shape = queue_shape(rows, NOW)
    assert shape.total == 7 and shape.held == 6
    assert shape.by_age == (4, 2, 0, 0, 0, 0, 0, 1)
    # Ties on total (a and b have 3) go by name; held-only domains have no row.
    assert [(r.name, r.total) for r in shape.rows] == [("a.example", 3), ("b.example", 3),
                                                      ("c.example", 1)]
    assert shape.rows[0].by_age == (1, 2, 0, 0, 0, 0, 0, 0)
    assert shape.rows[2].by_age[-1] == 1


def test_queue_shape_groups_by_destination():
    destinations = {"a.example": "mx.shared", "b.example": "mx.shared"}
    rows = [WaitingRow("a.example", False, NOW), WaitingRow("b.example", False, NOW, 2),
            WaitingRow("new.example", False, NOW)]
    shape = queue_shape(rows, NOW, lambda d: destinations.get(d, d))
    assert [(r.name, r.total) for r in shape.rows] == [("mx.shared", 3), ("new.example", 1)]


def test_queue_shape_of_nothing():
    shape = queue_shape([], NOW)
    assert (shape.total, shape.held, shape.rows) == (0, 0, ())
    assert shape.by_age == (0,) * len(BUCKETS)


def test_latest_destination_wins():
    rows = [("a.example", "old.mx", 10.0), ("a.example", "new.mx", 20.0),
            ("b.example", "b.mx", 5.0)]
    assert latest_destinations(rows) == {"a.example": "new.mx", "b.example": "b.mx"}
    assert latest_destinations(reversed(rows)) == {"a.example": "new.mx", "b.example": "b.mx"}


# -- one message -------------------------------------------------------------


def part(worker: int, state=MessageState.ACTIVE, coordinator=None) -> MessagePart:
    return MessagePart(worker, "Q1", "app@s.example", NOW - 60, False, 321, int(state), coordinator)


def rcpt(worker: int, index: int, state=RecipientState.QUEUED) -> RecipientRow:
    return RecipientRow(worker, "Q1", index, f"r{index}@d{index}.example", f"d{index}.example",
                        int(state), 1, NOW + 300, "451 4.7.1 later")


def test_message_view_merges_the_parts_of_a_split_transaction():
    view = message_view(
        "Q1",
        [part(1, MessageState.HELD, coordinator=0), part(0)],
        [rcpt(1, 1), rcpt(0, 2, RecipientState.DELIVERED), rcpt(0, 0, RecipientState.DEFERRED)],
        [event(NOW, worker=1), event(NOW - 10, worker=0)],
    )
    assert view.in_queue
    assert [p.worker for p in view.parts] == [0, 1]
    assert [r.index for r in view.recipients] == [0, 1, 2]
    assert [e.time for e in view.events] == [NOW - 10, NOW]
    out = view.as_json()
    assert out["sender"] == "app@s.example" and out["size"] == 321 and out["received"] == NOW - 60
    assert out["parts"] == [{"worker": 0, "state": "active", "coordinator": None},
                            {"worker": 1, "state": "held", "coordinator": 0}]
    assert [(r["state"], r["worker"]) for r in out["recipients"]] == [
        ("deferred", 0), ("queued", 1), ("delivered", 0)]
    assert out["recipients"][0]["next_attempt"] == NOW + 300
    assert out["recipients"][2]["next_attempt"] is None  # final: no next attempt
    assert out["events"][0]["class"] == "recipient" and out["events"][0]["tls"] is True


def test_a_quarantined_recipient_shows_its_crashes_and_error_and_no_next_attempt():
    quarantined = RecipientRow(0, "Q1", 0, "r0@d0.example", "d0.example",
                               int(RecipientState.QUARANTINED), 0, NOW, None, 3, "KeyError: 'x'")
    out = message_view("Q1", [part(0)], [quarantined, rcpt(0, 1)], []).as_json()
    assert [(r["state"], r["crashes"], r["error"], r["next_attempt"]) for r in out["recipients"]] == [
        ("quarantined", 3, "KeyError: 'x'", None), ("queued", 0, None, NOW + 300)]


def test_message_view_of_a_message_that_left_the_queue():
    view = message_view("Q1", [], [], [event(NOW, outcome="delivered")])
    assert not view.in_queue
    out = view.as_json()
    assert out["sender"] is None and out["parts"] == [] and len(out["events"]) == 1


def test_message_view_of_an_unknown_id():
    assert message_view("NOPE", [], [], []) is None


def test_state_names():
    assert [spoolread.state_name(s) for s in range(6)] == [
        "queued", "deferred", "delivered", "bounced", "sending", "quarantined"]
    assert spoolread.state_name(9) == "unknown(9)"
    assert spoolread.message_state_name(0) == "held"


# -- grep ----------------------------------------------------------------------


def test_address_pattern_of_an_address():
    pattern = address_pattern(" <User@Example.COM> ")
    assert not pattern.domain_only and pattern.forms == ("User@Example.COM",)
    sql, params = pattern.sql()
    assert "NOCASE" in sql and params == ("User@Example.COM",)


def test_address_pattern_of_a_domain_escapes_like_wildcards():
    pattern = address_pattern("@ex_ample%.com")
    assert pattern.domain_only
    sql, params = pattern.sql()
    assert "LIKE" in sql and params == ("%@ex\\_ample\\%.com",)


def test_address_pattern_adds_the_a_label_form():
    assert address_pattern("@bücher.example").forms == ("@bücher.example", "@xn--bcher-kva.example")
    assert address_pattern("jo@Bücher.example").forms == ("jo@Bücher.example",
                                                          "jo@xn--bcher-kva.example")


@pytest.mark.parametrize("text", ["", "user", "user@", "@", "<>"])
def test_address_pattern_refuses_non_addresses(text):
    with pytest.raises(ValueError):
        address_pattern(text)


def test_newest_first_with_limit():
    events = [event(NOW - 5), event(NOW), event(NOW - 1, worker=1)]
    assert [e.time for e in newest_first(events)] == [NOW, NOW - 1, NOW - 5]
    assert [e.time for e in newest_first(events, 2)] == [NOW, NOW - 1]


# -- report --------------------------------------------------------------------


def failure(domain="x.example", count=1, when=NOW, text="later", code=451, outcome="deferred",
            failure_class="recipient") -> FailureRow:
    return FailureRow(outcome, failure_class, code, "4.7.1", domain, count, when, text)


def test_failure_report_merges_and_keeps_the_latest_text():
    rows = [
        failure(count=2, when=NOW - 10, text="old"),
        failure(count=3, when=NOW, text="new"),  # same group, another chunk or spool
        failure(domain="y.example", count=4),
        failure(count=1, code=550, outcome="bounced"),
        failure(domain="a.example", count=1, failure_class=None),
    ]
    report = failure_report(rows)
    assert [(r.domain, r.code, r.count) for r in report] == [
        ("x.example", 451, 5), ("y.example", 451, 4), ("a.example", 451, 1), ("x.example", 550, 1)]
    assert report[0].last_text == "new" and report[0].last_time == NOW
    assert report[2].as_json()["class"] is None


def test_address_domain():
    assert spoolread.address_domain("Jo@Example.COM") == "example.com"
    assert spoolread.address_domain("jo@bücher.example") == "xn--bcher-kva.example"
    assert spoolread.address_domain('"a@b"@c.example') == "c.example"


# -- human output ----------------------------------------------------------------


def test_table_aligns_and_leaves_the_last_column_ragged():
    text = spoolread.table(["NAME", "N", "TEXT"], [["a", 10, "x"], ["long-name", 2, None]],
                           right=(1,))
    assert text.splitlines() == [
        "NAME        N  TEXT",
        "a          10  x",
        "long-name   2  -",
    ]


def test_table_escapes_control_characters_from_remote_servers():
    text = spoolread.table(["T"], [["evil\x1b[2Jtext\r\nmore"]])
    assert "\x1b" not in text and "\r" not in text
    assert text.splitlines()[1] == "evil\\x1b[2Jtext\\r\\nmore"


def test_iso_local_has_an_offset():
    stamp = spoolread.iso_local(NOW)
    assert stamp[:4] == "2023" and stamp[19] in "+-"
    assert spoolread.iso_local(None) == "-"
