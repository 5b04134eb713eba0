"""perf.busy: deliveries, transaction time and busy connections per window."""

from __future__ import annotations

import orjson

from perf import busy


def test_windows_count_deliveries_and_the_connections_busy(tmp_path):
    log = tmp_path / "log" / "delivery-0.jsonl"
    log.parent.mkdir()
    events = [  # two connections busy all through 0-10 s, 0.5 s per transaction
        {"outcome": "delivered", "time": 100.0 + 0.5 * (n // 2 + 1), "latency": 0.5}
        for n in range(40)
    ] + [{"outcome": "deferred", "time": 101.0, "latency": 0.5},
         {"outcome": "delivered", "time": 101.0, "latency": None}]
    log.write_bytes(b"".join(orjson.dumps(e) + b"\n" for e in events))
    found = busy.transactions([str(log)])
    assert len(found) == 40
    rows = busy.windows(found, 5.0)
    assert [r["from_s"] for r in rows] == [0.0, 5.0, 10.0]
    assert rows[0] == {"from_s": 0.0, "delivered_per_s": 3.6, "transaction_ms": 500.0, "busy": 2.0}
    assert rows[1]["busy"] == 2.0 and rows[1]["delivered_per_s"] == 4.0
    assert busy.windows([], 5.0) == []
