"""relayctl queue, show, grep and report against spools built on disk.

The spools are written with the store's own ``connect`` and ``insert_part``
(two workers, a transaction split between them, a held part, a message that
left the queue) and events are inserted as the dispatcher writes them; no
relay process runs, so the verbs are called with ``--offline`` except where
a fake control socket stands in for the supervisor.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import threading
import time

import orjson
import pytest

from relay.cli import parse_args, spoolread
from relay.model import Part, Recipient
from relay.route.shard import owner_of, slot_of
from relay.spool import read, testing
from relay.spool.format import MessageState, RecipientState
from relay.spool.store import connect, insert_part, spool_path

NOW = time.time()
WORKERS = 2
BODY = b"Subject: spool test\r\nFrom: app@s.example\r\n\r\nHello.\r\n"


def qid(n: int) -> str:
    return f"{n:018X}"


M1, M2, M3, M4, GONE = qid(1), qid(2), qid(3), qid(4), qid(5)


def rcpt(address: str, index: int) -> Recipient:
    domain = address.rpartition("@")[2].lower()
    return Recipient(address, domain, slot_of(domain), index)


def owner(address: str) -> int:
    return owner_of(slot_of(address.rpartition("@")[2].lower()), WORKERS)


class Spools:
    """Two workers' spool databases, written as the relay would."""

    def __init__(self, spool_dir: str) -> None:
        os.makedirs(spool_dir)
        self.conns = {w: connect(spool_path(spool_dir, w)) for w in range(WORKERS)}

    def store(self, queue_id: str, sender: str, addresses: list[str], received: float,
              coordinator: int | None = None) -> None:
        """Split a transaction by owner, one part per owner, as intake does."""
        by_owner: dict[int, list[Recipient]] = {}
        for index, address in enumerate(addresses):
            by_owner.setdefault(owner(address), []).append(rcpt(address, index))
        if len(by_owner) > 1 and coordinator is None:
            coordinator = 0
        for worker, recipients in by_owner.items():
            part = Part(queue_id=queue_id, sender=sender, recipients=tuple(recipients), body=BODY,
                        received_at=received, coordinator=coordinator)
            insert_part(self.conns[worker], part, received)

    def release(self, queue_id: str) -> None:
        for conn in self.conns.values():
            testing.set_message_state(conn, queue_id, MessageState.ACTIVE)

    def set_state(self, queue_id: str, address: str, state: RecipientState, attempts: int = 0,
                  next_attempt: float | None = None, last_reply: str | None = None) -> None:
        next_attempt = NOW if next_attempt is None else next_attempt
        testing.set_recipient(self.conns[owner(address)], queue_id, address, state, attempts,
                              next_attempt, last_reply)

    def event(self, when: float, queue_id: str, recipient: str, outcome: str, code: int,
              enhanced: str | None, text: str, failure_class: str | None = None,
              destination: str | None = None, worker: int | None = None) -> None:
        domain = recipient.rpartition("@")[2].lower()
        row = (when, queue_id, recipient, destination or domain, f"mx.{domain}", "192.0.2.7",
               1, code, enhanced, text, outcome, failure_class, 0.25)
        testing.insert_event(self.conns[owner(recipient) if worker is None else worker], row)

    def close(self) -> None:
        for conn in self.conns.values():
            conn.close()


