"""perf.waits: arrived→delivered per destination from a kept run's logs."""

from __future__ import annotations

import orjson
import pytest

from perf import waits
from relay.model import QueueIds


def test_a_queue_id_says_when_it_was_made(monkeypatch):
    monkeypatch.setattr("time.time_ns", lambda: 1_796_305_009_754_321_000)
    queue_id = QueueIds(3).next()
    assert QueueIds.made_at(queue_id) == pytest.approx(1_796_305_009.754321, abs=1e-6)


def test_waits_pair_each_accepted_message_with_its_deliveries(tmp_path, capsys):
    run = tmp_path / "relay-0-x"
    (run / "log").mkdir(parents=True)
    accepted, dsn = "661BADA03A50001020", "661BADA03B00000001"
    arrived = QueueIds.made_at(accepted)
    # The log's clock and time zone do not matter: only the ids are read.
    (run / "relay.log").write_text(
        f"2026-12-03 13:36:49,754 relay[worker 1] INFO relay.intake: {accepted}: accepted"
        " from=<a@b.example> nrcpt=2 size=2444 client=[127.0.1.2] class=transactional\n"
        f"2026-12-03 13:36:49,800 relay[worker 0] INFO relay.deliver: {dsn}: to=<x> (a DSN)\n"
        "2026-12-03 13:36:50,000 relay[worker 0] WARNING relay.intake: 661BADA03C00000002: not"
        " accepted from amqp q: full\n")
    events = [
        {"queue_id": accepted, "destination": "mx.a.example", "outcome": "delivered", "time": arrived + 0.25},
        {"queue_id": accepted, "destination": "mx.b.example", "outcome": "deferred", "time": arrived + 0.5},
        {"queue_id": accepted, "destination": "mx.b.example", "outcome": "delivered", "time": arrived + 2.0},
        {"queue_id": dsn, "destination": "mx.a.example", "outcome": "delivered", "time": arrived + 9.0},
    ]
    (run / "log" / "delivery-0.jsonl").write_bytes(b"".join(orjson.dumps(e) + b"\n" for e in events))
    assert waits.accepted_ids(str(run / "relay.log")) == {accepted}
    found = waits.waits({accepted}, [str(run / "log" / "delivery-0.jsonl")])
    assert {d: [round(s, 3) for s in v] for d, v in found.items()} == {
        "mx.a.example": [0.25], "mx.b.example": [2.0]}
    assert waits.main([str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["mx.a.example", "1", "250.0", "250.0", "250.0"]
    assert lines[-1].split() == ["all", "2", "250.0", "2000.0", "2000.0"]


def test_a_directory_without_accepted_mail_is_an_error(tmp_path, capsys):
    (tmp_path / "relay.log").write_text("2026-12-03 13:36:49,754 relay INFO relay: started\n")
    with pytest.raises(SystemExit) as stopped:
        waits.main([str(tmp_path)])
    assert stopped.value.code == 2 and "no 'accepted' lines" in capsys.readouterr().err
