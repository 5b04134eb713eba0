"""The stats ring: single writer per region, lock-free consistent reads,
totals that survive a restart, merging and the Prometheus rendering."""

from __future__ import annotations

import struct
import threading

from prometheus_client.parser import text_string_to_metric_families

from relay.stats import prometheus, ring


def make(tmp_path, workers=2):
    path = ring.create(str(tmp_path), workers)
    return path


def test_published_figures_are_read_back_and_merged(tmp_path):
    path = make(tmp_path)
    one, two = ring.Writer(path, 0), ring.Writer(path, 1)
    latency = ring.Histogram()
    for seconds in (0.0005, 0.003, 0.2, 7.0):
        latency.observe(seconds)
    one.publish({"delivered": 5, "accepted_messages": 7}, {"ready": 3, "uptime": 10},
                {"data_to_250": latency.value()}, [("mx.a.example", 4)])
    two.publish({"delivered": 2}, {"ready": 1, "uptime": 30}, {}, [("mx.a.example", 1)])
    snapshots = ring.read(path)
    merged = ring.merge(snapshots)
    assert [s.worker for s in snapshots] == [0, 1]
    assert merged["counters"]["delivered"] == 7 and merged["counters"]["accepted_messages"] == 7
    assert merged["gauges"]["ready"] == 4 and merged["gauges"]["uptime"] == 30
    histogram = merged["histograms"]["data_to_250"]
    assert sum(histogram["counts"]) == 4 and abs(histogram["sum"] - 7.2035) < 1e-9
    assert histogram["p50"] == 0.005 and histogram["p99"] == 10.0
    assert merged["top_destinations"] == [("mx.a.example", 5)]


def test_a_restarted_worker_goes_on_from_its_totals(tmp_path):
    path = make(tmp_path, workers=1)
    ring.Writer(path, 0).publish({"delivered": 5}, {}, {}, [])
    again = ring.Writer(path, 0)  # the worker was restarted: its counters start at 0
    again.publish({"delivered": 2}, {}, {}, [])
    [snapshot] = ring.read(path)
    assert snapshot.counters["delivered"] == 7 and snapshot.gauges["restarts"] == 1


def test_a_region_caught_mid_write_is_not_read(tmp_path):
    path = make(tmp_path, workers=1)
    writer = ring.Writer(path, 0)
    writer.publish({"delivered": 1}, {}, {}, [])
    # A writer that died half way: the sequence number stays odd.
    with open(path, "r+b") as file:
        file.seek(ring.HEADER_SIZE)
        seq = struct.unpack("<Q", file.read(8))[0]
        file.seek(ring.HEADER_SIZE)
        file.write(struct.pack("<Q", seq + 1))
    assert ring.read(path) == []
    # Its successor still starts from the last values.
    assert ring.Writer(path, 0).base["delivered"] == 1


def test_concurrent_reads_never_see_a_torn_publication(tmp_path):
    path = make(tmp_path, workers=1)
    writer = ring.Writer(path, 0)
    stop = threading.Event()

    def publish():
        n = 0
        while not stop.is_set():
            n += 1
            # Every counter carries the same value: a torn copy would mix two.
            writer.publish(dict.fromkeys(ring.COUNTERS, n), {}, {}, [])

    thread = threading.Thread(target=publish)
    thread.start()
    try:
        for _ in range(300):
            for snapshot in ring.read(path):
                assert len(set(snapshot.counters.values())) == 1
    finally:
        stop.set()
        thread.join()


def test_prometheus_text_parses(tmp_path):
    path = make(tmp_path, workers=1)
    latency = ring.Histogram()
    latency.observe(0.02)
    ring.Writer(path, 0).publish({"delivered": 3}, {"ready": 2}, {"accept_to_delivered": latency.value()},
                                 [('mx "quoted"', 1)])
    text = prometheus.render(ring.merge(ring.read(path)))
    samples = {s.name: s for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples["relay_delivered_total"].value == 3
    assert samples["relay_ready"].value == 2
    assert samples["relay_accept_to_delivered_seconds_count"].value == 1
    assert samples["relay_destination_load"].labels == {"destination": 'mx "quoted"'}


def test_busiest_campaigns_by_name_and_the_rest_summed_across_workers(tmp_path):
    path = make(tmp_path, 2)
    one, two = ring.Writer(path, 0), ring.Writer(path, 1)
    small = {f"c{i}": {"delivered": 1} for i in range(ring.CAMPAIGN_TOP)}  # with "big": one more than the top holds
    one.publish({}, {}, {}, [], {"big": {"delivered": 50, "bounced": 2}, **small})
    two.publish({}, {}, {}, [], {"big": {"delivered": 30}, "other": {"dropped": 7}})
    merged = ring.merge(ring.read(path))
    assert merged["campaigns"][0] == {"name": "big", "delivered": 80, "deferred": 0,
                                      "bounced": 2, "dropped": 0}
    assert len(merged["campaigns"]) == ring.CAMPAIGN_TOP
    named = sum(c["delivered"] + c["dropped"] for c in merged["campaigns"])
    other = merged["campaigns_other"]
    assert named + other["delivered"] + other["dropped"] == 80 + ring.CAMPAIGN_TOP + 7
    text = prometheus.render(merged)
    assert 'relay_campaign_outcomes_total{campaign="big",outcome="delivered"} 80' in text
    assert text.count("relay_campaign_outcomes_total{") == ring.CAMPAIGN_TOP * 4
    assert 'relay_campaign_other_outcomes_total{outcome="delivered"}' in text


def test_lanes_have_their_own_counters_and_latency(tmp_path):
    path = make(tmp_path, 1)
    histogram = ring.Histogram()
    histogram.observe(0.3)
    ring.Writer(path, 0).publish({"delivered_bulk": 4, "accepted_transactional": 2}, {},
                                 {"accept_to_delivered_bulk": histogram.value()}, [])
    merged = ring.merge(ring.read(path))
    assert merged["counters"]["delivered_bulk"] == 4
    assert merged["counters"]["accepted_transactional"] == 2
    assert merged["histograms"]["accept_to_delivered_bulk"]["p99"] == 0.5
    assert merged["histograms"]["accept_to_delivered_transactional"]["p99"] is None