@pytest.fixture
def relay_dir(tmp_path):
    """A configuration file and the spools it names (see the module docstring)."""
    # The ages are relative to when the spools are made, not to when the
    # module was collected: a long suite would move them across an age bucket.
    global NOW
    NOW = time.time()
    spool_dir = tmp_path / "spool"
    (tmp_path / "run").mkdir()
    (tmp_path / "relay.toml").write_text(
        f'[relay]\nspool_dir = "{spool_dir}"\nrun_dir = "{tmp_path / "run"}"\n')
    s = Spools(str(spool_dir))
    # M1: split between the workers (alpha on 1; beta, gamma on 0), released.
    s.store(M1, "app@s.example", ["one@alpha.example", "two@beta.example", "three@gamma.example"],
            NOW - 2 * 60)
    s.release(M1)
    s.set_state(M1, "two@beta.example", RecipientState.DEFERRED, 2, NOW + 600,
                "451 4.7.1 greylisted")
    s.set_state(M1, "three@gamma.example", RecipientState.DELIVERED, 1, NOW - 30,
                "250 2.0.0 ok")
    s.event(NOW - 100, M1, "two@beta.example", "deferred", 451, "4.7.1", "greylisted, first",
            "recipient", "mx.beta.example")
    s.event(NOW - 60, M1, "two@beta.example", "deferred", 451, "4.7.1", "greylisted",
            "recipient", "mx.beta.example")
    s.event(NOW - 30, M1, "three@gamma.example", "delivered", 250, "2.0.0", "ok")
    # M2: a DSN (sender <>) to two beta recipients, 7 minutes old, queued.
    s.store(M2, "", ["x@beta.example", "x2@beta.example"], NOW - 7 * 60)
    # M3: deferred for hours at delta's MX pair.
    s.store(M3, "app@s.example", ["old@delta.example"], NOW - 400 * 60)
    s.set_state(M3, "old@delta.example", RecipientState.SENDING, 5, NOW - 5)
    s.event(NOW - 2 * 86400, M3, "old@delta.example", "deferred", 421, "4.7.0", "busy",
            "connection", "mx1.delta.example,mx2.delta.example")
    s.event(NOW - 600, M3, "old@delta.example", "deferred", 421, "4.7.0",
            "too many connections", "connection", "mx1.delta.example,mx2.delta.example")
    # M4: a held part (its transaction is being decided).
    s.store(M4, "app@s.example", ["h@epsilon.example"], NOW, coordinator=1)
    # GONE: left the queue; only its events remain.
    s.event(NOW - 4 * 3600, GONE, "one@alpha.example", "bounced", 550, "5.1.1", "no such user",
            "recipient")
    s.event(NOW - 3 * 3600, GONE, "One@Alpha.example", "delivered", 250, "2.0.0", "ok")
    # Mail to a U-label domain is written as the client wrote it.
    s.event(NOW - 50, qid(6), "jo@xn--bcher-kva.example", "bounced", 550, "5.1.1", "unknown",
            "recipient", worker=0)
    s.event(NOW - 120, qid(7), "z@beta.example", "dropped", 550, "5.7.1", "excluded domain")
    s.close()
    return tmp_path


def relayctl(capsys, directory, *argv: str) -> tuple[int, str, str]:
    """Run one verb as ``relayctl -c DIR/relay.toml VERB ...`` would."""
    args = parse_args(["-c", str(directory / "relay.toml"), *argv])
    capsys.readouterr()
    status = args.run(args)
    out, err = capsys.readouterr()
    return status, out, err


def json_of(capsys, directory, *argv: str):
    status, out, err = relayctl(capsys, directory, *argv, "--json", "--offline")
    assert status == 0 and err == ""
    return orjson.loads(out)


# -- queue ---------------------------------------------------------------------


def test_queue_json(capsys, relay_dir):
    shape = json_of(capsys, relay_dir, "queue")
    assert shape["buckets"] == list(spoolread.BUCKETS)
    assert (shape["total"], shape["held"], shape["held_parts"], shape["by"]) == (5, 1, 1, "domain")
    assert shape["by_age"] == [2, 2, 0, 0, 0, 0, 0, 1]
    assert shape["domains"] == [
        {"domain": "beta.example", "total": 3, "by_age": [1, 2, 0, 0, 0, 0, 0, 0]},
        {"domain": "alpha.example", "total": 1, "by_age": [1, 0, 0, 0, 0, 0, 0, 0]},
        {"domain": "delta.example", "total": 1, "by_age": [0, 0, 0, 0, 0, 0, 0, 1]},
    ]


def test_queue_top_and_destination(capsys, relay_dir):
    shape = json_of(capsys, relay_dir, "queue", "--top", "2", "--by", "destination")
    assert shape["total"] == 5 and "domains" not in shape
    assert shape["destinations"] == [
        {"destination": "mx.beta.example", "total": 3, "by_age": [1, 2, 0, 0, 0, 0, 0, 0]},
        {"destination": "alpha.example", "total": 1, "by_age": [1, 0, 0, 0, 0, 0, 0, 0]},
    ]


def test_queue_table(capsys, relay_dir):
    status, out, err = relayctl(capsys, relay_dir, "queue", "--offline", "--top", "2")
    assert status == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].split() == ["DOMAIN", "TOTAL", *spoolread.BUCKETS]
    assert lines[1].split() == ["TOTAL", "5", "2", "2", "0", "0", "0", "0", "0", "1"]
    assert lines[2].split() == ["beta.example", "3", "1", "2", "0", "0", "0", "0", "0", "0"]
    assert lines[3].split()[:2] == ["alpha.example", "1"]
    # Numbers are right-aligned under their headers.
    assert lines[1].index("5") + 1 == lines[0].index("TOTAL") + len("TOTAL")
    assert lines[4] == "(1 more domains not shown)"
    assert lines[5].startswith("held: 1 recipients in 1 parts")


