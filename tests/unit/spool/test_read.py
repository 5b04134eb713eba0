"""relay.spool.read: the spool's read API against a spool written by the
store's own ``connect`` and ``insert_part`` (and relay.spool.testing for
the states and events the writer thread would have written)."""

from __future__ import annotations

import sqlite3

import pytest

from relay.model import Part, Recipient
from relay.route.shard import slot_of
from relay.spool import bulk, read, testing
from relay.spool.format import FORMAT_VERSION, MessageState, RecipientState
from relay.spool.read import (
    Counts, Event, MessagePart, ReadError, RecipientRow, SpoolReader, StoredPart, WaitingRecipient,
    WaitingRow, address_pattern, open_readers,
)
from relay.spool.store import connect, insert_part, spool_path

NOW = 1_700_000_000.0
BODY = b"Subject: read\r\n\r\nHello.\r\n"


def rcpt(address: str, index: int) -> Recipient:
    domain = address.rpartition("@")[2].lower()
    return Recipient(address, domain, slot_of(domain), index)


def event_row(when: float, queue_id: str, recipient: str, outcome: str, code: int,
              text: str, destination: str | None = "a.example") -> tuple:
    return (when, queue_id, recipient, destination, "mx.a.example", "192.0.2.7", 1, code,
            f"{code // 100}.0.0", text, outcome, "recipient" if code >= 400 else None, 0.25)


@pytest.fixture
def path(tmp_path) -> str:
    """Q1: two recipients at a.example, one deferred, one delivered, and
    their events; Q2: a held part; Q3: a quarantined recipient."""
    path = spool_path(str(tmp_path), 0)
    conn = connect(path)
    insert_part(conn, Part("Q1", "app@s.example", (rcpt("one@a.example", 0),
                                                   rcpt("two@a.example", 1)), BODY, NOW - 60),
                NOW - 60)
    insert_part(conn, Part("Q2", "app@s.example", (rcpt("three@b.example", 2),), BODY, NOW - 30,
                           coordinator=1), NOW - 30)
    insert_part(conn, Part("Q3", "", (rcpt("four@c.example", 0),), BODY, NOW - 10), NOW - 10)
    testing.set_recipient(conn, "Q1", "one@a.example", RecipientState.DEFERRED, 1, NOW + 300,
                          "451 4.0.0 later")
    testing.set_recipient(conn, "Q1", "two@a.example", RecipientState.DELIVERED, 1, NOW, "250 ok")
    testing.set_recipient(conn, "Q3", "four@c.example", RecipientState.QUARANTINED, 0, NOW, None)
    testing.insert_event(conn, event_row(NOW - 50, "Q1", "one@a.example", "deferred", 451, "later"))
    testing.insert_event(conn, event_row(NOW - 40, "Q1", "two@a.example", "delivered", 250, "ok"))
    testing.insert_event(conn, event_row(NOW - 20, "Q1", "One@A.example", "deferred", 451,
                                         "later again"))
    conn.close()
    return path


@pytest.fixture
def reader(path):
    reader = SpoolReader(0, path)
    yield reader
    reader.close()


def test_waiting_recipients_grouped_by_domain_state_and_second(reader):
    assert sorted(reader.waiting(), key=lambda r: r.domain) == [
        WaitingRow("a.example", False, NOW - 60, 1),
        WaitingRow("b.example", True, NOW - 30, 1),
    ]


def test_waiting_recipients_with_their_envelope(reader):
    assert list(reader.waiting_recipients()) == [
        WaitingRecipient(0, "Q1", "app@s.example", NOW - 60, len(BODY), int(MessageState.ACTIVE),
                         "one@a.example", int(RecipientState.DEFERRED), "451 4.0.0 later"),
        WaitingRecipient(0, "Q2", "app@s.example", NOW - 30, len(BODY), int(MessageState.HELD),
                         "three@b.example", int(RecipientState.QUEUED), None),
    ]


def test_held_parts_and_quarantined(reader):
    assert reader.held_parts() == 1
    assert reader.quarantined() == (1, ["Q3"])


