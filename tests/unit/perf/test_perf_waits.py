"""perf.waits: accepted→delivered per destination from a kept run's logs."""

from __future__ import annotations

import time

import orjson

from perf import waits


def test_waits_pair_each_acceptance_with_its_deliveries(tmp_path, capsys):
    run = tmp_path / "relay-0-x"
    (run / "log").mkdir(parents=True)
    accepted = time.mktime(time.strptime("2026-12-03 13:36:49", "%Y-%m-%d %H:%M:%S")) + 0.754
    (run / "relay.log").write_text(
        "2026-12-03 13:36:49,754 relay[worker 1] INFO relay.intake: 661BADA03A50001020: accepted"
        " from=<a@b.example> nrcpt=2 size=2444 client=[127.0.1.2] class=transactional\n"
        "2026-12-03 13:36:49,800 relay[worker 0] INFO relay.deliver: 661BADA03A50001020: to=<x>\n"
        "2026-12-03 13:36:50,000 relay[worker 0] INFO relay.intake: 77AAA: accepted from=<> nrcpt=1\n")
    events = [
        {"queue_id": "661BADA03A50001020", "destination": "mx.a.example", "outcome": "delivered",
         "time": accepted + 0.25},
        {"queue_id": "661BADA03A50001020", "destination": "mx.b.example", "outcome": "deferred",
         "time": accepted + 0.5},
        {"queue_id": "661BADA03A50001020", "destination": "mx.b.example", "outcome": "delivered",
         "time": accepted + 2.0},
        {"queue_id": "NOTACCEPTEDHERE", "destination": "mx.a.example", "outcome": "delivered",
         "time": accepted},
    ]
    (run / "log" / "delivery-0.jsonl").write_bytes(b"".join(orjson.dumps(e) + b"\n" for e in events))
    found = waits.waits(waits.accepted_at(str(run / "relay.log")), [str(run / "log" / "delivery-0.jsonl")])
    assert {d: [round(s, 3) for s in v] for d, v in found.items()} == {
        "mx.a.example": [0.25], "mx.b.example": [2.0]}
    assert waits.main([str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["mx.a.example", "1", "250.0", "250.0", "250.0"]
    assert lines[-1].split() == ["all", "2", "250.0", "2000.0", "2000.0"]