def test_queue_scans_in_chunks_across_holes(capsys, relay_dir, monkeypatch):
    whole = json_of(capsys, relay_dir, "queue")
    # Holes in the rowids, as delivered mail leaves behind.
    conn = sqlite3.connect(spool_path(str(relay_dir / "spool"), 0))
    testing.leave_recipient_holes(conn)
    conn.close()
    monkeypatch.setattr(read, "CHUNK", 1)
    assert json_of(capsys, relay_dir, "queue") == whole


# -- show ----------------------------------------------------------------------


def test_show_json_merges_the_parts_of_a_split_transaction(capsys, relay_dir):
    view = json_of(capsys, relay_dir, "show", M1)
    assert view["queue_id"] == M1 and view["in_queue"]
    assert (view["sender"], view["size"], view["smtputf8"]) == ("app@s.example", len(BODY), False)
    assert view["received"] == pytest.approx(NOW - 120)
    assert view["parts"] == [{"worker": 0, "state": "active", "coordinator": 0},
                             {"worker": 1, "state": "active", "coordinator": 0}]
    assert [(r["address"], r["worker"], r["state"], r["attempts"]) for r in view["recipients"]] == [
        ("one@alpha.example", 1, "queued", 0),
        ("two@beta.example", 0, "deferred", 2),
        ("three@gamma.example", 0, "delivered", 1),
    ]
    assert view["recipients"][1]["next_attempt"] == pytest.approx(NOW + 600)
    assert view["recipients"][1]["last_reply"] == "451 4.7.1 greylisted"
    assert view["recipients"][2]["next_attempt"] is None
    assert [(e["outcome"], e["recipient"]) for e in view["events"]] == [
        ("deferred", "two@beta.example"), ("deferred", "two@beta.example"),
        ("delivered", "three@gamma.example")]
    first = view["events"][0]
    assert set(first) == {"time", "worker", "queue_id", "recipient", "destination", "mx",
                          "source_ip", "tls", "code", "enhanced", "text", "outcome", "class",
                          "latency", "lane", "campaign"}
    assert (first["code"], first["enhanced"], first["class"], first["tls"]) == (
        451, "4.7.1", "recipient", True)


def test_show_table(capsys, relay_dir):
    status, out, err = relayctl(capsys, relay_dir, "show", M1.lower(), "--offline")
    assert status == 0 and err == ""
    assert f"queue id:   {M1}" in out
    assert "sender:     <app@s.example>" in out
    assert "worker-0.db (active, coordinator 0), worker-1.db (active, coordinator 0)" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith(
        ("one@", "two@", "three@"))}
    assert rows["two@beta.example"][1:3] == ["deferred", "2"]
    assert rows["two@beta.example"][-4:] == ["0", "451", "4.7.1", "greylisted"]
    assert rows["three@gamma.example"][1:4] == ["delivered", "1", "-"]
    assert "events: 3" in out


def test_show_a_held_part_and_a_dsn(capsys, relay_dir):
    assert json_of(capsys, relay_dir, "show", M4)["parts"] == [
        {"worker": 0, "state": "held", "coordinator": 1}]
    status, out, _ = relayctl(capsys, relay_dir, "show", M2, "--offline")
    assert status == 0 and "sender:     <>" in out and "events: 0" in out


def test_show_a_message_that_left_the_queue(capsys, relay_dir):
    view = json_of(capsys, relay_dir, "show", GONE)
    assert not view["in_queue"] and view["recipients"] == [] and len(view["events"]) == 2
    status, out, _ = relayctl(capsys, relay_dir, "show", GONE, "--offline")
    assert status == 0 and "left the queue" in out and "no such user" in out
    status, out, err = relayctl(capsys, relay_dir, "show", GONE, "--offline", "--body")
    assert status == 1 and out == "" and "body is no longer stored" in err


def test_show_body(capsys, relay_dir):
    status, out, err = relayctl(capsys, relay_dir, "show", M1, "--offline", "--body")
    assert status == 0 and err == "" and out == BODY.decode()
    view = json_of(capsys, relay_dir, "show", M1, "--body")
    assert view["body"] == BODY.decode()


def test_show_unknown_id(capsys, relay_dir):
    status, out, err = relayctl(capsys, relay_dir, "show", "FFFF", "--offline")
    assert status == 1 and out == "" and err == "relayctl: FFFF: no such message in any spool\n"


# -- grep ----------------------------------------------------------------------