def test_destinations_of_waiting_mail(reader):
    # Only the exact address of a waiting recipient: "One@A.example" is another spelling.
    assert list(reader.destinations()) == [("a.example", "a.example", NOW - 50)]


def test_one_message_with_its_recipients_events_and_body(reader):
    parts, recipients, events = reader.message("Q1")
    assert parts == [MessagePart(0, "Q1", "app@s.example", NOW - 60, False, len(BODY),
                                 int(MessageState.ACTIVE), None)]
    assert recipients == [
        RecipientRow(0, "Q1", 0, "one@a.example", "a.example", int(RecipientState.DEFERRED), 1,
                     NOW + 300, "451 4.0.0 later"),
        RecipientRow(0, "Q1", 1, "two@a.example", "a.example", int(RecipientState.DELIVERED), 1,
                     NOW, "250 ok"),
    ]
    assert [(e.time, e.outcome, e.tls) for e in events] == [
        (NOW - 50, "deferred", True), (NOW - 40, "delivered", True), (NOW - 20, "deferred", True)]
    assert reader.body("Q1") == BODY
    assert reader.message("NOPE") == ([], [], [])
    assert reader.body("NOPE") is None


def test_events_by_recipient_and_by_time(reader):
    found = list(reader.events_for(address_pattern("one@a.example")))
    assert [e.recipient for e in found] == ["one@a.example", "One@A.example"]  # NOCASE
    assert len(list(reader.events_for(address_pattern("@A.EXAMPLE")))) == 3
    assert list(reader.events_for(address_pattern("nobody@a.example"))) == []
    assert [e.time for e in reader.events_since(NOW - 45)] == [NOW - 40, NOW - 20]
    assert [e.time for e in reader.events_since(NOW - 60, until=NOW - 40)] == [NOW - 50]
    assert all(isinstance(e, Event) and e.worker == 0 for e in reader.events_since(0))


def test_failure_groups_keep_the_latest_text(reader):
    [row] = reader.failures(since=0)
    assert (row.outcome, row.code, row.domain, row.count, row.last_time, row.last_text) == (
        "deferred", 451, "a.example", 2, NOW - 20, "later again")
    assert list(reader.failures(since=NOW)) == []
    assert reader.delivered(since=0) == 1
    assert reader.delivered(since=NOW - 39) == 0


def test_parts_recipients_and_counts(reader):
    assert list(reader.parts()) == [
        StoredPart(0, "Q1", "app@s.example", int(MessageState.ACTIVE), BODY,
                   (("one@a.example", slot_of("a.example")), ("two@a.example", slot_of("a.example")))),
        StoredPart(0, "Q2", "app@s.example", int(MessageState.HELD), BODY,
                   (("three@b.example", slot_of("b.example")),)),
        StoredPart(0, "Q3", "", int(MessageState.ACTIVE), BODY,
                   (("four@c.example", slot_of("c.example")),)),
    ]
    assert [(r.queue_id, r.index) for r in reader.recipients()] == [
        ("Q1", 0), ("Q1", 1), ("Q2", 2), ("Q3", 0)]
    counts = reader.counts()
    assert counts == Counts(3, 1, {RecipientState.QUEUED: 1, RecipientState.DEFERRED: 1,
                                   RecipientState.DELIVERED: 1, RecipientState.QUARANTINED: 1})
    assert counts[RecipientState.BOUNCED] == 0


def merged_counts(rows) -> dict:
    counts: dict = {}
    for row in rows:
        counts[row.key] = counts.get(row.key, 0) + row.count
    return counts


SCANS = {
    "waiting": lambda r: sorted(r.waiting(), key=lambda w: w.domain),
    "waiting_recipients": lambda r: list(r.waiting_recipients()),
    "destinations": lambda r: list(r.destinations()),
    "events_for": lambda r: list(r.events_for(address_pattern("@a.example"))),
    "events_since": lambda r: list(r.events_since(0)),
    # Groups come once per chunk: their counts add up to the same.
    "failures": lambda r: merged_counts(r.failures(0)),
    "delivered": lambda r: r.delivered(0),
    "parts": lambda r: list(r.parts()),
    "recipients": lambda r: list(r.recipients()),
}


@pytest.mark.parametrize("scan", SCANS)
def test_a_scan_in_chunks_of_one_row_finds_the_same(path, monkeypatch, scan):
    reader = SpoolReader(0, path)
    whole = SCANS[scan](reader)
    monkeypatch.setattr(read, "CHUNK", 1)
    assert SCANS[scan](reader) == whole
    reader.close()


def test_no_transaction_is_held_between_chunks(path, monkeypatch):
    monkeypatch.setattr(read, "CHUNK", 1)
    reader = SpoolReader(0, path)
    rows = reader.recipients()
    next(rows)
    assert not reader.conn.in_transaction  # the writer's checkpoints may pass
    rows.close()
    reader.close()


def test_the_reader_cannot_write(reader):
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        testing.delete_events(reader.conn)


def spool_file(tmp_path, version: str) -> str:
    path = str(tmp_path / "worker-0.db")
    connect(path).close()
    testing.set_version(path, version)
    return path


@pytest.mark.parametrize("version, says", [
    ("1", f"format version 1 is older than this relayctl's ({FORMAT_VERSION}):"
          " starting the relay upgrades it"),
    (str(FORMAT_VERSION + 1),
     f"format version {FORMAT_VERSION + 1} is newer than this relayctl's ({FORMAT_VERSION})"),
])
def test_the_reader_refuses_a_spool_of_another_version(tmp_path, version, says):
    path = spool_file(tmp_path, version)
    reader = SpoolReader(0, path)
    with pytest.raises(ReadError) as raised:
        reader.held_parts()
    reader.close()
    assert str(raised.value) == f"{path}: {says}"


def test_the_reader_counts_quarantined_recipients_and_names_their_messages(tmp_path):
    path = spool_file(tmp_path, str(FORMAT_VERSION))
    conn = connect(path)
    for queue_id, state in (("Q1", RecipientState.QUARANTINED), ("Q2", RecipientState.QUEUED)):
        for index in range(2):
            testing.insert_recipient(conn, queue_id, index, "a@x.example", "x.example", 1, state)
    reader = SpoolReader(0, path)
    assert reader.quarantined() == (2, ["Q1"])
    reader.close()


def test_open_readers_opens_every_worker_spool_by_number(tmp_path):
    for worker in (10, 2):
        connect(spool_path(str(tmp_path), worker)).close()
    (tmp_path / "worker-x.db").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("")
    readers = open_readers(str(tmp_path))
    assert [(r.worker, r.path) for r in readers] == [
        (2, spool_path(str(tmp_path), 2)), (10, spool_path(str(tmp_path), 10))]
    for r in readers:
        r.close()
    assert open_readers(str(tmp_path / "empty")) == []


def test_open_readers_reports_a_file_it_cannot_open(tmp_path):
    (tmp_path / "worker-0.db").mkdir()  # a directory where the file should be
    with pytest.raises(ReadError, match="cannot open"):
        open_readers(str(tmp_path))


# -- relay.spool.bulk: what it writes, read back ------------------------------


def test_bulk_written_deferred_mail_reads_back(tmp_path):
    path = spool_path(str(tmp_path), 1)
    messages = [
        bulk.DeferredMessage(f"D{n}", "app@s.example", NOW, BODY, f"u{n}@d.example", "d.example",
                             slot_of("d.example"), 1, NOW + 86400 + n, "451 4.3.0 Try later")
        for n in range(5)
    ]
    bulk.write_deferred(path, 2, [messages[:3], messages[3:]])
    reader = SpoolReader(1, path)
    assert reader.counts() == Counts(5, 0, {RecipientState.DEFERRED: 5})
    assert [(w.queue_id, w.address, w.last_reply) for w in reader.waiting_recipients()] == [
        (f"D{n}", f"u{n}@d.example", "451 4.3.0 Try later") for n in range(5)]
    _, [recipient], _ = reader.message("D4")
    assert (recipient.attempts, recipient.next_attempt) == (1, NOW + 86400 + 4)
    assert reader.body("D0") == BODY
    reader.close()