def test_grep_address_is_case_insensitive_newest_first(capsys, relay_dir):
    found = json_of(capsys, relay_dir, "grep", "ONE@alpha.EXAMPLE")
    assert found["address"] == "ONE@alpha.EXAMPLE" and found["matched"] == 2
    assert [(e["queue_id"], e["outcome"], e["recipient"]) for e in found["events"]] == [
        (GONE, "delivered", "One@Alpha.example"), (GONE, "bounced", "one@alpha.example")]
    assert found["events"][0]["worker"] == 1
    assert json_of(capsys, relay_dir, "grep", "one@alpha.example", "--limit", "1")["events"][0][
        "outcome"] == "delivered"


def test_grep_domain(capsys, relay_dir):
    found = json_of(capsys, relay_dir, "grep", "@beta.example")
    assert [e["recipient"] for e in found["events"]] == [
        "two@beta.example", "two@beta.example", "z@beta.example"]
    assert [e["time"] for e in found["events"]] == pytest.approx([NOW - 60, NOW - 100, NOW - 120])
    # Not a suffix match on the name: no event at a sub- or look-alike domain.
    assert json_of(capsys, relay_dir, "grep", "@eta.example")["events"] == []
    # A U-label domain finds the A-label addresses.
    assert json_of(capsys, relay_dir, "grep", "@Bücher.example")["matched"] == 1


def test_grep_table(capsys, relay_dir):
    status, out, err = relayctl(capsys, relay_dir, "grep", "two@beta.example", "--offline",
                                "--limit", "1")
    assert status == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].split() == ["TIME", "QUEUE", "ID", "OUTCOME", "CODE", "ENHANCED", "MX", "TLS",
                                "TEXT"]
    assert lines[1].split()[1:] == [M1, "deferred", "451", "4.7.1", "mx.beta.example", "yes",
                                    "greylisted"]
    assert lines[1].split()[0] == spoolread.iso_local(NOW - 60)
    assert lines[2] == "(1 of 2 events shown)"
    status, out, _ = relayctl(capsys, relay_dir, "grep", "@beta.example", "--offline")
    assert out.splitlines()[0].split()[3] == "RECIPIENT"
    status, out, _ = relayctl(capsys, relay_dir, "grep", "nobody@beta.example", "--offline")
    assert status == 0 and out == "no events for nobody@beta.example\n"


def test_grep_scans_in_chunks(capsys, relay_dir, monkeypatch):
    whole = json_of(capsys, relay_dir, "grep", "@beta.example")
    monkeypatch.setattr(read, "CHUNK", 1)
    assert json_of(capsys, relay_dir, "grep", "@beta.example") == whole


def test_grep_refuses_a_non_address(capsys, relay_dir):
    with pytest.raises(SystemExit) as exit:
        relayctl(capsys, relay_dir, "grep", "nobody", "--offline")
    assert exit.value.code == 2


# -- report --------------------------------------------------------------------


def test_report_json(capsys, relay_dir):
    report = json_of(capsys, relay_dir, "report")
    assert report["since"] == 3600.0
    assert report["until"] - report["from"] == pytest.approx(3600.0)
    assert (report["delivered"], report["failed"]) == (1, 5)
    assert [(f["outcome"], f["class"], f["code"], f["enhanced"], f["domain"], f["count"])
            for f in report["failures"]] == [
        ("deferred", "recipient", 451, "4.7.1", "beta.example", 2),
        ("dropped", None, 550, "5.7.1", "beta.example", 1),
        ("deferred", "connection", 421, "4.7.0", "delta.example", 1),
        ("bounced", "recipient", 550, "5.1.1", "xn--bcher-kva.example", 1),
    ]
    assert report["failures"][0]["last_text"] == "greylisted"
    assert report["failures"][0]["last_time"] == pytest.approx(NOW - 60)


def test_report_window(capsys, relay_dir):
    report = json_of(capsys, relay_dir, "report", "--since", "1d")
    assert (report["delivered"], report["failed"]) == (2, 6)
    assert ("bounced", "alpha.example") in {(f["outcome"], f["domain"]) for f in report["failures"]}
    with pytest.raises(SystemExit):
        relayctl(capsys, relay_dir, "report", "--since", "soon", "--offline")


def test_report_table(capsys, relay_dir):
    status, out, err = relayctl(capsys, relay_dir, "report", "--offline", "--since", "30m")
    assert status == 0 and err == ""
    lines = out.splitlines()
    # The window starts 30 minutes before the command ran (not before NOW,
    # which was taken when the module was imported).
    assert lines[0].startswith("since ")
    assert lines[0].endswith("delivered 1, failed 5 (deferred 3, bounced 1, dropped 1)")
    assert lines[1].split() == ["COUNT", "OUTCOME", "CLASS", "CODE", "ENHANCED", "DOMAIN", "LAST",
                                "REPLY"]
    assert lines[2].split() == ["2", "deferred", "recipient", "451", "4.7.1", "beta.example",
                                "greylisted"]
    assert lines[3].split()[:3] == ["1", "dropped", "-"]


# -- errors and the running check ---------------------------------------------

VERBS = [["queue"], ["show", M1], ["grep", "one@alpha.example"], ["report"]]


@pytest.mark.parametrize("verb", VERBS, ids=lambda v: v[0])
def test_a_stopped_relay_needs_offline(capsys, relay_dir, verb):
    status, out, err = relayctl(capsys, relay_dir, *verb)
    assert status == 1 and out == ""
    assert err.startswith("relayctl: the relay is not running")
    assert "--offline" in err and err.count("\n") == 1


@pytest.mark.parametrize("verb", VERBS, ids=lambda v: v[0])
def test_a_missing_spool_dir_is_an_error(capsys, tmp_path, verb):
    (tmp_path / "relay.toml").write_text(f'[relay]\nspool_dir = "{tmp_path / "nowhere"}"\n')
    status, out, err = relayctl(capsys, tmp_path, *verb, "--offline")
    assert status == 1 and out == ""
    assert err == f"relayctl: spool directory {tmp_path / 'nowhere'} does not exist" \
                  f" (relay.spool_dir in {tmp_path / 'relay.toml'})\n"


def test_a_bad_configuration_exits_2(capsys, tmp_path):
    (tmp_path / "relay.toml").write_text("[relay]\nno_such_key = 1\n")
    status, out, err = relayctl(capsys, tmp_path, "queue", "--offline")
    assert status == 2 and err.startswith("relayctl: ") and "no_such_key" in err


def test_an_empty_spool_dir_is_an_empty_queue(capsys, tmp_path):
    (tmp_path / "spool").mkdir()
    (tmp_path / "relay.toml").write_text(f'[relay]\nspool_dir = "{tmp_path / "spool"}"\n')
    assert json_of(capsys, tmp_path, "queue")["total"] == 0
    assert json_of(capsys, tmp_path, "report")["failures"] == []


@pytest.fixture
def supervisor(relay_dir):
    """A control socket that answers ``status`` as a running supervisor does."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(relay_dir / "run" / "control.sock"))
    listener.listen()

    def serve():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return  # closed: the test is over
            with conn:
                conn.recv(4096)
                conn.sendall(b'{"ok": true, "pid": 1, "workers": []}\n')

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield
    listener.shutdown(socket.SHUT_RDWR)
    listener.close()
    thread.join(timeout=5)


def test_a_running_relay_is_read_without_offline(capsys, relay_dir, supervisor):
    status, out, err = relayctl(capsys, relay_dir, "queue", "--json")
    assert status == 0 and err == "" and orjson.loads(out)["total"] == 5


# -- reading never holds up the writer ---------------------------------------


def test_a_scan_holds_no_snapshot_between_chunks(relay_dir, monkeypatch):
    monkeypatch.setattr(read, "CHUNK", 1)
    path = spool_path(str(relay_dir / "spool"), 0)
    reader = spoolread.SpoolReader(0, path)
    writer = connect(path)
    try:
        rows = reader.waiting()
        next(rows)  # the scan is under way
        writer.execute("PRAGMA busy_timeout=0")
        testing.delete_events(writer)
        # A reader pinning the WAL would make the checkpoint report busy (1).
        assert writer.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0
        rows.close()
    finally:
        writer.close()
        reader.close()


def test_the_reader_cannot_write(relay_dir):
    reader = spoolread.SpoolReader(0, spool_path(str(relay_dir / "spool"), 0))
    try:
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            testing.delete_events(reader.conn)
    finally:
        reader.close()


def test_a_busy_spool_is_retried_then_reported(relay_dir, monkeypatch):
    monkeypatch.setattr(read, "BUSY_FOR", 0.3)
    path = spool_path(str(relay_dir / "spool"), 0)
    # An exclusive lock is the one thing that stops a WAL reader.
    locker = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    locker.execute("PRAGMA locking_mode=EXCLUSIVE")
    locker.execute("BEGIN EXCLUSIVE")
    reader = spoolread.SpoolReader(0, path)
    try:
        with pytest.raises(spoolread.ReadError, match="busy for 0.3s"):
            reader.held_parts()
        # Released while the reader retries: the read succeeds.
        release = threading.Timer(0.1, locker.close)
        release.start()
        assert reader.held_parts() == 1
        release.join()
    finally:
        reader.close()
        locker.close()
